"""GPU benchmark: one masked-SFT AdamW step on a 7B language model, the JAX trainer vs PyTorch, time and memory.

    PYTHONPATH=. python benchmarks/gpu_train.py --out DIR
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_train.py --tiny --out /tmp/gpu-tiny     # a CPU rehearsal
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_train.py --report DIR --write           # DIR/train.json -> BENCHMARKS.md

One step at `--train-batch` × `--train-tokens` tokens on LLaVA-1.5-7B's language model (Llama-2-7B shape):
`precise_jax.train` lean and full modes vs PyTorch masked (MLP matrices require grad, gradient masks by hooks) and
full, via `train_step.py`'s step builders.

Random bfloat16 weights of the presets drawn on the device, one child process per framework: see the GPU section
of `common.py`. Results go to `--out`/train.json as soon as the benchmark ends, and its BENCHMARKS.md section is
printed (replaced with `--write`).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    GpuBenchmark, device_name, end, gib, jax_peak, llava_config, logger, peak_rss_kib, random_lm, run_gpu_benchmark,
    section_header, share, stats, text_batch, text_config, timed, torch_model, torch_peak, torch_sync,
)

log = logger("gpu_train")


VARIANTS = ("jax-lean", "jax-full", "torch-masked", "torch-full")


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


def error_row(name: str, r: dict, columns: int) -> str | None:
    return f"| {name} | {r['error']} |" + " |" * (columns - 2) if "error" in r else None


def train_markdown(result: dict) -> str:
    runs, a = result["runs"], result["args"]
    n = a["train_batch"] * a["train_tokens"]
    lines = []
    for name in VARIANTS:
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


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-tokens", type=int, default=512)
    p.add_argument("--per-layer", type=int, default=10, help="random neurons per layer")
    p.add_argument("--train-variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))


BENCHMARK = GpuBenchmark("train", {v: functools.partial(child_train, variant=v) for v in VARIANTS}, train_markdown,
                         options, tiny=dict(train_batch=2, train_tokens=32, per_layer=4, repeats=2),
                         chosen=lambda args: args.train_variants)


if __name__ == "__main__":
    raise SystemExit(run_gpu_benchmark(BENCHMARK, __doc__, __file__))
