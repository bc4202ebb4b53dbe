"""Where the CPU forward's time goes: the JAX port's XLA thunks vs PyTorch eager's ATen ops, grouped by model part.

    PYTHONPATH=. .venv/bin/python benchmarks/forward_profile.py [--threads 1] [--repeats 3] [--xla-flags "..."]

The forward of `forward.py` (real SmolLM2-135M-Instruct, float32, batch 8 × 256 tokens of real text). One process
holds both frameworks, pinned to `--threads` CPUs, and alternates them: one JAX forward under `jax.profiler.trace`
(every XLA thunk, a fusion or a library call, is an event named after its HLO instruction; the instruction's
`op_name` metadata says which module it came from), then one PyTorch forward under `torch.profiler` (each ATen op
with its input shapes), `--repeats` times. Events are summed into model parts and averaged over the repeats.
XLA fuses the rotary embedding into the transposes that lay keys and queries out for the attention products, so
the two are one part on both sides. Profilers time wall clock: on a shared machine compare the shares (%) and the
alternated totals, and read the CPU seconds of each framework's forwards next to them.

Prints a Markdown table (ms per forward and % of the profiled total, per part) and the FLOPs per part.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import loadavg, logger, parent_setup  # noqa: E402
from benchmarks.forward import real_text_ids  # noqa: E402

log = logger("forward_profile")

PARTS = (
    "embedding", "RMSNorm (61)", "q, k, v, o projections", "rotary + head layout copies", "attention core (QKᵀ, "
    "mask, softmax, PV)", "MLP gate + up", "MLP silu(gate) · up", "MLP down", "residual adds", "LM head", "other",
)
EMBED, NORM, PROJ, ROTARY, CORE, GATE_UP, ACT, DOWN, RESID, HEAD, OTHER = PARTS


# ----------------------------------------------------------------------------------------------------- JAX side


def jax_part(op_name: str) -> str:
    """The model part of an HLO instruction, from its `op_name` metadata (the flax module path + the jax op)."""
    if "embed_tokens" in op_name:
        return EMBED
    if re.search(r"layernorm|/lm/norm/", op_name):
        return NORM
    if re.search(r"[qkvo]_proj/", op_name):
        return PROJ
    if "gate_proj/" in op_name or "up_proj/" in op_name:
        return GATE_UP
    if "down_proj/" in op_name:
        return DOWN
    if "/mlp/" in op_name:
        return ACT
    if "head" in op_name:
        return HEAD
    if "/self_attn/" in op_name:
        # the two products (einsum specs) and the softmax's pieces; the rest are rotary and layout copies
        core = re.search(r"->|_where|select_n|reduce_max|reduce_sum|/exp|/div|/sub|softmax|stop_gradient", op_name)
        return CORE if core else ROTARY
    if re.search(r"layers_\d+/add", op_name):
        return RESID
    return OTHER


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """instruction name -> op_name for the entry computation's instructions (the thunks that run)."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    names = {}
    for line in entry.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            names[m.group(1)] = op.group(1) if op else ""
    return names


def jax_profiled(step, hlo_text: str, trace_dir: str) -> dict[str, float]:
    """One traced call of `step`: ms per part."""
    import jax

    with jax.profiler.trace(trace_dir):
        step()
    pb = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    op_names = hlo_op_names(hlo_text)
    parts: dict[str, float] = collections.defaultdict(float)
    for plane in jax.profiler.ProfileData.from_file(pb).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in op_names:
                    parts[jax_part(op_names[event.name])] += event.duration_ns / 1e6
    return parts


# ----------------------------------------------------------------------------------------------------- PyTorch side


def torch_part(name: str, shapes: list) -> str | None:
    """The model part of one ATen op of HF's LlamaForCausalLM (sdpa) from its name and input shapes; None for the
    ops that only wrap others (their children are counted)."""
    dims = [tuple(s) for s in shapes if isinstance(s, (list, tuple))]
    first = dims[0] if dims else ()
    if name in ("aten::mm", "aten::addmm"):
        n = dims[-1][-1] if dims else 0
        k = dims[-1][0] if dims else 0
        if n > 10_000:
            return HEAD
        if n == 1536 or (k == 576 and n > 1000):
            return GATE_UP
        if k == 1536:
            return DOWN
        return PROJ
    if "scaled_dot_product" in name:
        return CORE
    if name in ("aten::embedding", "aten::index_select"):
        return EMBED
    if name == "aten::silu" or (name == "aten::mul" and first and first[-1] == 1536):
        return ACT
    if len(first) == 4 or name in ("aten::cat", "aten::neg", "aten::slice"):
        return ROTARY  # q/k layout and rotate_half
    if name in ("aten::pow", "aten::mean", "aten::rsqrt", "aten::sum", "aten::div_", "aten::_to_copy"):
        return NORM
    if name == "aten::mul" and first and len(first) in (1, 3):
        return NORM
    if name == "aten::add" and first and len(first) == 3:
        return RESID if len(dims) > 1 and dims[1] == first else NORM
    return OTHER


def torch_profiled(step) -> dict[str, float]:
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    parts: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        part = torch_part(event.name, event.input_shapes)
        if part is not None:
            parts[part] += event.self_cpu_time_total / 1e3
    return parts


# ----------------------------------------------------------------------------------------------------- FLOPs


