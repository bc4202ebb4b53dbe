"""GPU benchmarks at the real 7B scale, JAX vs the Hugging Face PyTorch baseline in the same run (issues #8 and #6).

    PYTHONPATH=. python benchmarks/gpu.py --parts eigh capture train generate --out DIR   # on the GPU machine
    PYTHONPATH=. .venv/bin/python benchmarks/gpu.py --tiny --out /tmp/gpu-tiny            # a CPU rehearsal
    PYTHONPATH=. .venv/bin/python benchmarks/gpu.py --report DIR --write                  # DIR/*.json -> BENCHMARKS.md

Weights are random bfloat16 of the presets' real architectures (`ports/presets`), drawn directly on the device
(JAX: normal, std 0.02, norm weights around 1, as `write_random_checkpoint`; PyTorch: transformers' own
initialisation), so no checkpoint is read or written: the two frameworks hold different random weights and their
outputs are not compared here (the parity tests and the CPU benchmarks do that on shared weights). Every
(part, framework) runs in a child process of its own, one after another, so each peak of device memory is its own:
JAX `memory_stats()["peak_bytes_in_use"]` with preallocation off, PyTorch `torch.cuda.max_memory_allocated()`.

Parts:
- eigh: Σ_mal u = λ Σ_ben u at d = 3584 and 4096 (`eigh.py`'s covariances, shrinkage 0.1), float32:
  `precise_jax.subspace.generalized_eigh` (and its jitted core alone) vs a torch Cholesky route on the same GPU;
  the float64 scipy answer on the machine's CPU for the first d gives eigenvalue error and principal angles.
- capture: LLaVA-1.5-7B prefill of `--capture-batch` × `--capture-tokens` tokens (576 image tokens per row, real-
  sized random pixel_values): plain forward (logits) tokens/s, then `mlp.act` of all 32 layers mean-pooled per row
  into streaming mean/variance: `precise_jax.capture.collect` over `--capture-batches` batches vs
  `LlavaForConditionalGeneration` (bf16, sdpa) with forward pre-hooks on every `down_proj` doing the same
  reduction; MFU against the bf16 matrix-product rate measured in the same run.
- train: one masked-SFT AdamW step at `--train-batch` × `--train-tokens` tokens on LLaVA-1.5-7B's language model
  (Llama-2-7B shape): `precise_jax.train` lean and full modes vs PyTorch masked (MLP matrices require grad,
  gradient masks by hooks) and full, via `train_step.py`'s step builders.
- generate: greedy KV-cache generation, `--gen-batch` rows × `--new-tokens` tokens, on the same language model,
  without and with CARE's projection (visual + text subspace of k = `--k` at `mlp.out` of layers 12-14, α = 4,
  adaptive fusion, every token): `ports.generate` + `precise_jax.interventions.projection_hook` vs HF `generate`
  with a forward hook applying the same formula.

Each part's results go to `--out`/PART.json as soon as the part ends (a later failure loses nothing), and its
BENCHMARKS.md section is printed. `--tiny` shrinks every preset (and sizes) so the whole run takes a minute on CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    begin, end, gpu_description, logger, peak_rss_kib, replace_section, run_child, stats, timed, utc_now, versions,
)

log = logger("gpu")
PARTS = ("eigh", "capture", "train", "generate")
VARIANTS = {"eigh": ("jax", "torch"), "capture": ("jax", "torch"),
            "train": ("jax-lean", "jax-full", "torch-masked", "torch-full"), "generate": ("jax", "torch")}
PRESET = "llava-1.5-7b-hf"
PROJECTION_LAYERS = (12, 13, 14)
ALPHA = 4.0
# A small LLaVA of the same structure for --tiny: 2-layer Llama and CLIP, 28-pixel images (4 features each).
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                   patch_size=14, projection_dim=32)
TINY_SIZES = dict(capture_batch=2, capture_tokens=32, capture_batches=2, train_batch=2, train_tokens=32,
                  per_layer=4, gen_batch=2, gen_prompt=8, new_tokens=8, k=8, dims=[48, 64], repeats=2)


# ----------------------------------------------------------------------------------------------------- models


def llava_config(tiny: bool) -> dict:
    """The LLaVA-1.5-7B preset's config.json contents, or its --tiny version."""
    from ports.presets import load_preset

    config = load_preset(PRESET)
    if tiny:
        config = dict(config, image_token_index=500, pad_token_id=501, vocab_size=512,
                      text_config=dict(config["text_config"], **TINY_TEXT),
                      vision_config=dict(config["vision_config"], **TINY_VISION))
    return config


def text_config(llava: dict) -> dict:
    """The config.json contents of the composition's language model alone (Llama-2-7B for LLaVA-1.5-7B)."""
    from ports.presets import hf_config

    return hf_config(llava).text_config.to_dict()


