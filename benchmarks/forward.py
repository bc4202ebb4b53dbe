"""Forward throughput and peak memory: the JAX port vs Hugging Face PyTorch eager (sdpa), on CPU.

    PYTHONPATH=. .venv/bin/python benchmarks/forward.py [--batch 8] [--tokens 256] [--repeats 10]
        [--dtype float32|bfloat16] [--model HF_FOLDER] [--threads N] [--write]

One run measures both frameworks, each in its own child process (so the peak RSS is attributable):
load the weights, warm up (JAX: lower + compile, timed separately), then `--repeats` timed forward passes
over the same [batch, tokens] token ids of real English text (the docstrings of Python standard-library
modules, tokenized with the model's tokenizer). Both children are pinned to the same CPUs and use the same
number of threads. The logits of both are compared, so the two sides compute the same thing.

Progress goes to stderr, the results table to stdout; `--write` also replaces this configuration's section
of BENCHMARKS.md at the repository root.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
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
    Child, begin as _begin, cpu_detail, cpu_model, end as _end, loadavg, logger, parent_setup, peak_rss_kib,
    protocol_stream, replace_section, rss_kib, serve_runs, stats, versions,
)

# Standard-library modules with long English docstrings; row i of the batch starts at module i.
TEXT_MODULES = (
    "re", "argparse", "subprocess", "difflib", "doctest", "pydoc", "unittest",
    "heapq", "csv", "json", "ftplib", "pickle", "string",
)


log = logger("forward")


# ----------------------------------------------------------------------------------------------------- inputs


def real_text_ids(tokenizer, batch: int, tokens: int) -> np.ndarray:
    """[batch, tokens] int32: row i is the docstrings of TEXT_MODULES from module i on, cycled to `tokens` ids."""
    docs = [inspect.getdoc(importlib.import_module(name)) or "" for name in TEXT_MODULES]
    rows = []
    for i in range(batch):
        ids: list[int] = []
        j = i
        while len(ids) < tokens:
            ids += tokenizer(docs[j % len(docs)] + "\n\n", add_special_tokens=False)["input_ids"]
            j += 1
        rows.append(ids[:tokens])
    return np.asarray(rows, np.int32)


# ----------------------------------------------------------------------------------------------------- children
# A child loads its framework and model, warms up, says "ready" and then runs one timed forward pass per "run"
# line from the parent, answering with its wall and CPU seconds. The parent alternates the two children, so a
# change in the machine's load (other processes) hits both alike.


def setup_jax(args, ids: np.ndarray):
    import jax
    import jax.numpy as jnp

    from ports.pretrained import load_pretrained

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    jnp.zeros(()).block_until_ready()  # start the backend, so its memory counts as "imports"
    rss_imports = rss_kib()
    log(f"jax: loading {args.model} in {args.dtype}")
    t0 = time.perf_counter()
    lm = load_pretrained(args.model, dtype)
    params = jax.block_until_ready(lm.params)
    info = {"framework": "jax", "load_s": time.perf_counter() - t0, "rss_after_imports_kib": rss_imports,
            "rss_after_load_kib": rss_kib()}
    model = lm.model

    def forward(params, input_ids, attention_mask):
        return model.apply({"params": params}, input_ids=input_ids, attention_mask=attention_mask).logits

    input_ids = jnp.asarray(ids)
    mask = jnp.ones_like(input_ids)
    log("jax: lowering and compiling")
    t0 = time.perf_counter()
    lowered = jax.jit(forward).lower(params, input_ids, mask)
    info["lower_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()  # an AOT executable: it cannot recompile behind our back
    info["compile_s"] = time.perf_counter() - t0
    info["rss_after_compile_kib"] = rss_kib()
    memory = compiled.memory_analysis()
    info["xla_temp_mib"] = memory.temp_size_in_bytes / 2**20
    info["xla_output_mib"] = memory.output_size_in_bytes / 2**20
    info["devices"] = [str(d) for d in jax.devices()]
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")

    def step():
        return compiled(params, input_ids, mask).block_until_ready()

    return info, step, lambda logits: np.asarray(logits, np.float32)


def setup_torch(args, ids: np.ndarray):
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    rss_imports = rss_kib()
    log(f"torch: loading {args.model} in {args.dtype} (sdpa)")
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    info = {"framework": "torch", "load_s": time.perf_counter() - t0, "rss_after_imports_kib": rss_imports,
            "rss_after_load_kib": rss_kib()}
    info["torch_num_threads"] = torch.get_num_threads()
    info["torch_num_interop_threads"] = torch.get_num_interop_threads()
    info["attn_implementation"] = model.config._attn_implementation
    input_ids = torch.from_numpy(ids.astype(np.int64))
    mask = torch.ones_like(input_ids)

    def step():
        with torch.inference_mode():
            return model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits

    return info, step, lambda logits: logits.float().numpy()


def child(args) -> None:
    work = Path(args.work)
    protocol = protocol_stream()
    ids = np.load(work / "ids.npy")
    info, step, to_numpy = (setup_jax if args.child == "jax" else setup_torch)(args, ids)
    t0 = time.perf_counter()
    logits = step()
    info["first_call_s"] = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        logits = step()
    info["rss_after_warmup_kib"] = rss_kib()
    log(f"{args.child}: ready")
    wall, cpu, logits = serve_runs(protocol, step, args.child, log)
    info["peak_rss_kib"] = peak_rss_kib()
    np.save(work / f"{args.child}_logits.npy", to_numpy(logits))
    info.update(stats(wall))
    info["cpu_s"] = cpu
    info["median_cpu_s"] = float(np.median(cpu))
    (work / f"{args.child}.json").write_text(json.dumps(info))


def start(framework: str, args, work: Path) -> Child:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", framework, "--work", str(work),
        "--model", str(args.model), "--dtype", args.dtype, "--warmup", str(args.warmup),
        "--threads", str(args.threads),
    ]
    env = {"XLA_FLAGS": args.xla_flags} if framework == "jax" and args.xla_flags is not None else None
    return Child(framework, command, work, env)


def measure(frameworks: list[str], args, work: Path) -> dict:
    """Start each child in turn (loading and compiling alone), then alternate their timed repetitions."""
    children = [start(f, args, work) for f in frameworks]
    for r in range(args.repeats):
        log(f"repetition {r + 1}/{args.repeats}")
        for c in children if r % 2 == 0 else children[::-1]:
            c.run()
    return {c.name: c.finish() for c in children}


# ----------------------------------------------------------------------------------------------------- report


def compare(work: Path) -> dict:
    jx = np.load(work / "jax_logits.npy", mmap_mode="r")
    pt = np.load(work / "torch_logits.npy", mmap_mode="r")
    diff = np.abs(np.asarray(jx, np.float64) - np.asarray(pt, np.float64))
    scale = float(np.max(np.abs(pt)))
    return {
        "max_abs_err": float(diff.max()),
        "max_abs_logit": scale,
        "max_rel_err": float(diff.max() / scale),  # max |jax - torch| / max |torch|
        "argmax_agree": float(np.mean(np.argmax(jx, -1) == np.argmax(pt, -1))),
    }


def table(result: dict) -> str:
    jx, pt, n = result["jax"], result["torch"], result["batch"] * result["tokens"]
    rows = [("JAX port (jit)", jx), ("PyTorch eager (sdpa)", pt)]
    mib = lambda kib: f"{kib / 1024:,.0f}"  # noqa: E731
    lines = [
        "| framework | tokens/s (median) | s / forward: median [IQR] | CPU s / forward (÷ wall) | peak RSS MiB "
        "| RSS after imports / load / warm-up MiB | peak − loaded MiB |",
        "|---|---:|---|---:|---:|---|---:|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {n / r['median_s']:,.0f} | {r['median_s']:.3f} [{r['q1_s']:.3f}, {r['q3_s']:.3f}] | "
            f"{r['median_cpu_s']:.2f} ({r['median_cpu_s'] / r['median_s']:.2f}) | "
            f"{mib(r['peak_rss_kib'])} | {mib(r['rss_after_imports_kib'])} / {mib(r['rss_after_load_kib'])} / "
            f"{mib(r['rss_after_warmup_kib'])} | "
            f"{mib(r['peak_rss_kib'] - r['rss_after_load_kib'])} |"
        )
    return "\n".join(lines)


def markdown(result: dict) -> str:
    mib = lambda kib: f"{kib / 1024:,.0f}"  # noqa: E731
    jx, pt, cmp_, v = result["jax"], result["torch"], result["compare"], result["versions"]
    ratio = pt["median_s"] / jx["median_s"]
    key = section_key(result)
    return f"""{_begin(key)}