def flops(c: dict, batch: int, tokens: int) -> dict[str, float]:
    """GFLOP per forward of each part (2 per multiply-add; attention products over all T × T scores, as both
    frameworks compute them here)."""
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    h, k, layers = c["num_attention_heads"], c["num_key_value_heads"], c["num_hidden_layers"]
    e = c.get("head_dim") or d // h
    n = batch * tokens
    g = lambda x: 2 * x / 1e9  # noqa: E731
    return {
        PROJ: g(n * d * (2 * h * e + 2 * k * e)) * layers,
        CORE: g(2 * batch * h * tokens * tokens * e) * layers,
        GATE_UP: g(n * d * 2 * f) * layers,
        DOWN: g(n * f * d) * layers,
        HEAD: g(n * d * v),
    }


# ----------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", help="a Hugging Face folder (default: the real SmolLM2-135M-Instruct)")
    p.add_argument("--xla-flags", help="XLA_FLAGS for JAX (set before it is imported; default: inherited)")
    args = p.parse_args(argv)
    if args.xla_flags is not None:
        os.environ["XLA_FLAGS"] = args.xla_flags
    cpus = parent_setup(args)

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from ports.pretrained import load_pretrained

    torch.set_num_threads(args.threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    ids = real_text_ids(tokenizer, args.batch, args.tokens)
    lm = load_pretrained(args.model, jnp.float32)
    j_ids = jnp.asarray(ids)
    j_mask = jnp.ones_like(j_ids)
    compiled = jax.jit(
        lambda params, i, m: lm.model.apply({"params": params}, input_ids=i, attention_mask=m).logits
    ).lower(lm.params, j_ids, j_mask).compile()
    hlo = compiled.as_text()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                              attn_implementation="sdpa").eval()
    t_ids = torch.from_numpy(ids.astype(np.int64))
    t_mask = torch.ones_like(t_ids)

    def jax_step():
        return compiled(lm.params, j_ids, j_mask).block_until_ready()

    def torch_step():
        with torch.inference_mode():
            return model(input_ids=t_ids, attention_mask=t_mask, use_cache=False).logits

    jl, tl = np.asarray(jax_step()), torch_step().numpy()
    log(f"warm; logits max rel err {np.abs(jl - tl).max() / np.abs(tl).max():.2e}; load average {loadavg()}")
    load_before = loadavg()
    sums = {"jax": collections.defaultdict(float), "torch": collections.defaultdict(float)}
    times = {"jax": [], "torch": [], "jax_cpu": [], "torch_cpu": []}
    with tempfile.TemporaryDirectory(prefix="forward-profile-") as tmp:
        for r in range(args.repeats):
            for name in (("jax", "torch") if r % 2 == 0 else ("torch", "jax")):
                step = jax_step if name == "jax" else torch_step
                c0, t0 = time.process_time(), time.perf_counter()
                step()  # unprofiled, for the totals
                times[name].append(time.perf_counter() - t0)
                times[f"{name}_cpu"].append(time.process_time() - c0)
                parts = jax_profiled(jax_step, hlo, os.path.join(tmp, str(r))) if name == "jax" \
                    else torch_profiled(torch_step)
                for part, ms in parts.items():
                    sums[name][part] += ms / args.repeats
            log(f"repeat {r + 1}/{args.repeats}: jax {times['jax'][-1]:.2f} s, torch {times['torch'][-1]:.2f} s")
    load_after = loadavg()

    gflop = flops(transformers.AutoConfig.from_pretrained(args.model).to_dict(), args.batch, args.tokens)
    total = {n: sum(sums[n].values()) for n in sums}
    print(f"\nprofile, float32, batch {args.batch} × {args.tokens}, {args.threads} thread(s) on CPUs "
          f"{','.join(map(str, cpus))}, XLA_FLAGS={os.environ.get('XLA_FLAGS') or '(unset)'}, "
          f"{args.repeats} profiled forwards each, load average {load_before} before, {load_after} after")
    print("unprofiled forwards alternating with them: "
          + ", ".join(f"{n} median {np.median(times[n]):.2f} s wall, {np.median(times[n + '_cpu']):.2f} CPU s"
                      for n in ("jax", "torch"))
          + f"; JAX / PyTorch throughput {np.median(times['torch']) / np.median(times['jax']):.2f}×, "
          f"by CPU s {np.median(times['torch_cpu']) / np.median(times['jax_cpu']):.2f}×\n")
    print("| part | GFLOP | JAX ms | JAX % | PyTorch ms | PyTorch % | JAX / PyTorch time | JAX GFLOP/s | "
          "PyTorch GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for part in PARTS:
        j, t = sums["jax"].get(part, 0.0), sums["torch"].get(part, 0.0)
        if not j and not t:
            continue
        gf = gflop.get(part)
        rate = lambda ms: f"{gf / ms * 1e3:.0f}" if gf and ms else "–"  # noqa: E731
        print(f"| {part} | {f'{gf:.1f}' if gf else '–'} | {j:,.0f} | {100 * j / total['jax']:.1f} | {t:,.0f} | "
              f"{100 * t / total['torch']:.1f} | {j / t if t else float('nan'):.2f} | {rate(j)} | {rate(t)} |")
    print(f"| **total (profiled)** | {sum(gflop.values()):.1f} | {total['jax']:,.0f} | 100 | {total['torch']:,.0f} "
          f"| 100 | {total['jax'] / total['torch']:.2f} | {sum(gflop.values()) / total['jax'] * 1e3:.0f} | "
          f"{sum(gflop.values()) / total['torch'] * 1e3:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
