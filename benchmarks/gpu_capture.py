"""GPU benchmark: activation capture on LLaVA-1.5-7B, JAX `collect` vs PyTorch forward hooks, with MFU.

    PYTHONPATH=. python benchmarks/gpu_capture.py --out DIR
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_capture.py --tiny --out /tmp/gpu-tiny     # a CPU rehearsal
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_capture.py --report DIR --write           # DIR/capture.json -> BENCHMARKS.md

LLaVA-1.5-7B prefill of `--capture-batch` × `--capture-tokens` tokens (576 image tokens per row, real-sized random
pixel_values): plain forward (logits) tokens/s, then `mlp.act` of all 32 layers mean-pooled per row into streaming
mean/variance: `precise_jax.capture.collect` over `--capture-batches` batches vs `LlavaForConditionalGeneration`
(bf16, sdpa) with forward pre-hooks on every `down_proj` doing the same reduction; MFU against the bf16
matrix-product rate measured in the same run.

Random bfloat16 weights of the presets drawn on the device, one child process per framework: see the GPU section
of `common.py`. Results go to `--out`/capture.json as soon as the benchmark ends, and its BENCHMARKS.md section is
printed (replaced with `--write`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    GpuBenchmark, device_name, end, flop_parts, gib, jax_peak, llava_config, logger, random_lm, run_gpu_benchmark,
    section_header, stats, text_config, timed, torch_device, torch_model, torch_peak, torch_sync, vlm_batch,
)

log = logger("gpu_capture")


def forward_flops(params, config, rows: int, tokens: int, head: bool) -> float:
    """Model FLOPs of one LLaVA prefill (`common.flop_parts`: decoder per token, causal attention, vision tower per
    image token, projector per image feature), with the LM head if `head`."""
    parts = flop_parts(params, config, rows, tokens)
    return float(sum(value for name, value in parts.items() if head or name != "head"))


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


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--capture-batch", type=int, default=8)
    p.add_argument("--capture-tokens", type=int, default=1024)
    p.add_argument("--capture-batches", type=int, default=4, help="batches per timed capture call")


BENCHMARK = GpuBenchmark("capture", {"jax": child_capture_jax, "torch": child_capture_torch}, capture_markdown,
                         options, tiny=dict(capture_batch=2, capture_tokens=32, capture_batches=2, repeats=2))


if __name__ == "__main__":
    raise SystemExit(run_gpu_benchmark(BENCHMARK, __doc__, __file__))
