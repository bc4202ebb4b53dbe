"""GPU benchmark: greedy KV-cache generation on a 7B language model without and with CARE's projection, JAX vs PyTorch.

    PYTHONPATH=. python benchmarks/gpu_generate.py --out DIR
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_generate.py --tiny --out /tmp/gpu-tiny     # a CPU rehearsal
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_generate.py --report DIR --write           # DIR/generate.json -> BENCHMARKS.md

`--gen-batch` rows × `--new-tokens` tokens on LLaVA-1.5-7B's language model (Llama-2-7B shape), without and with
CARE's projection (visual + text subspace of k = `--k` at `mlp.out` of layers 12-14, α = 4, adaptive fusion, every
token): `ports.generate` + `precise_jax.interventions.projection_hook` vs HF `generate` with a forward hook applying
the same formula.

Random bfloat16 weights of the presets drawn on the device, one child process per framework: see the GPU section
of `common.py`. Results go to `--out`/generate.json as soon as the benchmark ends, and its BENCHMARKS.md section is
printed (replaced with `--write`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    GpuBenchmark, device_name, end, gib, jax_peak, llava_config, logger, random_lm, run_gpu_benchmark, section_header,
    stats, text_batch, text_config, timed, torch_device, torch_model, torch_peak, torch_sync,
)

log = logger("gpu_generate")


PROJECTION_LAYERS = (12, 13, 14)
ALPHA = 4.0


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


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--gen-prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=256, help="subspace width")


BENCHMARK = GpuBenchmark("generate", {"jax": child_generate_jax, "torch": child_generate_torch}, generate_markdown,
                         options, tiny=dict(gen_batch=2, gen_prompt=8, new_tokens=8, k=8, repeats=2))


if __name__ == "__main__":
    raise SystemExit(run_gpu_benchmark(BENCHMARK, __doc__, __file__))
