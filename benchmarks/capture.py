"""Activation capture: throughput of `precise_jax.capture.collect` vs PyTorch forward hooks, and flat memory.

    PYTHONPATH=. .venv/bin/python benchmarks/capture.py [--examples 64] [--batch 8] [--repeats 2]
        [--model HF_FOLDER] [--threads N] [--memory-batches 1000] [--write]

1. Throughput. N real prompts (half JBB-Behaviors goals, half AlpacaEval instructions, through the chat
   template, `make_batches` with batch `--batch`, left-padded to bucket lengths) go through the real
   SmolLM2-135M-Instruct; every layer's `lm.layers.{l}.mlp.act` (the input of `mlp.down_proj`) is mean-pooled
   over the prompt tokens (`positions="prompt"`) and reduced to streaming statistics (mean / variance).
   JAX: `collect(lm, batches, sites, positions="prompt", pool="mean", stats=True)`. PyTorch: HF
   `LlamaForCausalLM.from_pretrained(folder)`, calling `model.model(...)` (the decoder without the LM head:
   the capture needs no logits), forward pre-hooks on every `mlp.down_proj` pooling its input over the same
   prompt-token masks, running sum and sum of squares in float64. Each framework runs in its own child process,
   both pinned to the same CPUs with the same thread count; one untimed warm-up pass over all batches (JAX: it
   compiles one executable per bucket shape, timed separately), then `--repeats` timed passes, the two
   frameworks' passes alternating. The two sets of pooled means and variances are compared.
2. Flat memory. A `collect` run of `--memory-batches` batches (8 × 32 random token ids) on a tiny random Llama
   (4 layers, d=64), all four `mlp.act` sites with streaming statistics, covariance on one; the child's RSS is
   read as batches 10, 100, 500 and 1000 have been handed to `collect` and after the last one.

Progress goes to stderr, the results table to stdout; `--write` also replaces this configuration's section
of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    Child, begin as _begin, child_env, cpu_detail, cpu_model, end as _end, loadavg, logger, parent_setup, peak_rss_kib,
    protocol_stream, replace_section, rss_kib, serve_runs, stats, versions,
)

MEMORY_MARKS = (10, 100, 500, 1000)


log = logger("capture")


def load_batches(work: Path) -> list[dict]:
    data = np.load(work / "batches.npz")
    n = int(data["count"])
    keys = ("input_ids", "attention_mask", "token_types", "row_valid", "mask")
    return [{k: data[f"{k}_{i}"] for k in keys} for i in range(n)]


# ----------------------------------------------------------------------------------------------------- children


def setup_jax(args, batches):
    import jax
    import jax.numpy as jnp

    from ports.pretrained import load_pretrained
    from precise_jax.capture import collect

    jnp.zeros(()).block_until_ready()
    rss_imports = rss_kib()
    t0 = time.perf_counter()
    lm = load_pretrained(args.model, jnp.float32)
    jax.block_until_ready(lm.params)
    info = {"framework": "jax", "load_s": time.perf_counter() - t0, "rss_after_imports_kib": rss_imports,
            "rss_after_load_kib": rss_kib(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    layers = lm.hf_config["num_hidden_layers"]
    sites = tuple(f"lm.layers.{l}.mlp.act" for l in range(layers))
    inputs = [{k: b[k] for k in ("input_ids", "attention_mask", "token_types", "row_valid")} for b in batches]

    def step():
        out = collect(lm, inputs, sites, positions="prompt", pool="mean", stats=True, progress=False)
        return jax.block_until_ready(out.stats)

    def result(moments):
        return {"mean": np.stack([np.asarray(moments[s].mean, np.float64) for s in sites]),
                "var": np.stack([np.asarray(moments[s].variance(), np.float64) for s in sites]),
                "count": int(moments[sites[0]].count)}

    return info, step, result


def setup_torch(args, batches):
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    rss_imports = rss_kib()
    t0 = time.perf_counter()
    model = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()
    info = {"framework": "torch", "load_s": time.perf_counter() - t0, "rss_after_imports_kib": rss_imports,
            "rss_after_load_kib": rss_kib(), "torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads(),
            "attn_implementation": model.config._attn_implementation}
    layers = model.model.layers
    tensors = []
    for b in batches:
        am = b["attention_mask"].astype(np.int64)
        positions = np.where(am == 1, np.cumsum(am, 1) - 1, 0)  # as the JAX port (and HF generate) count them
        mask = torch.from_numpy((b["mask"] & b["row_valid"][:, None]).astype(np.float32))
        tensors.append((torch.from_numpy(b["input_ids"].astype(np.int64)), torch.from_numpy(am),
                        torch.from_numpy(positions), mask, torch.from_numpy(b["row_valid"])))
    state: dict = {}

    def hook(layer):
        def pre(module, args_):
            x = args_[0]  # [B, T, I]: the input of down_proj, i.e. act_fn(gate) * up
            m = state["mask"]
            pooled = torch.einsum("btw,bt->bw", x, m) / m.sum(1).clamp(min=1.0)[:, None]
            pooled = pooled[state["valid"]].double()
            state["sum"][layer] += pooled.sum(0)
            state["sumsq"][layer] += (pooled * pooled).sum(0)
        return pre

    for i, layer in enumerate(layers):
        layer.mlp.down_proj.register_forward_pre_hook(hook(i))
    width = model.config.intermediate_size

    def step():
        state["sum"] = torch.zeros(len(layers), width, dtype=torch.float64)
        state["sumsq"] = torch.zeros(len(layers), width, dtype=torch.float64)
        state["count"] = 0
        with torch.inference_mode():
            for ids, am, pos, mask, valid in tensors:
                state["mask"], state["valid"] = mask, valid
                model.model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False)
                state["count"] += int(valid.sum())
        return {k: state[k] for k in ("sum", "sumsq", "count")}

    def result(s):
        n = s["count"]
        total, sq = s["sum"].numpy(), s["sumsq"].numpy()
        mean = total / n
        return {"mean": mean, "var": (sq - n * mean * mean) / (n - 1), "count": n}

    return info, step, result


def child_memory(args, work: Path) -> None:
    import jax
    import jax.numpy as jnp

    from ports.pretrained import load_pretrained
    from ports.processing import TokenType
    from precise_jax.capture import collect

    jnp.zeros(()).block_until_ready()
    lm = load_pretrained(work / "tiny", jnp.float32)
    sites = tuple(f"lm.layers.{l}.mlp.act" for l in range(4))
    rng = np.random.default_rng(0)
    rss: dict = {"start": rss_kib()}
    n = args.memory_batches
    marks = set(MEMORY_MARKS)

    def batches():
        for k in range(n):
            if k in marks:  # batch k has been handed over, i.e. batches 1..k went through collect
                rss[k] = rss_kib()
            ids = rng.integers(0, lm.hf_config["vocab_size"], (8, 32), dtype=np.int32)
            yield {"input_ids": ids, "attention_mask": np.ones_like(ids),
                   "token_types": np.full(ids.shape, TokenType.PROMPT, np.int8)}

    t0 = time.perf_counter()
    out = collect(lm, batches(), sites, covariance=sites[:1], progress=False)
    jax.block_until_ready(out.stats)
    rss[n] = rss_kib()
    info = {"rss_kib": {str(k): v for k, v in rss.items()}, "peak_rss_kib": peak_rss_kib(),
            "seconds": time.perf_counter() - t0, "examples": out.metadata["examples"],
            "count": int(out.stats[sites[0]].count)}
    (work / "memory.json").write_text(json.dumps(info))


def child(args) -> None:
    work = Path(args.work)
    if args.child == "memory":
        child_memory(args, work)
        return
    protocol = protocol_stream()
    batches = load_batches(work)
    info, step, result = (setup_jax if args.child == "jax" else setup_torch)(args, batches)
    log(f"{args.child}: warm-up pass")
    t0 = time.perf_counter()
    out = step()
    info["first_pass_s"] = time.perf_counter() - t0  # JAX: includes compiling every bucket shape
    info["rss_after_warmup_kib"] = rss_kib()
    log(f"{args.child}: ready ({info['first_pass_s']:.1f} s first pass)")
    wall, cpu, out = serve_runs(protocol, step, f"{args.child}: pass", log)
    info["peak_rss_kib"] = peak_rss_kib()
    r = result(out)
    np.savez(work / f"{args.child}_stats.npz", mean=r["mean"], var=r["var"])
    info["count"] = r["count"]
    info.update(stats(wall))
    info["cpu_s"] = cpu
    info["median_cpu_s"] = float(np.median(cpu))
    (work / f"{args.child}.json").write_text(json.dumps(info))


def start(framework: str, args, work: Path) -> Child:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", framework, "--work", str(work),
               "--model", str(args.model), "--threads", str(args.threads)]
    return Child(framework, command, work)


# ----------------------------------------------------------------------------------------------------- parent


def prepare_batches(args, work: Path) -> dict:
    import transformers

    from precise_jax.data.batching import make_batches, positions_mask
    from precise_jax.data.sources import alpaca_eval, jbb_behaviors

    half = args.examples // 2
    examples = jbb_behaviors()[:half] + alpaca_eval()[:args.examples - half]
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    arrays, shapes, prompt_tokens = {}, [], 0
    for i, b in enumerate(make_batches(examples, tokenizer, args.batch)):
        mask = positions_mask(b, "prompt")
        for k in ("input_ids", "attention_mask", "token_types"):
            arrays[f"{k}_{i}"] = np.asarray(b[k])
        arrays[f"row_valid_{i}"] = np.asarray(b.row_valid, bool)
        arrays[f"mask_{i}"] = mask
        shapes.append(tuple(b.shape))
        prompt_tokens += int(mask.sum())
    np.savez(work / "batches.npz", count=len(shapes), **arrays)
    return {"examples": len(examples), "jbb": half, "alpaca": args.examples - half, "shapes": shapes,
            "padded_tokens": int(sum(r * t for r, t in shapes)), "prompt_tokens": prompt_tokens,
            "real_tokens": int(sum(arrays[f"attention_mask_{i}"].sum() for i in range(len(shapes))))}


def tiny_model(work: Path) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(work / "tiny")


def compare(work: Path) -> dict:
    jx, pt = np.load(work / "jax_stats.npz"), np.load(work / "torch_stats.npz")
    out = {}
    for key in ("mean", "var"):
        diff = np.abs(jx[key] - pt[key])
        out[f"{key}_max_abs_err"] = float(diff.max())
        out[f"{key}_max_rel_err"] = float(diff.max() / np.abs(pt[key]).max())  # max |jax − torch| / max |torch|
        # per layer, relative to that layer's largest value: the worst layer
        out[f"{key}_worst_layer_rel_err"] = float((diff.max(1) / np.abs(pt[key]).max(1)).max())
    return out


def table(result: dict) -> str:
    n = result["data"]["examples"]
    lines = ["| framework | examples/s (median) | s / pass of %d examples: median [IQR] | CPU s / pass "
             "| first pass s | peak RSS MiB |" % n, "|---|---:|---|---:|---:|---:|"]
    for name, key in (("JAX `collect` (jit)", "jax"), ("PyTorch eager (sdpa) + hooks", "torch")):
        r = result[key]
        lines.append(f"| {name} | {n / r['median_s']:.2f} | {r['median_s']:.2f} [{r['q1_s']:.2f}, {r['q3_s']:.2f}] "
                     f"| {r['median_cpu_s']:.1f} | {r['first_pass_s']:.1f} | {r['peak_rss_kib'] / 1024:,.0f} |")
    return "\n".join(lines)


def memory_table(result: dict) -> str:
    m = result["memory"]
    n = m["batches"]
    marks = [str(k) for k in MEMORY_MARKS if k < n] + [str(n)]
    lines = ["| " + " | ".join(["RSS MiB: start"] + [f"batch {k}" for k in marks]
                               + ["peak", f"growth batch 100 → {n}"]) + " |",
             "|" + "---:|" * (len(marks) + 3)]
    mib = lambda kib: f"{kib / 1024:,.1f}"  # noqa: E731
    lines.append("| " + " | ".join([mib(m["rss_kib"]["start"])] + [mib(m["rss_kib"][k]) for k in marks]
                                   + [mib(m["peak_rss_kib"]), f"{result['memory_growth_mib']:+.1f} MiB"]) + " |")
    return "\n".join(lines)


def section_key(result: dict) -> str:
    return (f"capture {result['model_name']} n{result['data']['examples']} b{result['batch']} "
            f"threads{result['torch']['torch_num_threads']}")


def markdown(result: dict) -> str:
    jx, pt, c, v, d, m = (result[k] for k in ("jax", "torch", "compare", "versions", "data", "memory"))
    ratio = pt["median_s"] / jx["median_s"]
    key = section_key(result)
    shapes = ", ".join(f"{r}×{t}" for r, t in d["shapes"])
    return f"""{_begin(key)}