## Forward pass, {result['dtype']}, batch {result['batch']} × {result['tokens']} tokens, {pt['torch_num_threads']} thread(s), {result['model_name']}

- date: {result['date']}
- device: {result['cpu']} ({result['cpu_detail']}), {result['cores']} cores
- versions: python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, torch {v['torch']}, transformers {v['transformers']}
- command: `{result['command']}`
- input: {result['batch']} rows × {result['tokens']} tokens of real English text (docstrings of the Python standard-library modules {', '.join(TEXT_MODULES)}, cycled), no padding
- CPU s ÷ wall is the parallelism a child got: near the thread count on an idle machine, lower when other processes take CPUs (then PyTorch's OpenMP threads wait on each other at every op's barrier while JAX's thread pool just runs slower; compare the one-thread sections for a like-for-like number)
- threads: both children pinned to CPUs {result['cpus']}; torch.get_num_threads() = {pt['torch_num_threads']} (interop {pt['torch_num_interop_threads']}); XLA CPU: default Eigen thread pool over those CPUs, XLA_FLAGS=`{jx['xla_flags'] or '(unset)'}`
- {result['repeats']} timed repetitions each after {result['warmup']} warm-up call(s), the two frameworks' repetitions alternating (both children alive, one running at a time) so that load from other processes hits both alike; JAX timed with `block_until_ready`, PyTorch under `torch.inference_mode()`, `use_cache=False`; load average {result['loadavg']} before, {result['loadavg_after']} after

{table(result)}

- **JAX / PyTorch throughput: {ratio:.2f}×** ({'JAX faster' if ratio >= 1 else 'JAX slower'})
- JAX compile: trace + lower {jx['lower_s']:.2f} s, XLA compile {jx['compile_s']:.2f} s (first execution afterwards {jx['first_call_s']:.2f} s); PyTorch first call {pt['first_call_s']:.2f} s
- memory: peak RSS is the child's `ru_maxrss`; "peak − loaded" is its increase over the RSS right after loading the weights. PyTorch's safetensors weights are memory-mapped and only become resident during the first forward pass, so its "peak − loaded" includes most of the weights ({mib(pt['rss_after_warmup_kib'] - pt['rss_after_load_kib'])} MiB appear between load and the end of warm-up); JAX copies them at load. XLA's own buffers for this executable: {jx['xla_temp_mib']:.0f} MiB temporaries + {jx['xla_output_mib']:.0f} MiB logits; RSS after compiling {mib(jx['rss_after_compile_kib'])} MiB
- same logits: max |jax − torch| = {cmp_['max_abs_err']:.3g} (max |logit| {cmp_['max_abs_logit']:.3g}, max rel err {cmp_['max_rel_err']:.2e}); argmax agrees on {100 * cmp_['argmax_agree']:.2f}% of positions
{_end(key)}
"""


def section_key(result: dict) -> str:
    threads = result["torch"]["torch_num_threads"]
    return f"forward {result['model_name']} {result['dtype']} b{result['batch']} t{result['tokens']} threads{threads}"


def write_results(result: dict) -> None:
    replace_section(section_key(result), markdown(result))


# ----------------------------------------------------------------------------------------------------- main


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (JAX: after compiling)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--model", help="a Hugging Face folder (default: the real SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, help="CPUs to pin both children to (default: all this process may use)")
    p.add_argument("--xla-flags", help="XLA_FLAGS for the JAX child (default: inherited)")
    p.add_argument("--only", choices=("jax", "torch"), help="run one framework (no comparison, no --write)")
    p.add_argument("--write", action="store_true", help="replace this configuration's section of BENCHMARKS.md")
    p.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        child(args)
        return 0

    cpus = parent_setup(args)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    ids = real_text_ids(tokenizer, args.batch, args.tokens)
    log(f"input: {ids.shape[0]} × {ids.shape[1]} tokens; row 0 begins {tokenizer.decode(ids[0, :12])!r}")
    load_before = loadavg()

    with tempfile.TemporaryDirectory(prefix="forward-bench-") as tmp:
        work = Path(tmp)
        np.save(work / "ids.npy", ids)
        frameworks = [args.only] if args.only else ["jax", "torch"]
        runs = measure(frameworks, args, work)
        if args.only:
            r = runs[args.only]
            n = args.batch * args.tokens
            print(f"{args.only}: {n / r['median_s']:,.0f} tokens/s, median {r['median_s']:.3f} s "
                  f"[{r['q1_s']:.3f}, {r['q3_s']:.3f}], peak RSS {r['peak_rss_kib'] / 1024:,.0f} MiB")
            print(json.dumps({k: v for k, v in r.items() if k != "times_s"}, indent=1))
            return 0
        log("comparing logits")
        comparison = compare(work)

    load_after = loadavg()
    argv_shown = sys.argv[1:] if argv is None else list(argv)
    result = {
        **runs,
        "compare": comparison,
        "batch": args.batch,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "dtype": args.dtype,
        "model": args.model,
        "model_name": Path(args.model).name,
        "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        "cpu": cpu_model(),
        "cpu_detail": cpu_detail(),
        "cores": os.cpu_count(),
        "cpus": ",".join(map(str, cpus)),
        "loadavg": load_before,
        "loadavg_after": load_after,
        "versions": versions(),
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/forward.py " + shlex.join(argv_shown),
    }
    n = args.batch * args.tokens
    print(f"\nforward pass, {args.dtype}, batch {args.batch} × {args.tokens} tokens, {result['model_name']}")
    print(table(result))
    print(f"JAX/PyTorch throughput ratio: {runs['torch']['median_s'] / runs['jax']['median_s']:.2f}")
    print(f"JAX lower {runs['jax']['lower_s']:.2f} s, compile {runs['jax']['compile_s']:.2f} s")
    print(f"logits: max abs err {comparison['max_abs_err']:.3g}, max rel err {comparison['max_rel_err']:.2e}, "
          f"argmax agreement {100 * comparison['argmax_agree']:.2f}%")
    del n
    if args.write:
        write_results(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
