"""The real SmolLM2-135M-Instruct: the port against transformers' own GGUF loader on real JBB prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ports import load_pretrained
from ports.generate import generate
from tests.parity import rel_error


@pytest.fixture(scope="module")
def prompts(smollm2_dir, jbb_goals):
    """24 real JBB behaviours (every 4th, so all 10 categories) in the chat template, left-padded."""
    lm = load_pretrained(smollm2_dir)
    tokenizer = lm.processor
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": goal}], add_generation_prompt=True, tokenize=False)
        for goal in jbb_goals[::4][:24]
    ]
    encoded = tokenizer(texts, return_tensors="np", padding=True)
    mask = encoded["attention_mask"]
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": mask,
        "position_ids": np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0),
    }


@pytest.fixture(scope="module")
def reference_logits(smollm2_reference, prompts):
    with torch.no_grad():
        return smollm2_reference(**{k: torch.tensor(v) for k, v in prompts.items()}).logits.numpy()


def port_logits(lm, batch):
    return np.asarray(jax.jit(lambda p, b: lm.model.apply({"params": p}, **b).logits)(lm.params, batch))


def log_softmax(x):
    return np.asarray(jax.nn.log_softmax(jnp.asarray(x, jnp.float32), axis=-1))


def test_float32_logits_match(smollm2_dir, prompts, reference_logits):
    logits = port_logits(load_pretrained(smollm2_dir), prompts)
    valid = prompts["attention_mask"].astype(bool)
    assert valid.sum() >= 24 * 30
    assert rel_error(logits[valid], reference_logits[valid]) <= 1e-4


def distinct_contexts(batch) -> np.ndarray:
    """[B, T] bool: every real position, except the chat-template prefix that all prompts share, counted once."""
    valid = batch["attention_mask"].astype(bool)
    rows = [ids[keep] for ids, keep in zip(batch["input_ids"], valid)]
    shared = next(i for i in range(min(map(len, rows))) if len({row[i] for row in rows}) > 1)
    keep = valid.copy()
    for r in range(1, len(rows)):
        start = int(np.argmax(valid[r]))
        keep[r, start:start + shared] = False
    return keep


def test_bfloat16_next_token_distribution(smollm2_dir, prompts, reference_logits):
    """Teacher-forced next-token predictions in every distinct context: bf16 port vs the float32 reference."""
    logits = port_logits(load_pretrained(smollm2_dir, dtype=jnp.bfloat16), prompts)
    keep = distinct_contexts(prompts)
    assert keep.sum() >= 500
    p, q = log_softmax(reference_logits[keep]), log_softmax(logits[keep])
    kl = np.sum(np.exp(p) * (p - q), axis=-1)
    top1 = np.mean(p.argmax(-1) == q.argmax(-1))
    assert kl.mean() <= 1e-3, f"mean KL {kl.mean():.2e} nats over {keep.sum()} contexts"
    assert top1 >= 0.99, f"top-1 agreement {top1:.4f} over {keep.sum()} contexts"


def test_greedy_generation_identical(smollm2_dir, smollm2_reference, prompts):
    """32 greedy tokens per prompt, batched and left-padded, equal to transformers' generate in float32."""
    lm = load_pretrained(smollm2_dir)
    batch = {k: prompts[k] for k in ("input_ids", "attention_mask")}
    out = generate(lm, batch, max_new_tokens=32)
    with torch.no_grad():
        expected = smollm2_reference.generate(
            **{k: torch.tensor(v) for k, v in batch.items()}, max_new_tokens=32, do_sample=False,
            pad_token_id=lm.processor.pad_token_id,
        )[:, batch["input_ids"].shape[1]:].numpy()
    tokens = np.asarray(out.tokens)
    for row, (ours, theirs) in enumerate(zip(tokens, expected)):
        n = int(out.lengths[row])
        np.testing.assert_array_equal(ours[:n], theirs[:n], err_msg=f"prompt {row}")
    assert (np.asarray(out.lengths) > 8).all()