## Activation capture, {d['examples']} real prompts, 30 × `mlp.act` mean-pooled + streaming stats, batch {result['batch']}, {pt['torch_num_threads']} thread(s), {result['model_name']}

- date: {result['date']}
- device: {result['cpu']} ({result['cpu_detail']}), {result['cores']} cores; load average {result['loadavg']} before, {result['loadavg_after']} after (the CPUs were shared with other jobs)
- versions: python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, torch {v['torch']}, transformers {v['transformers']}
- command: `{result['command']}`
- data: the first {d['jbb']} JBB-Behaviors goals + the first {d['alpaca']} AlpacaEval instructions, chat template, `make_batches(..., {result['batch']})`: batches {shapes} (left padding to buckets); {d['real_tokens']} real tokens of {d['padded_tokens']} padded, {d['prompt_tokens']} prompt tokens pooled over
- JAX: `collect(lm, batches, [lm.layers.{{0..29}}.mlp.act], positions="prompt", pool="mean", stats=True)` (float32), one pass = one `collect` call, ending in `block_until_ready` on the statistics
- PyTorch: `LlamaForCausalLM.from_pretrained(folder)` (float32, sdpa), `model.model(input_ids, attention_mask, position_ids, use_cache=False)` under `torch.inference_mode()`, i.e. the decoder **without the LM head** (the capture needs no logits; on the JAX side the deepest requested layer is the last, so the model's head is traced, but its logits are not an output of the jitted step: dead code for XLA); a forward pre-hook on each of the 30 `mlp.down_proj` mean-pools its input over the same prompt-token masks and adds to a running sum and sum of squares in float64; position ids counted over real tokens, as the port does
- threads: both children pinned to CPUs {result['cpus']}; torch.get_num_threads() = {pt['torch_num_threads']} (interop {pt['torch_num_interop_threads']}); XLA CPU: default thread pool over those CPUs, XLA_FLAGS=`{jx['xla_flags'] or '(unset)'}`
- each child: one untimed warm-up pass over all batches (JAX: compiles one executable per bucket shape), then {result['repeats']} timed passes, the two frameworks' passes alternating

{table(result)}

- **JAX / PyTorch capture throughput: {ratio:.2f}×** ({'JAX faster' if ratio >= 1 else 'JAX slower'}); compile excluded: the JAX first pass ({jx['first_pass_s']:.1f} s) includes tracing and compiling {len(set(map(tuple, d['shapes'])))} bucket shape(s), PyTorch's first pass {pt['first_pass_s']:.1f} s
- same statistics over {jx['count']} examples × 30 layers × {result['width']} units: pooled means max |jax − torch| = {c['mean_max_abs_err']:.3g} (max rel err {c['mean_max_rel_err']:.2e}; worst layer {c['mean_worst_layer_rel_err']:.2e}), variances max rel err {c['var_max_rel_err']:.2e} (worst layer {c['var_worst_layer_rel_err']:.2e}); relative errors are max |diff| / max |torch|
- RSS MiB after imports / load / warm-up: JAX {jx['rss_after_imports_kib'] / 1024:,.0f} / {jx['rss_after_load_kib'] / 1024:,.0f} / {jx['rss_after_warmup_kib'] / 1024:,.0f}, PyTorch {pt['rss_after_imports_kib'] / 1024:,.0f} / {pt['rss_after_load_kib'] / 1024:,.0f} / {pt['rss_after_warmup_kib'] / 1024:,.0f} (PyTorch's safetensors are memory-mapped and become resident during the first pass)

### Flat memory: {m['batches']:,} batches through `collect`

Tiny random Llama (4 layers, hidden 64, MLP 128, vocab 512), {m['batches']:,} batches of 8 × 32 random token ids ({m['examples']:,} examples, {m['seconds']:.1f} s), `collect(..., sites=all 4 mlp.act, stats=True, covariance=[layer 0])`, in its own child process; RSS read from /proc/self/status when `collect` pulls the batch after batch k (so batches 1..k were dispatched), and after the run; peak = `ru_maxrss`.

{memory_table(result)}
{_end(key)}
"""


def write_results(result: dict) -> None:
    replace_section(section_key(result), markdown(result))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model", help="a Hugging Face Llama folder (default: the real SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, help="CPUs to pin the children to (default: all this process may use)")
    p.add_argument("--memory-batches", type=int, default=1000)
    p.add_argument("--write", action="store_true", help="replace this configuration's section of BENCHMARKS.md")
    p.add_argument("--child", choices=("jax", "torch", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        child(args)
        return 0
    cpus = parent_setup(args)
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="capture-bench-") as tmp:
        work = Path(tmp)
        data = prepare_batches(args, work)
        log(f"{data['examples']} examples in batches {data['shapes']}")
        tiny_model(work)
        log(f"memory: {args.memory_batches} batches on a tiny random Llama")
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "memory", "--work", str(work),
                        "--memory-batches", str(args.memory_batches)], env=child_env(), check=True)
        memory = json.loads((work / "memory.json").read_text())
        memory["batches"] = args.memory_batches
        children = [start(f, args, work) for f in ("jax", "torch")]
        for r in range(args.repeats):
            log(f"repetition {r + 1}/{args.repeats}")
            for c in children if r % 2 == 0 else children[::-1]:
                c.run()
        runs = {c.name: c.finish() for c in children}
        comparison = compare(work)
        width = int(np.load(work / "torch_stats.npz")["mean"].shape[1])

    rss = memory["rss_kib"]
    growth = (rss[str(args.memory_batches)] - rss["100"]) / 1024 if "100" in rss else float("nan")
    argv_shown = sys.argv[1:] if argv is None else list(argv)
    result = {
        **runs, "compare": comparison, "data": data, "memory": memory, "memory_growth_mib": growth,
        "width": width, "batch": args.batch, "repeats": args.repeats, "model": args.model,
        "model_name": Path(args.model).name,
        "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        "cpu": cpu_model(), "cpu_detail": cpu_detail(), "cores": os.cpu_count(), "cpus": ",".join(map(str, cpus)),
        "loadavg": load_before, "loadavg_after": loadavg(),
        "versions": versions(),
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/capture.py " + shlex.join(argv_shown),
    }
    print(f"\ncapture, {data['examples']} prompts, batch {args.batch}, {result['model_name']}, {args.threads} thread(s)")
    print(table(result))
    print(f"JAX/PyTorch throughput ratio: {runs['torch']['median_s'] / runs['jax']['median_s']:.2f}")
    print(f"pooled means: max rel err {comparison['mean_max_rel_err']:.2e} (worst layer "
          f"{comparison['mean_worst_layer_rel_err']:.2e}); variances: max rel err {comparison['var_max_rel_err']:.2e}")
    print(f"\nflat memory, {args.memory_batches} batches ({memory['seconds']:.1f} s)")
    print(memory_table(result))
    print(f"load average {load_before} before, {result['loadavg_after']} after")
    if args.write:
        write_results(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
