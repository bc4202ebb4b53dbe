"""Memory of the masked-SFT loss: the full-logits formula (`precise_jax.train.response_loss` on [B, T, V] logits)
vs the trainer's `reply_nll` (reply positions packed, LM head in chunks), as XLA's compiled memory analysis of
value_and_grad with respect to the final hidden states and the head matrix. Compile only, nothing runs, so the
numbers do not depend on the machine's load.

    PYTHONPATH=. .venv/bin/python benchmarks/train_loss.py [--batch 8] [--tokens 1024] [--write]

Shapes: SmolLM2-135M (d 576, vocab 49152), Llama-2-7B (d 4096, vocab 32000), Qwen2-7B (d 3584, vocab 152064).
`--write` replaces this script's section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import begin, cpu_model, end, replace_section, utc_now, versions  # noqa: E402

MODELS = {"SmolLM2-135M": (576, 49152), "Llama-2-7B": (4096, 32000), "Qwen2-7B": (3584, 152064)}
KEY = "train_loss: memory of the reply loss"


def temp_gib(loss, b: int, t: int, d: int, v: int, argnums=(0, 1)) -> float:
    """Temporary buffers (GiB) of the compiled value_and_grad of `loss(head, hidden, ids, types)` w.r.t. `argnums`
    (0: hidden states, 1: head matrix)."""
    import jax
    import jax.numpy as jnp

    def objective(hidden, table, ids, types):
        return loss(lambda x: jnp.einsum("btd,dv->btv", x, table), hidden, ids, types)

    shapes = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
              jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.int8))
    compiled = jax.jit(jax.value_and_grad(objective, argnums=argnums)).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--write", action="store_true", help="replace this script's section of BENCHMARKS.md")
    args = parser.parse_args()
    from precise_jax.train import LOSS_CHUNK_ELEMENTS, reply_nll, response_loss

    rows = []
    for name, (d, v) in MODELS.items():
        full = temp_gib(lambda head, h, i, y: response_loss(head(h), i, y), args.batch, args.tokens, d, v)
        chunked = temp_gib(lambda head, h, i, y: reply_nll(head, h, i, y, v), args.batch, args.tokens, d, v)
        frozen = temp_gib(lambda head, h, i, y: reply_nll(head, h, i, y, v), args.batch, args.tokens, d, v, (0,))
        logits = args.batch * args.tokens * v * 4 / 2**30
        rows.append(f"| {name} | {d} | {v:,} | {logits:.2f} | {full:.2f} | {chunked:.2f} | {full / chunked:.1f}× "
                    f"| {frozen:.2f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    command = "PYTHONPATH=. .venv/bin/python benchmarks/train_loss.py " + shlex.join(sys.argv[1:])
    v = versions(("jax", "jaxlib"))
    section = "\n".join([
        begin(KEY), f"## Reply loss memory (B={args.batch}, T={args.tokens}, float32)", "",
        f"- date: {utc_now()}; device: XLA CPU compiler ({cpu_model()}, {os.cpu_count()} cores), compile only",
        f"- versions: python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}",
        f"- command: `{command.strip()}`",
        "- what: temporary buffers of value_and_grad (w.r.t. hidden states [B, T, D] and head [D, V]) of the loss; "
        f"reply_nll chunks hold at most {LOSS_CHUNK_ELEMENTS:,} logits; the head's gradient [D, V] (accumulated over the "
        "chunks) is in both, except in the last column", "",
        "| shapes of | d | vocab | one [B, T, V] f32 logits (GiB) | full-logits loss temp (GiB) | "
        "reply_nll temp (GiB) | ratio | reply_nll, head frozen (masked, lean modes) temp (GiB) |",
        "|---|---|---|---|---|---|---|---|", *rows, "", end(KEY)])
    print(section)
    if args.write:
        replace_section(KEY, section)


if __name__ == "__main__":
    main()
