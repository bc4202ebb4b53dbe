"""Generation throughput with CARE's projection vs without, on CPU (jitted KV-cache greedy decoding).

    PYTHONPATH=. .venv/bin/python benchmarks/projection.py [--batch 4] [--new-tokens 64] [--k 64 256]
        [--layers 12 13 14] [--repeats 3] [--model HF_FOLDER] [--write]

The model defaults to the real SmolLM2-135M-Instruct (30 layers, d = 576). The projection is the official
configuration scaled to it: a visual and a text subspace (k columns each, random orthonormal / unit-column bases)
at the MLP output of `--layers`, α = 4, adaptive fusion, every token at prefill and at every decode step. Prompts
are real chat prompts (the tokenizer's template); decoding runs exactly `--new-tokens` steps (no stop token).
Each configuration is compiled once (timed separately), then timed `--repeats` times in alternating rounds (so a
change in the machine's load hits all alike); tokens/s counts generated
tokens (batch × new tokens) over the whole call, prefill included. `--write` replaces this script's section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    begin, cpu_model, end, loadavg, logger, model_folder, replace_section, utc_now,
)

KEY = "projection: generation with CARE projection on CPU"
PROMPTS = (
    "Explain how a refrigerator keeps food cold.",
    "Write a short poem about the sea at night.",
    "What are three good habits for learning a new language?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do I make a simple tomato sauce?",
    "Why is the sky blue?",
    "Give me a packing list for a weekend hike.",
    "What does a compiler do?",
)


log = logger("projection")


def subspaces(width: int, k: int, layers, seed: int = 0) -> dict:
    from precise_jax.subspace import Subspace

    rng = np.random.default_rng(seed)
    out = {}
    for layer in layers:
        ortho, _ = np.linalg.qr(rng.normal(size=(width, k)))
        unit = rng.normal(size=(width, k))
        unit /= np.linalg.norm(unit, axis=0)
        out[layer] = [Subspace(basis=b.astype(np.float32), center=(rng.normal(size=width) * 0.1).astype(np.float32),
                               eigenvalues=np.ones(k, np.float32), modality=m)
                      for b, m in ((ortho, "visual"), (unit, "text"))]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--k", type=int, nargs="+", default=[64, 256])
    p.add_argument("--layers", type=int, nargs="+", default=[12, 13, 14])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", help="a Hugging Face folder (default: the real SmolLM2-135M-Instruct)")
    p.add_argument("--write", action="store_true", help="replace this script's section of BENCHMARKS.md")
    args = p.parse_args(argv)

    import jax

    from ports import generate, load_pretrained
    from ports.processing import encode_chat, pad_left
    from precise_jax.interventions import care_projection, projection_hook

    load_before = loadavg()
    lm = load_pretrained(model_folder(args.model))
    tokenizer = lm.processor
    rows = [encode_chat(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(args.batch)]
    batch = pad_left(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    width = lm.params["lm"]["embed_tokens"]["embedding"].shape[1]
    log(f"{Path(args.model).name}: batch {batch['input_ids'].shape}, d = {width}")

    configs = [("no projection", None, None)] + [
        (f"projection k={k}", projection_hook, care_projection(subspaces(width, k, args.layers), alpha=4.0))
        for k in args.k
    ]
    calls, results = [], []
    for name, hook, params in configs:
        def call(hook=hook, params=params):
            out = generate(lm, batch, max_new_tokens=args.new_tokens, stop_tokens=[], hook=hook, hook_params=params)
            return jax.block_until_ready(out.tokens)

        start = time.perf_counter()
        tokens = call()  # compiles
        results.append({"name": name, "first_s": time.perf_counter() - start, "times": [],
                        "tokens": np.asarray(tokens)})
        calls.append(call)
        log(f"{name}: compiled and ran once in {results[-1]['first_s']:.1f} s")
    # Rounds alternate the configurations, so a change in the machine's load hits them alike.
    for _ in range(args.repeats):
        for call, r in zip(calls, results):
            start = time.perf_counter()
            call()
            r["times"].append(time.perf_counter() - start)
    for r in results:
        r["median_s"] = float(np.median(r["times"]))
        r["tokens_per_s"] = args.batch * args.new_tokens / r["median_s"]
        log(f"{r['name']}: {r['tokens_per_s']:.1f} tokens/s")

    base = results[0]
    lines = [f"| {r['name']} | {r['tokens_per_s']:.1f} | {r['median_s']:.2f} [{min(r['times']):.2f}, "
             f"{max(r['times']):.2f}] | {r['first_s']:.1f} | {base['median_s'] / r['median_s']:.2f}× | "
             f"{np.mean(r['tokens'] == base['tokens']) * 100:.0f} % |" for r in results]
    from importlib.metadata import version

    cpu = cpu_model()
    command = "PYTHONPATH=. .venv/bin/python benchmarks/projection.py " + shlex.join(
        sys.argv[1:] if argv is None else list(argv))
    section = f"""{begin(KEY)}
## Generation with CARE's projection, CPU

- date: {utc_now()}
- device: {cpu}, {os.cpu_count()} cores (shared with other jobs: load average {load_before} before,
  {loadavg()} after)
- versions: python {platform.python_version()}, jax {version('jax')}, jaxlib {version('jaxlib')}, flax {version('flax')}
- command: `{command}`
- model: {Path(args.model).name}, float32; {args.batch} chat prompts (left-padded to {batch['input_ids'].shape[1]}
  tokens), greedy, exactly {args.new_tokens} new tokens per row
- projection: visual + text subspaces at `mlp.out` of layers {args.layers}, α = 4, adaptive fusion, all tokens,
  prefill and every decode step (`care_projection` + `projection_hook`)
- median of {args.repeats} timed calls [min, max] after one compiling call; the configurations alternate in
  each round

| configuration | generated tokens/s | s / call | first call (compile), s | speed vs none | tokens equal to none |
|---|---:|---|---:|---:|---:|
{chr(10).join(lines)}
{end(KEY)}
"""
    print(section)
    if args.write:
        replace_section(KEY, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
