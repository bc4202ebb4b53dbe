"""Helpers for parity tests against Hugging Face PyTorch: random weights, torch site hooks, relative error."""

from __future__ import annotations

import contextlib

import numpy as np
import torch


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.08) -> torch.nn.Module:
    """Redraw every parameter from a seeded normal (norm weights around 1), so no bias or scale is trivially 0/1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
            p.copy_(1.0 + noise if "norm" in name else noise)
    return model.eval()


def rel_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@contextlib.contextmanager
def torch_sites(layers, prefix: str = "lm", down_proj: str = "down_proj"):
    """Record the canonical sites of Hugging Face decoder (or encoder) layers: {site name: tensor [B, T, W]}.

    `down_proj` names the MLP's output projection, whose input is the `mlp.act` site (`fc2` in vision towers)."""
    found, handles = {}, []

    def keep(name, pick):
        return lambda module, args, out: found.__setitem__(name, pick(args, out).detach().numpy())

    for i, layer in enumerate(layers):
        p = f"{prefix}.layers.{i}"
        handles += [
            getattr(layer.mlp, down_proj).register_forward_hook(keep(f"{p}.mlp.act", lambda a, o: a[0])),
            layer.mlp.register_forward_hook(keep(f"{p}.mlp.out", lambda a, o: o)),
            layer.self_attn.register_forward_hook(keep(f"{p}.attn.out", lambda a, o: o[0])),
            layer.register_forward_hook(keep(f"{p}.resid", lambda a, o: o[0] if isinstance(o, tuple) else o)),
        ]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def one_torch_thread():
    """Run torch on one thread within the context: two threads on two busy cores spin-wait, and tiny models run
    many times faster on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def torch_logits(model: torch.nn.Module, batch: dict) -> np.ndarray:
    """Logits [B, T, V] of an uncached torch forward over a left-padded batch (positions count real tokens)."""
    mask = batch["attention_mask"]
    with torch.no_grad():
        return model(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(np.where(mask == 1, np.cumsum(mask, 1) - 1, 0))).logits.numpy()


def left_padded_batch(rng: np.random.Generator, vocab: int, lengths: list[int], avoid=()) -> dict:
    """Random token ids, left-padded to the longest length, with the attention mask and HF-style positions."""
    width = max(lengths)
    ids = rng.integers(0, vocab, (len(lengths), width))
    for token in avoid:
        ids[ids == token] = (token + 1) % vocab
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    ids = np.where(mask == 1, ids, 0)
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