def random_lm(config: dict, seed: int = 0):
    """The port of `config` in bfloat16 with random weights drawn on the default device, one leaf at a time."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict

    from ports.presets import build_abstract

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def draw(key, shape, dtype, norm: bool):
        x = jax.random.normal(key, shape, jnp.float32) * 0.02
        return (x + 1.0 if norm else x).astype(dtype)

    lm = build_abstract(config, jnp.bfloat16)
    key = jax.random.key(seed)
    flat = flatten_dict(lm.params)
    params = {path: draw(jax.random.fold_in(key, i), leaf.shape, leaf.dtype, "norm" in "/".join(path)
                         and path[-1] == "weight") for i, (path, leaf) in enumerate(sorted(flat.items()))}
    lm.params = jax.block_until_ready(unflatten_dict(params))
    return lm


def torch_model(config: dict):
    """transformers' model of `config` in bfloat16 with sdpa attention and its own random initialisation, built on
    the GPU when there is one."""
    import torch
    import transformers

    from ports.presets import hf_config

    hf = hf_config(config)
    cls = {"llava": transformers.LlavaForConditionalGeneration, "llama": transformers.LlamaForCausalLM}[hf.model_type]
    torch.manual_seed(0)
    with torch.device(torch_device()):
        model = cls._from_config(hf, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_peak(reset: bool = False) -> int | None:
    """Peak bytes PyTorch allocated on the GPU since the last reset (None without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated()
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return int(peak)


def jax_peak() -> int | None:
    """Peak bytes in use on JAX's first device since the process started (None where the backend keeps none)."""
    import jax

    memory = jax.devices()[0].memory_stats()
    return None if not memory else int(memory.get("peak_bytes_in_use", 0))


def device_name() -> str:
    import jax

    return str(jax.devices()[0].device_kind)


# ----------------------------------------------------------------------------------------------------- inputs


def vlm_batch(llava: dict, rows: int, tokens: int, seed: int = 0) -> dict:
    """Rows of [BOS, one image's tokens, random text], real-sized random pixel_values [rows, 3, S, S] float32 and
    token types (image / prompt), as numpy."""
    from ports.processing import TokenType

    vision = llava["vision_config"]
    features = (vision["image_size"] // vision["patch_size"]) ** 2  # 'default' selection drops CLIP's class token
    image = llava["image_token_index"]
    if tokens < features + 2:
        raise SystemExit(f"--capture-tokens must be at least {features + 2} (one image's {features} tokens + text)")
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, image, (rows, tokens), dtype=np.int32)
    ids[:, 0] = 1
    ids[:, 1:1 + features] = image
    types = np.where(ids == image, TokenType.IMAGE, TokenType.PROMPT).astype(np.int8)
    pixels = rng.standard_normal((rows, 3, vision["image_size"], vision["image_size"]), dtype=np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": pixels, "token_types": types}


def text_batch(vocab: int, rows: int, tokens: int, seed: int = 0) -> dict:
    """Random token ids [rows, tokens]; the first half is the prompt, the second half the reply (the loss)."""
    from ports.processing import TokenType

    ids = np.random.default_rng(seed).integers(3, vocab, (rows, tokens), dtype=np.int32)
    types = np.full(ids.shape, TokenType.PROMPT, np.int8)
    types[:, tokens // 2:] = TokenType.RESPONSE
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_types": types}


# ----------------------------------------------------------------------------------------------------- eigh


def eigh_problems(args, work: Path) -> dict:
    """Write each d's float64 covariances; solve the first d in float64 with scipy (on this machine's CPU)."""
    import scipy.linalg

    from benchmarks.eigh import GAMMA, problem

    out = {}
    for i, d in enumerate(args.dims):
        a, b = problem(d)
        np.savez(work / f"eigh_{d}.npz", a=a, b=b)
        if i == 0:
            shrunk = (1 - GAMMA) * b + GAMMA * np.trace(b) / d * np.eye(d)
            start = time.perf_counter()
            w, v = scipy.linalg.eigh(a, shrunk)
            out = {"reference_d": d, "scipy_float64_s": time.perf_counter() - start, "cpu_cores": os.cpu_count()}
            np.savez(work / f"eigh_{d}_reference.npz", w=w[::-1][:args.k], v=v[:, ::-1][:, :args.k])
    return out


def compare_eigh(work: Path, d: int, k: int, w, v) -> dict:
    """Top-k eigenvalue error and largest principal-angle sine against the float64 scipy answer, if there is one."""
    import scipy.linalg

    path = work / f"eigh_{d}_reference.npz"
    if not path.exists():
        return {}
    ref = np.load(path)
    w, v = np.asarray(w, np.float64)[:k], np.asarray(v, np.float64)[:, :k]
    return {"eig_rel_err": float(np.max(np.abs(w - ref["w"]) / np.abs(ref["w"]))),
            "max_sine": float(np.max(np.sin(scipy.linalg.subspace_angles(v, ref["v"]))))}


def child_eigh_jax(args, work: Path) -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks.eigh import GAMMA
    from precise_jax.subspace import _whitened_eigh, generalized_eigh

    out = {"device": device_name(), "dims": {}}
    for d in args.dims:
        data = np.load(work / f"eigh_{d}.npz")
        a, b = jnp.asarray(data["a"], jnp.float32), jnp.asarray(data["b"], jnp.float32)
        core = (a, b, jnp.float32(0.0), jnp.float32(GAMMA))
        start = time.perf_counter()
        compiled = _whitened_eigh.lower(*core).compile()
        r = {"compile_s": time.perf_counter() - start}
        r["core_first_s"], r["core_s"] = timed(lambda: jax.block_until_ready(compiled(*core)), args.repeats)
        # The public call: input checks (finiteness, symmetry) on the device, the core, the positive-definite check.
        r["public_first_s"], r["public_s"] = timed(
            lambda: jax.block_until_ready(generalized_eigh(a, b, shrinkage=GAMMA)), args.repeats)
        sym = (a + a.T) / 2
        plain = jax.jit(jnp.linalg.eigh)
        jax.block_until_ready(plain(sym))
        r["eigh_only_s"] = timed(lambda: jax.block_until_ready(plain(sym)), args.repeats)[1]
        w, v = generalized_eigh(a, b, shrinkage=GAMMA)
        r.update(compare_eigh(work, d, args.k, w, v))
        out["dims"][str(d)] = r
        log(f"eigh jax d={d}: core {np.median(r['core_s']):.3f} s, public {np.median(r['public_s']):.3f} s")
    out["peak_device_bytes"] = jax_peak()
    return out


def torch_generalized_eigh(a, b, gamma: float):
    """The float32 Cholesky route in PyTorch: λ descending, v b'-orthonormal, b' = (1−γ) b + γ tr(b)/d I."""
    import torch

    d = b.shape[0]
    b = (1 - gamma) * b + gamma * torch.trace(b) / d * torch.eye(d, dtype=b.dtype, device=b.device)
    chol = torch.linalg.cholesky(b)
    c = torch.linalg.solve_triangular(chol, a, upper=False)
    c = torch.linalg.solve_triangular(chol, c.T, upper=False)
    w, u = torch.linalg.eigh((c + c.T) / 2)
    v = torch.linalg.solve_triangular(chol.T, u, upper=True)
    return w.flip(0), v.flip(1)


def child_eigh_torch(args, work: Path) -> dict:
    import torch

    from benchmarks.eigh import GAMMA

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 at full precision, as the JAX side
    device = torch_device()
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dims": {}}
    for d in args.dims:
        data = np.load(work / f"eigh_{d}.npz")
        a = torch.from_numpy(data["a"]).float().to(device)
        b = torch.from_numpy(data["b"]).float().to(device)

        def run(a=a, b=b):
            result = torch_generalized_eigh(a, b, GAMMA)
            torch_sync()
            return result

        r = {}
        r["first_s"], r["times_s"] = timed(run, args.repeats)
        sym = (a + a.T) / 2
        r["eigh_only_s"] = timed(lambda: (torch.linalg.eigh(sym), torch_sync()), args.repeats)[1]
        w, v = run()
        r.update(compare_eigh(work, d, args.k, w.cpu().numpy(), v.cpu().numpy()))
        out["dims"][str(d)] = r
        log(f"eigh torch d={d}: {np.median(r['times_s']):.3f} s")
    out["peak_device_bytes"] = torch_peak()
    return out


# ----------------------------------------------------------------------------------------------------- capture


def forward_flops(params, config, rows: int, tokens: int, head: bool) -> float:
    """Model FLOPs of one LLaVA prefill: 2 × parameters used × tokens for every matrix product (vision tower per
    image token, projector per image feature, decoder per token, LM head if `head`), plus attention score and
    value products: causal in the decoder (the T²/2 scores a causal kernel computes), full in the vision tower."""
    from ports.presets import num_params

    lm_layers = num_params({k: v for k, v in params["lm"].items() if k.startswith("layers_")})
    vision = num_params(params["vision"])
    projector = num_params(params["projector"])
    text, v = config.text, config.vision
    image_tokens = v.grid**2 + 1  # with CLIP's class token
    flops = 2 * lm_layers * rows * tokens + 2 * text.num_layers * text.hidden_size * tokens**2 * rows
    flops += rows * (2 * vision * image_tokens + 4 * v.num_layers * v.hidden_size * image_tokens**2)
    flops += rows * 2 * projector * config.features_per_image
    if head:
        flops += 2 * num_params(params["lm_head"]) * rows * tokens
    return float(flops)


def child_capture_jax(args, work: Path) -> dict:
    import jax
    import jax.numpy as jnp

    from ports.layers import fused_attention_chosen, set_attention_implementation
    from precise_jax.capture import _place, _step, collect, host_inputs, position_mask
    from precise_jax.stats import Moments

    llava = llava_config(args.tiny)
    start = time.perf_counter()
    lm = random_lm(llava)
    out = {"device": device_name(), "init_s": time.perf_counter() - start, "peak_after_init": jax_peak(),
           "attention": "cudnn" if fused_attention_chosen(jnp.bfloat16, lm.config.text.head_dim) else "xla"}
    batch = vlm_batch(llava, args.capture_batch, args.capture_tokens)
    rows, tokens = batch["input_ids"].shape
    out["flops_plain"] = forward_flops(lm.params, lm.config, rows, tokens, head=True)
    out["flops_capture"] = forward_flops(lm.params, lm.config, rows, tokens, head=False)
    inputs = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask")}
    inputs["pixel_values"] = jnp.asarray(batch["pixel_values"], jnp.bfloat16)

    def forward(params, inputs):
        return lm.model.apply({"params": params}, **inputs).logits

    start = time.perf_counter()
    compiled = jax.jit(forward).lower(lm.params, inputs).compile()
    out["plain_compile_s"] = time.perf_counter() - start
    out["plain_first_s"], times = timed(lambda: jax.block_until_ready(compiled(lm.params, inputs)), args.repeats)
    out["plain"] = stats(times)
    out["peak_after_plain"] = jax_peak()
    log(f"capture jax plain: {rows * tokens / out['plain']['median_s']:,.0f} tokens/s")

    sites = tuple(f"lm.layers.{i}.mlp.act" for i in range(lm.config.text.num_layers))
    host = dict(batch, pixel_values=batch["pixel_values"].astype(jnp.bfloat16))
    batches = [host] * args.capture_batches

    def run():
        result = collect(lm, batches, sites, positions="all", pool="mean", stats=True, progress=False)
        return jax.block_until_ready(result.stats)

    out["capture_first_s"], times = timed(run, args.repeats)  # the first call compiles
    out["capture"] = stats(times)
    out["peak_after_capture"] = jax_peak()
    moments = run()
    out["capture_check"] = {"count": int(moments[sites[0]].count),
                            "finite": bool(all(np.isfinite(np.asarray(moments[s].mean)).all() for s in sites))}
    log(f"capture jax collect: {rows * tokens * args.capture_batches / out['capture']['median_s']:,.0f} tokens/s")

    # The capture step alone on inputs already on the device (the compiled step of `collect`): what remains of
    # a collect call's time is its host loop.
    placed, mask, valid = _place(None, host_inputs(host), position_mask(host, "all"), np.ones(rows, bool))
    width = lm.config.text.intermediate_size

    def step_only():
        state = {s: Moments.zeros(width, False) for s in sites}
        for _ in range(args.capture_batches):
            state, _ = _step(lm.model, sites, "mean", (), False, lm.params, placed, mask, valid, None, state)
        return jax.block_until_ready(state)

    out["step_only"] = stats(timed(step_only, args.repeats)[1])
    last = (sites[-1],)  # the same forward (up to the last layer) capturing one site: what 31 more sites cost

    def step_one_site():
        state = {last[0]: Moments.zeros(width, False)}
        for _ in range(args.capture_batches):
            state, _ = _step(lm.model, last, "mean", (), False, lm.params, placed, mask, valid, None, state)
        return jax.block_until_ready(state)

    out["step_one_site"] = stats(timed(step_one_site, args.repeats)[1])

    if out["attention"] == "cudnn" or args.tiny:
        # The same forward with the XLA attention path: its speed, and its logits against the fused kernel's
        # (--tiny on a CPU: both are the XLA path, a rehearsal of this code).
        fused_logits = np.asarray(compiled(lm.params, inputs))
        previous = set_attention_implementation("xla")
        try:
            start = time.perf_counter()
            reference = jax.jit(forward).lower(lm.params, inputs).compile()
            out["plain_xla_compile_s"] = time.perf_counter() - start
            out["plain_xla"] = stats(timed(lambda: jax.block_until_ready(reference(lm.params, inputs)),
                                           args.repeats)[1])
            xla_logits = np.asarray(reference(lm.params, inputs))
        finally:
            set_attention_implementation(previous)
        diff = np.abs(fused_logits - xla_logits)
        out["fused_vs_xla"] = {
            "max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "max_abs_logit": float(np.abs(xla_logits).max()),
            "argmax_agree": float(np.mean(fused_logits.argmax(-1) == xla_logits.argmax(-1))),
            "finite": bool(np.isfinite(fused_logits).all())}
        log(f"capture jax: XLA attention plain {rows * tokens / out['plain_xla']['median_s']:,.0f} tokens/s; "
            f"fused vs XLA logits {out['fused_vs_xla']}")
    return out


def matmul_rate(size: int = 8192, repeats: int = 20) -> float | None:
    """bf16 FLOP/s of a size³ matrix product on the GPU, random operands (None without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    stop.record()
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (start.elapsed_time(stop) / 1e3)


def child_capture_torch(args, work: Path) -> dict:
    import torch

    llava = llava_config(args.tiny)
    device = torch_device()
    out = {"matmul_flops_per_s": matmul_rate()}
    start = time.perf_counter()
    model = torch_model(llava)
    torch_sync()
    out.update(init_s=time.perf_counter() - start, peak_after_init=torch_peak(reset=True),
               device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
               attn_implementation=model.config._attn_implementation)
    batch = vlm_batch(llava, args.capture_batch, args.capture_tokens)
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64)).to(device)
    mask = torch.ones_like(ids)
    pixels = torch.from_numpy(batch["pixel_values"]).to(device, torch.bfloat16)

    def plain():
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=False).logits
        torch_sync()
        return logits

    out["plain_first_s"], times = timed(plain, args.repeats)
    out["plain"] = stats(times)
    out["peak_plain"] = torch_peak(reset=True)
    layers = model.model.language_model.layers
    width = model.config.text_config.intermediate_size
    state: dict = {}

    def pool(layer):
        def pre(module, inputs):
            pooled = inputs[0].float().mean(1)  # [B, I]: the input of down_proj, mean over every (real) token
            state["sum"][layer] += pooled.sum(0)
            state["sumsq"][layer] += (pooled * pooled).sum(0)
        return pre

    for i, layer in enumerate(layers):
        layer.mlp.down_proj.register_forward_pre_hook(pool(i))

    def capture():
        state["sum"] = torch.zeros(len(layers), width, dtype=torch.float32, device=device)
        state["sumsq"] = torch.zeros_like(state["sum"])
        with torch.inference_mode():
            for _ in range(args.capture_batches):
                # The decoder without the LM head: the capture needs no logits (as JAX's collect).
                model.model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=False)
        torch_sync()
        return state["sum"]

    out["capture_first_s"], times = timed(capture, args.repeats)
    out["capture"] = stats(times)
    out["peak_capture"] = torch_peak()
    out["capture_check"] = {"finite": bool(torch.isfinite(capture()).all())}
    rows, tokens = ids.shape
    log(f"capture torch: plain {rows * tokens / out['plain']['median_s']:,.0f} tokens/s, hooks "
        f"{rows * tokens * args.capture_batches / out['capture']['median_s']:,.0f} tokens/s")
    return out


# ----------------------------------------------------------------------------------------------------- train


def child_train(args, work: Path, variant: str) -> dict:
    from benchmarks.train_step import jax_train_step, random_neurons, torch_train_step

    text = text_config(llava_config(args.tiny))
    data = text_batch(text["vocab_size"], args.train_batch, args.train_tokens)
    neurons = random_neurons(text["num_hidden_layers"], text["intermediate_size"], args.per_layer)
    framework, mode = variant.split("-")
    start = time.perf_counter()
    if framework == "jax":
        lm = random_lm(text)
        out = {"device": device_name(), "init_s": time.perf_counter() - start}
        info, step = jax_train_step(lm, neurons, mode, data["input_ids"], data["token_types"],
                                    total_steps=args.repeats + 3, release=True)
        peak = jax_peak
    else:
        import torch

        model = torch_model(text)
        torch_sync()
        out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "init_s": time.perf_counter() - start}
        info, step = torch_train_step(model, neurons, data["input_ids"], data["token_types"], mode)
        peak = torch_peak
    out.update(info)
    losses = []
    out["first_step_s"], times = timed(lambda: losses.append(step()), args.repeats)
    out.update(stats(times), losses=losses, peak_device_bytes=peak(), peak_rss_kib=peak_rss_kib())
    log(f"train {variant}: {out['median_s']:.3f} s/step, peak {out['peak_device_bytes']}")
    return out


# ----------------------------------------------------------------------------------------------------- generate


def child_generate_jax(args, work: Path) -> dict:
    import jax

    from benchmarks.projection import subspaces
    from ports import generate
    from precise_jax.interventions import care_projection, projection_hook

    text = text_config(llava_config(args.tiny))
    lm = random_lm(text)
    batch = text_batch(text["vocab_size"], args.gen_batch, args.gen_prompt)
    del batch["token_types"]  # a prompt only: every prompt token is projected (the official code's placement)
    layers = [layer for layer in PROJECTION_LAYERS if layer < text["num_hidden_layers"]] or [0]
    params = care_projection(subspaces(text["hidden_size"], args.k, layers), alpha=ALPHA)
    out = {"device": device_name(), "layers": layers}
    calls, times = {}, {"none": [], "projection": []}
    for name, hook, hook_params in (("none", None, None), ("projection", projection_hook, params)):
        def call(hook=hook, hook_params=hook_params):
            result = generate(lm, batch, max_new_tokens=args.new_tokens, stop_tokens=[], pad_token=0, hook=hook,
                              hook_params=hook_params)
            return jax.block_until_ready(result.tokens)

        calls[name] = call
        out[f"{name}_first_s"] = timed(call, 0)[0]  # compiles
    for _ in range(args.repeats):  # alternate, so any drift hits both alike
        for name in times:
            times[name].append(timed(calls[name], 0)[0])
    for name in times:
        out[name] = stats(times[name])
        out[f"{name}_shape"] = list(np.shape(calls[name]()))
        log(f"generate jax {name}: {args.gen_batch * args.new_tokens / out[name]['median_s']:,.1f} tokens/s")
    out["peak_device_bytes"] = jax_peak()
    return out


def torch_projection_hook(subs: list, alpha: float):
    """A forward hook on an MLP: h' = adaptive fusion of h − α U_m U_mᵀ (h − μ_m) over the subspaces m, in
    float32, as `precise_jax.interventions.projection_hook` (every token, prefill and decode)."""
    import torch

    def hook(module, inputs, output):
        h = output.float()
        deltas = [-alpha * ((h - mu) @ u) @ u.T for u, mu in subs]
        sizes = [d.norm(dim=-1, keepdim=True) for d in deltas]
        total = sum(sizes)
        fused = sum(s / (total + 1e-8) * (h + d) for s, d in zip(sizes, deltas))
        return torch.where(total > 0, fused, h).to(output.dtype)

    return hook


def child_generate_torch(args, work: Path) -> dict:
    import torch

    from benchmarks.projection import subspaces

    text = text_config(llava_config(args.tiny))
    device = torch_device()
    model = torch_model(text)
    batch = text_batch(text["vocab_size"], args.gen_batch, args.gen_prompt)
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64)).to(device)
    layers = [layer for layer in PROJECTION_LAYERS if layer < text["num_hidden_layers"]] or [0]
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "layers": layers}

    def call():
        with torch.inference_mode():
            tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
        torch_sync()
        return tokens

    handles = []

    def projection(on: bool):
        for handle in handles:
            handle.remove()
        handles.clear()
        if on:
            for layer, subs in subspaces(text["hidden_size"], args.k, layers).items():
                tensors = [(torch.from_numpy(s.basis).to(device), torch.from_numpy(s.center).to(device))
                           for s in subs]
                mlp = model.model.layers[layer].mlp
                handles.append(mlp.register_forward_hook(torch_projection_hook(tensors, ALPHA)))

    times = {"none": [], "projection": []}
    for name in times:
        projection(name == "projection")
        out[f"{name}_first_s"] = timed(call, 0)[0]
    for _ in range(args.repeats):
        for name in times:
            projection(name == "projection")
            times[name].append(timed(call, 0)[0])
    for name in times:
        out[name] = stats(times[name])
        log(f"generate torch {name}: {args.gen_batch * args.new_tokens / out[name]['median_s']:,.1f} tokens/s")
    out["peak_device_bytes"] = torch_peak()
    return out


# ----------------------------------------------------------------------------------------------------- report


def gib(n) -> str:
    return "–" if n is None else f"{n / 2**30:.1f}"


def share(a, b) -> str:
    """a / b as a ratio, "–" where either is unknown (no GPU memory counter on CPU)."""
    return "–" if a is None or b is None else f"{a / b:.2f}"


def error_row(name: str, r: dict, columns: int) -> str | None:
    return f"| {name} | {r['error']} |" + " |" * (columns - 2) if "error" in r else None


def section_header(title: str, key: str, result: dict) -> str:
    meta, v = result["meta"], result["meta"]["versions"]
    gpu = meta["gpu"]
    device = (f"{gpu['name']} ({gpu['memory']}), driver {gpu['driver']}, CUDA {gpu['cuda']}" if gpu
              else f"no GPU ({meta['cpu_cores']} CPU cores): a --tiny rehearsal, not a measurement")
    names = ", ".join(f"{n} {v[n]}" for n in v if n != "python")
    return f"""{begin(key)}
## {title}

- date: {meta['date']}
- device: {device}; {meta['cpu_cores']} CPU cores
- versions: python {v['python']}, {names}
- command: `{meta['command']}`
- weights: random bfloat16 of the `{PRESET}` preset's architecture{' (--tiny: shrunk)' if meta['tiny'] else ''}, drawn on the device; each framework in its own process, one after another
"""


def attention_lines(jx: dict, a: dict, n: int) -> str:
    """The JAX capture child's attention kernel, its agreement with the XLA path, and the collect breakdown."""
    lines = [f"- JAX attention kernel: {jx.get('attention', 'xla (before the choice existed)')} (`ports.layers."
             "set_attention_implementation`, \"auto\": cuDNN flash attention on NVIDIA GPUs for bf16 prefill and the "
             "vision tower)"]
    if "plain_xla" in jx:
        c = jx["fused_vs_xla"]
        lines.append(f"- same JAX model with the XLA attention path: plain {n / jx['plain_xla']['median_s']:,.0f} "
                     f"tokens/s ({jx['plain_xla']['median_s'] * 1e3:.0f} ms / batch); logits, cuDNN vs XLA: max |Δ| "
                     f"{c['max_abs']:.3f} (mean {c['mean_abs']:.4f}; max |logit| {c['max_abs_logit']:.1f}), argmax "
                     f"agrees on {c['argmax_agree']:.2%} of positions, all finite: {c['finite']}")
    if "step_only" in jx:
        step = jx["step_only"]["median_s"] / a["capture_batches"]
        whole = jx["capture"]["median_s"] / a["capture_batches"]
        lines.append(f"- `collect`'s compiled step alone on inputs already on the device: {step * 1e3:.0f} ms / batch "
                     f"({n / step:,.0f} tokens/s); the rest of a `collect` call (host loop, transfers, state set-up) "
                     f"{(whole - step) * 1e3:.1f} ms / batch")
    if "step_one_site" in jx:
        one = jx["step_one_site"]["median_s"] / a["capture_batches"]
        lines.append(f"- the same step capturing only the last layer's `mlp.act`: {one * 1e3:.0f} ms / batch; "
                     f"capturing and pooling the other sites costs {(step - one) * 1e3:.1f} ms / batch")
    return "\n".join(lines)


def capture_markdown(result: dict) -> str:
    jx, pt, a = result["runs"]["jax"], result["runs"]["torch"], result["args"]
    n = a["capture_batch"] * a["capture_tokens"]
    llava = llava_config(result["meta"]["tiny"])
    side, patch = llava["vision_config"]["image_size"], llava["vision_config"]["patch_size"]
    layers = text_config(llava)["num_hidden_layers"]
    if "error" in jx or "error" in pt:
        body = "\n".join(f"- {k}: {r['error']}" for k, r in (("JAX", jx), ("PyTorch", pt)) if "error" in r)
    else:
        rate = pt["matmul_flops_per_s"]
        mfu = lambda flops, s: f"{flops / s / rate:.1%}" if rate else "–"  # noqa: E731
        rows = []
        for name, r, peak_plain, peak_capture in (
                ("JAX port (jit) / `collect`", jx, jx["peak_after_plain"], jx["peak_after_capture"]),
                ("PyTorch eager (sdpa) / hooks", pt, pt["peak_plain"], pt["peak_capture"])):
            plain_s, capture_s = r["plain"]["median_s"], r["capture"]["median_s"] / a["capture_batches"]
            rows.append(
                f"| {name} | {n / plain_s:,.0f} | {mfu(jx['flops_plain'], plain_s)} | {plain_s * 1e3:.0f} "
                f"[{r['plain']['q1_s'] * 1e3:.0f}, {r['plain']['q3_s'] * 1e3:.0f}] | {gib(peak_plain)} | "
                f"{n / capture_s:,.0f} | {mfu(jx['flops_capture'], capture_s)} | {capture_s * 1e3:.0f} | "
                f"{gib(peak_capture)} |")
        ratio_plain = pt["plain"]["median_s"] / jx["plain"]["median_s"]
        ratio_capture = pt["capture"]["median_s"] / jx["capture"]["median_s"]
        body = f"""| framework | plain tokens/s | plain MFU | plain ms / batch [IQR] | plain peak GiB | capture tokens/s | capture MFU | capture ms / batch | peak GiB after capture |
|---|---:|---:|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

- **JAX / PyTorch: plain {ratio_plain:.2f}×, capture {ratio_capture:.2f}×** (target: capture ≥ 1.2×)
- MFU: model FLOPs ({jx['flops_plain'] / n / 1e9:.2f} GFLOP/token with the LM head, {jx['flops_capture'] / n / 1e9:.2f} without: 2 × parameters × tokens for every matrix product, vision tower per image token, decoder attention causal) over the bf16 8192³ matrix-product rate measured in the PyTorch child, {rate / 1e12 if rate else float('nan'):.0f} TFLOP/s
- JAX compile: plain forward {jx['plain_compile_s']:.1f} s; first `collect` call {jx['capture_first_s']:.1f} s (compiles the capture step). Random init: JAX {jx['init_s']:.1f} s, PyTorch {pt['init_s']:.1f} s
- JAX peak is cumulative over the process (weights, then the plain forward, then capture); PyTorch's is reset between phases; weights alone: JAX {gib(jx['peak_after_init'])} GiB, PyTorch {gib(pt['peak_after_init'])} GiB
- checks: statistics finite in both; JAX counted {jx['capture_check']['count']} pooled rows per pass
{attention_lines(jx, a, n)}"""
    return section_header(
        f"GPU: activation capture, LLaVA-1.5-7B prefill {a['capture_batch']} × {a['capture_tokens']} tokens, "
        "bf16", "gpu capture", result) + f"""- input: {a['capture_batch']} rows × {a['capture_tokens']} tokens, each [BOS, {(side // patch) ** 2} image tokens, random text]; random pixel_values [{a['capture_batch']}, 3, {side}, {side}] (bf16); no padding
- plain: the whole model with logits (JAX: jitted `model.apply`, AOT-compiled; PyTorch: `LlavaForConditionalGeneration` under `inference_mode`, `use_cache=False`)
- capture: `lm.layers.{{0..{layers - 1}}}.mlp.act` (the input of `down_proj`) mean-pooled per row over every token into streaming mean / variance (float32). JAX: `precise_jax.capture.collect(lm, batches, sites, positions="all", pool="mean", stats=True)` over {a['capture_batches']} batches per call, whole calls timed (host work included); PyTorch: `model.model(...)` (no LM head) with forward pre-hooks on every `down_proj` summing the pooled rows and their squares, {a['capture_batches']} batches per timed pass
- median of {a['repeats']} timed calls after one untimed call

{body}
{end('gpu capture')}
"""


def train_markdown(result: dict) -> str:
    runs, a = result["runs"], result["args"]
    n = a["train_batch"] * a["train_tokens"]
    lines = []
    for name in VARIANTS["train"]:
        r = runs[name]
        row = error_row(name, r, 7)
        if row is None:
            compile_s = f"{r['lower_s'] + r['compile_s']:.1f}" if "compile_s" in r else "–"
            row = (f"| {name} | {r['median_s'] * 1e3:.0f} [{r['q1_s'] * 1e3:.0f}, {r['q3_s'] * 1e3:.0f}] | "
                   f"{n / r['median_s']:,.0f} | {gib(r['peak_device_bytes'])} | {r['trainable']:,} "
                   f"({r['trainable'] / r['total_params']:.4%}) | {compile_s} | "
                   f"{r['losses'][0]:.4f} → {r['losses'][-1]:.4f} |")
        lines.append(row)
    ratios = []
    base = runs.get("torch-masked", {})
    for name in ("jax-lean", "jax-full"):
        r = runs[name]
        if "error" not in r and "error" not in base:
            ratios.append(f"- **{name}: {r['median_s'] / base['median_s']:.2f}× the PyTorch masked step's time, "
                          f"{share(r['peak_device_bytes'], base['peak_device_bytes'])}× its peak memory**")
    full = runs.get("torch-full", {})
    if "error" not in runs["jax-full"] and "error" not in full:
        ratios.append(f"- jax-full vs torch-full: {runs['jax-full']['median_s'] / full['median_s']:.2f}× the time, "
                      f"{share(runs['jax-full']['peak_device_bytes'], full['peak_device_bytes'])}× the peak memory")
    from benchmarks.train_step import LR, MAX_NORM, WEIGHT_DECAY

    return section_header(
        f"GPU: masked-SFT AdamW step, Llama-2-7B shape (LLaVA-1.5-7B's language model), {a['train_batch']} × "
        f"{a['train_tokens']} tokens, bf16", "gpu train", result) + f"""- input: random token ids; the second half of each row is the reply (the loss); no padding
- neurons: {a['per_layer']} random neurons in each layer; trained entries: their gate/up columns and down rows
- step: forward + backward + clip by global norm {MAX_NORM} + AdamW (lr {LR}, decoupled weight decay {WEIGHT_DECAY} on matrices / trained entries), optimizer state in the parameters' dtype (bf16) on both sides. JAX: `precise_jax.train.make_plan` + `make_step` (one jitted, donated step), `train_step.jax_train_step`; full mode keeps one copy of the weights (the caller's copy is freed). PyTorch (`train_step.torch_train_step`): masked = only the MLP matrices require grad, gradients masked by `register_hook` with row/column masks, decay by hand on the trained entries, `torch.optim.AdamW`; full = every parameter, AdamW's decay on matrices
- median of {a['repeats']} timed steps after one untimed step; peak device memory of the whole process

| variant | ms / step: median [IQR] | tokens/s | peak GiB | trained params | compile s | loss: first → last |
|---|---|---:|---:|---:|---:|---|
{chr(10).join(lines)}

{chr(10).join(ratios)}
- target: lean ≤ 0.8× the PyTorch masked step's time and ≤ 0.5× its memory
{end('gpu train')}
"""


def eigh_markdown(result: dict) -> str:
    jx, pt, a, meta = result["runs"]["jax"], result["runs"]["torch"], result["args"], result["meta"]
    ref = result.get("reference", {})
    lines = []
    for d in a["dims"]:
        if "error" in jx or "error" in pt:
            lines.append(f"| {d} | {jx.get('error', '')} {pt.get('error', '')} |" + " |" * 7)
            continue
        j, t = jx["dims"][str(d)], pt["dims"][str(d)]
        med = lambda ts: f"{np.median(ts) * 1e3:.0f}"  # noqa: E731
        err = lambda r: (f"{r['eig_rel_err']:.1e} / {r['max_sine']:.1e}" if "eig_rel_err" in r else "–")  # noqa
        lines.append(f"| {d} | {med(j['public_s'])} | {med(j['core_s'])} (compile {j['compile_s']:.1f} s) | "
                     f"{med(j['eigh_only_s'])} | {med(t['times_s'])} | {med(t['eigh_only_s'])} | "
                     f"{np.median(t['times_s']) / np.median(j['public_s']):.2f}× | {err(j)} | {err(t)} |")
    reference = (f"- float64 reference: `scipy.linalg.eigh(A, B')` at d = {ref['reference_d']} on the machine's "
                 f"{ref['cpu_cores']} CPU cores took {ref['scipy_float64_s']:.1f} s; errors are over the top "
                 f"k = {a['k']} pairs: max relative eigenvalue error / largest sine of the principal angles"
                 if ref else "- no float64 reference")
    return section_header("GPU: generalized eigen-decomposition (CARE subspaces), float32", "gpu eigh", result) + \
        f"""- problem: `benchmarks/eigh.py`'s covariances (Σ_mal from 720, Σ_ben from 360 seeded Gaussian activations, Σ_ben singular), shrinkage γ = 0.1; full decomposition
- JAX: `precise_jax.subspace.generalized_eigh(a, b, shrinkage=0.1)` (public call: input checks on the device, jitted Cholesky route at highest precision, positive-definiteness check) and its jitted core alone (AOT); PyTorch: the same Cholesky route (`cholesky`, two `solve_triangular`, `eigh`, back-solve) in float32, TF32 off; "eigh only": the symmetric `eigh` of a d × d matrix alone, where most of the time goes
{reference}
- median of {a['repeats']} timed calls after one untimed call, ms

| d | JAX `generalized_eigh`, ms | JAX jitted core, ms | JAX eigh only, ms | PyTorch route, ms | PyTorch eigh only, ms | PyTorch / JAX | JAX err vs float64 | PyTorch err vs float64 |
|---:|---:|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(lines)}

- target: ≤ 100 ms at d = 4096; meta: {meta['gpu'].get('name', 'no GPU')}
{end('gpu eigh')}
"""


def generate_markdown(result: dict) -> str:
    runs, a = result["runs"], result["args"]
    n = a["gen_batch"] * a["new_tokens"]
    lines, notes = [], []
    for framework, label in (("jax", "JAX `ports.generate` (jit, KV cache)"), ("torch", "PyTorch HF `generate`")):
        r = runs[framework]
        if "error" in r:
            lines.append(f"| {label} | {r['error']} | | | | |")
            continue
        none, proj = r["none"]["median_s"], r["projection"]["median_s"]
        lines.append(f"| {label} | {n / none:,.0f} | {n / proj:,.0f} | {none:.3f} | {proj:.3f} | "
                     f"{proj / none - 1:+.1%} |")
        notes.append(f"{framework} first calls (compile / warm-up): {r['none_first_s']:.1f} s without, "
                     f"{r['projection_first_s']:.1f} s with projection; peak {gib(r['peak_device_bytes'])} GiB")
    if "error" not in runs["jax"] and "error" not in runs["torch"]:
        notes.append(f"JAX / PyTorch generation speed: {runs['torch']['none']['median_s'] / runs['jax']['none']['median_s']:.2f}× "
                     f"without projection, {runs['torch']['projection']['median_s'] / runs['jax']['projection']['median_s']:.2f}× with")
    return section_header(
        f"GPU: generation with CARE's projection, Llama-2-7B shape, {a['gen_batch']} × {a['new_tokens']} new tokens, "
        "bf16", "gpu generate", result) + f"""- input: {a['gen_batch']} random prompts of {a['gen_prompt']} tokens, greedy, exactly {a['new_tokens']} new tokens per row (no stop token), tokens/s = generated tokens over the whole call (prefill included)
- projection: visual + text subspace (k = {a['k']} each, random orthonormal / unit columns, random centre; `benchmarks/projection.py`'s `subspaces`) at `mlp.out` of layers {', '.join(map(str, runs['jax'].get('layers', PROJECTION_LAYERS)))}, α = {ALPHA}, adaptive fusion, float32, every token at prefill and every decode step. JAX: `care_projection` + `projection_hook`; PyTorch: a forward hook on those MLPs with the same formula
- median of {a['repeats']} timed calls after one untimed call; the two configurations alternate

| framework | tokens/s, none | tokens/s, projection | s / call, none | s / call, projection | projection overhead |
|---|---:|---:|---:|---:|---:|
{chr(10).join(lines)}

{chr(10).join('- ' + s for s in notes)}
- target: ≤ 5 % overhead
{end('gpu generate')}
"""


MARKDOWN = {"capture": capture_markdown, "train": train_markdown, "eigh": eigh_markdown,
            "generate": generate_markdown}


# ----------------------------------------------------------------------------------------------------- main


CHILDREN = {("eigh", "jax"): child_eigh_jax, ("eigh", "torch"): child_eigh_torch,
            ("capture", "jax"): child_capture_jax, ("capture", "torch"): child_capture_torch,
            ("generate", "jax"): child_generate_jax, ("generate", "torch"): child_generate_torch}


def child(args) -> None:
    part, variant = args.child.split(":")
    work = Path(args.work)
    saved = json.loads((work / "args.json").read_text())
    for key, value in saved.items():
        setattr(args, key, value)
    fn = CHILDREN.get((part, variant)) or functools.partial(child_train, variant=variant)
    log(f"{part}/{variant}: start")
    start = time.perf_counter()
    out = fn(args, work)
    out["child_s"] = time.perf_counter() - start
    (work / f"{part}-{variant}.json").write_text(json.dumps(out))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--out", help="folder for PART.json results (default: a temporary folder)")
    p.add_argument("--tiny", action="store_true", help="shrunk presets and sizes: a quick CPU rehearsal")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--capture-batch", type=int, default=8)
    p.add_argument("--capture-tokens", type=int, default=1024)
    p.add_argument("--capture-batches", type=int, default=4, help="batches per timed capture call")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-tokens", type=int, default=512)
    p.add_argument("--per-layer", type=int, default=10, help="random neurons per layer (train)")
    p.add_argument("--train-variants", nargs="+", choices=VARIANTS["train"], default=list(VARIANTS["train"]))
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--gen-prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=256, help="subspace width (generate) and eigenpairs compared (eigh)")
    p.add_argument("--dims", type=int, nargs="+", default=[3584, 4096])
    p.add_argument("--child-timeout", type=int, default=420, help="seconds before a child is given up")
    p.add_argument("--report", help="render BENCHMARKS.md sections from the PART.json files in this folder")
    p.add_argument("--write", action="store_true", help="replace the parts' sections of BENCHMARKS.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        defaults = {k: p.get_default(k) for k in TINY_SIZES}
        for key, value in TINY_SIZES.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    return args


def report(folder: Path, write: bool) -> None:
    for part in PARTS:
        path = folder / f"{part}.json"
        if path.exists():
            section = MARKDOWN[part](json.loads(path.read_text()))
            print(section)
            if write:
                replace_section(f"gpu {part}", section)


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        child(args)
        return 0
    if args.report:
        report(Path(args.report), args.write)
        return 0
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    shown = sys.argv[1:] if argv is None else list(argv)
    meta = {"date": utc_now(), "gpu": gpu_description(), "cpu_cores": os.cpu_count(), "tiny": args.tiny,
            "versions": versions(("jax", "jaxlib", "flax", "optax", "torch", "transformers", "scipy")),
            "command": "PYTHONPATH=. python benchmarks/gpu.py " + shlex.join(shown)}
    # JAX takes device memory as it needs it (so its peak is its own) and may use nearly all of it.
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95",
           "TOKENIZERS_PARALLELISM": "false"}
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "work", "report", "write", "out")}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-work-") as tmp:
        work = Path(tmp)
        (work / "args.json").write_text(json.dumps(settings))
        for part in args.parts:
            log(f"part {part}")
            result = {"meta": meta, "args": settings, "runs": {}}
            if part == "eigh":
                result["reference"] = eigh_problems(args, work)
            variants = args.train_variants if part == "train" else VARIANTS[part]
            for variant in variants:
                command = [sys.executable, str(Path(__file__).resolve()), "--child", f"{part}:{variant}",
                           "--work", str(work)]
                result["runs"][variant] = run_child(f"{part}-{variant}", command, work, env,
                                                    timeout=args.child_timeout)
                if "error" in result["runs"][variant]:
                    log(f"{part}/{variant} failed: {result['runs'][variant]['error']}")
            for variant in VARIANTS[part]:
                result["runs"].setdefault(variant, {"error": "not run"})
            (out / f"{part}.json").write_text(json.dumps(result, indent=1))
            print(MARKDOWN[part](result), flush=True)
    if args.write:
        report(out, True)
    log(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
