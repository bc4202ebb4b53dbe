"""The `precise-jax` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from precise_jax.outputs import OutputDir

if TYPE_CHECKING:
    from pathlib import Path

    from jax.sharding import Mesh

    from ports.pretrained import Pretrained
    from precise_jax.data import Example
    from precise_jax.data.conditions import Translations, Translator
    from precise_jax.evaluate import LLMJudge

Config = TypeVar("Config")
# The commands that run on several processes (jax.distributed): each process feeds its share of every batch and
# reads the statistics reduced over all of them; the others run on one process, over a mesh of its devices.
SEVERAL_PROCESSES = ("locate", "care fit")


def demo(args: argparse.Namespace) -> dict:
    """The main job: the methods' claims tested on a model organism. Builds (once, cached) a model that refuses in
    English but less in other languages from the real SmolLM2-135M-Instruct, then on MultiJail's human-translated
    prompts checks the causal machinery (a refusal direction), whether the located safety neurons are causal and
    shared across languages, and whether neuron-restricted alignment transfers to held-out languages better than
    random neurons, LoRA and full fine-tuning; writes a report folder with a verdict per claim."""
    from pathlib import Path

    from precise_jax.claims import ClaimsConfig, run_claims
    from precise_jax.organism import OrganismConfig, organism_folder, read_record
    from precise_jax.report import Report, claims_report

    if args.out is None:
        args.out = str(Path("runs") / time.strftime("claims-%Y%m%d-%H%M%S"))
    with Report(args.out, title="Precise Shield's claims on a model organism", overwrite=args.overwrite) as report:
        organism = None
        if args.model is None:
            args.model = str(organism_folder(OrganismConfig()))
        if (Path(args.model) / "organism.json").is_file():
            organism = read_record(args.model)
        lm = load_model(args)
        config = config_from(args, ClaimsConfig)
        results = run_claims(lm, config, organism=organism)
        located = results.pop("_located")
        located.neurons.save(report.folder / "neurons")
        claims_report(report, results)
        final = report.write(results)
    print(f"\nreport: {final / 'report.md'}", file=sys.stderr)
    return {"model": results["model"], "verdicts": {k: v["holds"] for k, v in results["verdicts"].items()},
            "seconds": round(sum(results["seconds"].values()), 1), "report": str(final / "report.md")}


def organism_command(args: argparse.Namespace) -> dict:
    """Build (or find in the cache) the model organism: the base model fine-tuned to refuse harmful requests in
    English, the checkpoint chosen on a validation split; prints its folder and record."""
    from precise_jax.organism import OrganismConfig, organism_folder, read_record

    config = config_from(args, OrganismConfig)
    folder = organism_folder(config, args.base)
    record = read_record(folder)
    return {"folder": str(folder), "chosen_step": record["chosen_step"], "chosen": record["chosen"],
            "met_targets": record["met_targets"], "checks": record["checks"], "seconds": record["seconds"]}


def shield_pipeline(args: argparse.Namespace) -> dict:
    """Precise Shield end to end on one model (default the real SmolLM2-135M-Instruct; JBB + HarmBench standard
    harmful and AlpacaEval benign prompts): locate safety neurons, check them causally, align by neuron-restricted
    fine-tuning, evaluate on held-out prompts, and write a report folder."""
    from pathlib import Path

    from precise_jax.report import Report, shield_report
    from precise_jax.shield import PipelineConfig, run_pipeline

    if args.out is None:
        args.out = str(Path("runs") / time.strftime("shield-%Y%m%d-%H%M%S"))
    with Report(args.out, title="Precise Shield: safety neurons, causal check, neuron-restricted alignment",
                overwrite=args.overwrite) as report:
        lm = load_model(args)
        translations, translator = conditions_input(args)
        harmful, benign = prompt_set(args.harmful, "harmful"), prompt_set(args.benign, "benign")
        harmful, translations = languages_as_conditions(harmful, translations)
        benign, translations = languages_as_conditions(benign, translations)
        config = config_from(args, PipelineConfig)
        results = run_pipeline(lm, harmful, benign, config, translations=translations, translator=translator,
                               refusals=refusal_replies(args.refusals), judge=judge_from(args.judge, args.dtype))
        located, models = results.pop("_neurons"), results.pop("_models")
        located.neurons.save(report.folder / "neurons")
        if args.save_model:
            from ports import save_pretrained

            save_pretrained(models["aligned"], report.folder / "aligned-model")
        shield_report(report, results, located)
        final = report.write(results)
    print(f"\nreport: {final / 'report.md'}", file=sys.stderr)
    return summarize(results) | {"report": str(final / "report.md")}


def config_from(args: argparse.Namespace, config_class: type[Config]) -> Config:
    """A config dataclass from the parsed options of the same names (lists as tuples; absent or None ones keep
    the config's defaults)."""
    given: dict[str, Any] = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)  # type: ignore
                             if getattr(args, f.name, None) is not None}
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def summarize(results: dict) -> dict:
    """The headline numbers of a pipeline run: held-out refusal of each model, neurons, causal check, utility."""
    evaluation = results["evaluation"]
    models = {"original": {metric: evaluation["original"][metric]["all"]["value"]
                           for metric in ("harmful_refusal", "benign_refusal")}}
    for name, e in evaluation.items():
        if name != "original":
            models[name] = {metric: e[metric]["all"]["after"]["value"] for metric in ("harmful_refusal",
                                                                                      "benign_refusal")}
            models[name] |= {"next_token_kl": e["utility"]["kl"]["value"],
                             "perplexity_ratio": e["utility"]["perplexity_ratio"]["value"]}
    return {
        "model": results["model"],
        "neurons": results["neurons"]["count"],
        "parameter_fraction": results["neurons"]["parameter_fraction"],
        "causal_check": {kind: {key: check[key] for key in
                                ("refusal_drop", "random_refusal_drop", "score_drop", "random_score_drop",
                                 "logit_drop", "random_logit_drop")}
                         for kind, check in results["causal_check"].items()},
        "held_out": models,
        "seconds": round(sum(results["seconds"].values()), 1),
    }


def conditions_input(args: argparse.Namespace) -> tuple[Translations | None, Translator | None]:
    """(translations, translator) for languages other than the prompt sets' own."""
    from precise_jax.data import ApertiumTranslator, load_translations

    translations = load_translations(args.translations) if args.translations else None
    return translations, ApertiumTranslator() if args.apertium else None


def languages_as_conditions(examples: list[Example], translations: Translations | None,
                            ) -> tuple[list[Example], Translations | None]:
    """A multilingual benchmark's examples (paired by metadata "item": MultiJail, XSafety) as one English example
    per item plus its translations, so that --languages picks conditions from them; other examples unchanged."""
    from precise_jax.data.benchmarks import parallel

    paired = [e for e in examples if e.metadata.get("item")]
    if not paired:
        return examples, translations
    base, more = parallel(paired)
    return [e for e in examples if not e.metadata.get("item")] + base, {**(translations or {}), **more}


def judge_from(spec: str | None, dtype: str) -> LLMJudge | None:
    """The classifier judge of --judge FORMAT:FOLDER (a local copy of cais/HarmBench-Llama-2-13b-cls as
    `harmbench`, of meta-llama/Llama-Guard-3-8B as `llama-guard-3`), loaded before any work; None without one."""
    import jax.numpy as jnp

    from ports import load_pretrained
    from ports.errors import InputError
    from precise_jax.evaluate import JUDGE_FORMATS, LLMJudge

    if spec is None:
        return None
    name, _, folder = spec.partition(":")
    if name not in JUDGE_FORMATS or not folder:
        raise InputError(f"--judge {spec!r}: expected FORMAT:FOLDER with FORMAT one of {sorted(JUDGE_FORMATS)} and "
                         "FOLDER the judge's Hugging Face checkpoint folder")
    return LLMJudge(load_pretrained(folder, dtype=jnp.dtype(dtype)), name)


def refusal_replies(path: str | None) -> dict:
    """{language: [refusal, ...]} from a JSON file, or the built-in English ones."""
    from pathlib import Path

    from ports.errors import InputError
    from precise_jax.shield import REFUSALS

    if path is None:
        return REFUSALS
    try:
        replies = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read refusal replies from {path} ({e}); give a JSON object "
                         '{"language": ["refusal", ...]}') from e
    if not isinstance(replies, dict) or not all(isinstance(v, list) and v and all(isinstance(t, str) and t.strip()
                                                                              for t in v) for v in replies.values()):
        raise InputError(f"{path} must hold a JSON object mapping each language to a non-empty list of refusals")
    return {**REFUSALS, **replies}


# ----------------------------------------------------------------------------------------------------- shared


def load_model(args: argparse.Namespace) -> Pretrained:
    """The command's model, its parameters laid out on the command's mesh when it has one."""
    import jax.numpy as jnp

    from ports import load_pretrained

    if args.model is None:
        from precise_jax.assets import smollm2_135m_instruct

        args.model = str(smollm2_135m_instruct())
    mesh = command_mesh(args)
    check_memory(args, mesh)
    return load_pretrained(args.model, dtype=jnp.dtype(args.dtype), mesh=mesh)


def check_memory(args: argparse.Namespace, mesh: Mesh | None) -> None:
    """Print the command's memory plan per device (parameters, gradients, optimizer state, activations) and refuse
    one that cannot fit, from config.json alone: before anything is loaded."""
    from pathlib import Path

    import jax.numpy as jnp

    from precise_jax import memory
    from precise_jax.distributed import AXES
    from precise_jax.neurons import NeuronSet

    name = command_name(args)
    size: dict[str, Any] = {"batch_size": getattr(args, "batch_size", 8), "tokens": getattr(args, "max_tokens", 256)}
    if name in ("ablate", "care generate"):
        size |= {"task": "generate", "new_tokens": args.max_new_tokens}
    elif name in ("align", "shield", "demo"):  # their largest part: training (the demo's: full fine-tuning)
        mode = {"demo": "full"}.get(name, getattr(args, "mode", None))
        neurons: Any = 0
        if name == "align" and mode != "full":
            neurons = NeuronSet.load(args.neurons).per_layer()
        elif name == "shield":  # not located yet: --budget, else --ratio of every layer, once per condition
            from ports.pretrained import read_config

            text = (config := read_config(Path(args.model))).get("text_config", config)
            layers, width = text["num_hidden_layers"], text["intermediate_size"]
            neurons = min(layers * width, args.budget or max(1, int(args.ratio * width)) * layers
                          * len(args.languages) * len(args.modalities))
        size |= {"task": "train", "mode": mode, "neurons": neurons}
    else:
        size["task"] = "capture"
    shape = (1, 1, 1) if mesh is None else tuple(mesh.shape[a] for a in AXES)
    plan = memory.plan_for_folder(args.model, shape, dtype=jnp.dtype(args.dtype), **size, limit="device"
                                  if args.device_memory is None else int(args.device_memory * 2**30))
    print(plan.describe(), file=sys.stderr)
    memory.check_plan(plan)


def command_name(args: argparse.Namespace) -> str:
    """The command as typed: "locate", "care fit", ..."""
    return " ".join(filter(None, (args.command, getattr(args, "step", None))))


def command_mesh(args: argparse.Namespace) -> Mesh | None:
    """The mesh of --mesh (else $PRECISE_JAX_MESH, which tpu/pod.sh sets; on several processes, else fsdp), after
    jax.distributed starts when the environment describes a cluster; None: one device."""
    import os

    import jax

    from ports.errors import InputError
    from precise_jax import distributed

    distributed.initialize()
    spec = args.mesh or os.environ.get("PRECISE_JAX_MESH")
    if jax.process_count() > 1:
        if (name := command_name(args)) not in SEVERAL_PROCESSES:
            raise InputError(f"{name} runs on one process so far (its --mesh may span that host's devices); on "
                             f"{jax.process_count()} processes run {' or '.join(SEVERAL_PROCESSES)}")
    elif not spec:
        return None
    return distributed.make_mesh(spec or "fsdp")


def prompt_set(spec: str, label: str) -> list[Example]:
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


def split_sets(args: argparse.Namespace, lm: Pretrained, validation: int = 0) -> list[list[Example]]:
    """(harmful train, harmful held-out, benign train, benign held-out), length-filtered, limited to --limit; with
    `validation`, also (harmful validation, benign validation): that many fitting prompts never trained on."""
    from precise_jax.data import split_examples
    from precise_jax.shield import within_length

    parts, checks = [], []
    for spec, label in ((args.harmful, "harmful"), (args.benign, "benign")):
        train, held_out = split_examples(prompt_set(spec, label), args.held_out, seed=args.seed)
        train = within_length(train, lm, args.max_tokens)
        checks.append(train[len(train) - validation:] if validation else [])
        train = train[: len(train) - validation]
        parts += [train[: args.limit], within_length(held_out, lm, args.max_tokens)[: args.limit]]
    return parts + checks if validation else parts


def with_output(run: Callable[[argparse.Namespace, Path], dict]) -> Callable[[argparse.Namespace], dict]:
    """Run a command into an OutputDir: the folder is renamed into place only when the command succeeds; on a
    cluster only process 0 writes (the others run into a scratch folder)."""

    def wrapped(args: argparse.Namespace) -> dict:
        import tempfile
        from pathlib import Path

        from precise_jax import distributed

        distributed.initialize()  # on a cluster the processes first learn who they are: process 0 alone writes
        if not distributed.is_main_process():
            with tempfile.TemporaryDirectory() as scratch:
                return run(args, Path(scratch)) | {"out": None}
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
def locate_command(args: argparse.Namespace, out: Path) -> dict:
    """Locate safety neurons: harmful vs benign neuron statistics, per-layer top-k, set difference."""
    import jax

    from precise_jax.neurons import parameter_fraction
    from precise_jax.shield import locate

    lm = load_model(args)
    harmful, _, benign, _ = split_sets(args, lm)
    located = locate(lm, {"en-text": harmful}, {"en-text": benign}, score=args.score, ratio=args.ratio,
                     budget=args.budget, positions=args.positions, pool=args.pool, batch_size=args.batch_size)
    located.neurons.save(out / "neurons")
    total = sum(x.size for x in jax.tree_util.tree_leaves(lm.params))
    return {"model": args.model, "neurons": len(located.neurons), "per_layer": located.neurons.per_layer(),
            "parameter_fraction": parameter_fraction(located.neurons, lm.decoder.hidden_size, total),
            "harmful_examples": len(harmful), "benign_examples": len(benign), "metadata": located.neurons.metadata}


@with_output
def ablate_command(args: argparse.Namespace, out: Path) -> dict:
    """Causal check: refusal with the safety neurons ablated vs random sets of the same size per layer."""
    from precise_jax.neurons import NeuronSet, check_for_model
    from precise_jax.shield import causal_check

    lm = load_model(args)
    neurons = NeuronSet.load(args.neurons)
    check_for_model(neurons, lm.model_id, lm.decoder.num_layers, lm.decoder.intermediate_size)
    _, harmful, _, _ = split_sets(args, lm)
    result = causal_check(lm, neurons, harmful, kind=args.kind, random_seeds=args.random_seeds,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    return {"model": args.model, "neurons_file": args.neurons, **result}


@with_output
def align_command(args: argparse.Namespace, out: Path) -> dict:
    """Neuron-masked alignment: SFT on harmful -> refusal and benign -> answer, only the neurons' weights move."""
    from ports import save_pretrained
    from precise_jax.neurons import NeuronSet, check_for_model
    from precise_jax.shield import alignment_examples, refusal_validation
    from precise_jax.train import TrainConfig, Validation, train

    lm = load_model(args)
    neurons = None
    if args.mode != "full":
        neurons = NeuronSet.load(args.neurons)
        check_for_model(neurons, lm.model_id, lm.decoder.num_layers, lm.decoder.intermediate_size)
    validation = None
    if args.validate_every:
        harmful, _, benign, _, harmful_check, benign_check = split_sets(args, lm, args.validation)
        validation = Validation(refusal_validation(harmful_check, benign_check, batch_size=args.batch_size),
                                every=args.validate_every, min_harmful_refusal=args.min_refusal,
                                max_benign_refusal=args.max_over_refusal)
    else:
        harmful, _, benign, _ = split_sets(args, lm)
    config = TrainConfig(mode=args.mode, epochs=args.epochs, batch_size=args.batch_size,
                         learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                         max_length=args.max_tokens, seed=args.seed)
    result = train(lm, alignment_examples(harmful, benign), neurons, config, checkpoint_dir=args.checkpoint_dir,
                   validation=validation)
    save_pretrained(result.model, out / "model")
    return {"model": args.model, "mode": args.mode, "trainable": result.trainable, "total": result.total,
            "trainable_fraction": result.fraction, "losses": result.losses, "seconds": result.seconds,
            "validation": result.checks, "chosen_step": result.chosen_step, "aligned_model": str(args.out) + "/model"}


def add_validation(p: argparse.ArgumentParser, default_every: int) -> None:
    """The checkpoint rule's options (`train.Validation`)."""
    group = p.add_argument_group("checkpoint rule")
    group.add_argument("--validate-every", type=int, default=default_every,
                       help="steps between validation checks (greedy replies to validation prompts taken from the "
                            "fitting split, never trained on); training stops at the first check meeting --min-refusal "
                            "and --max-over-refusal, else keeps the check with the best margin (0: no validation; "
                            f"default {default_every})")
    group.add_argument("--validation", type=int, default=16, help="harmful and benign validation prompts (default 16)")
    group.add_argument("--min-refusal", type=float, default=0.9, help="validation target: harmful refusal (0.9)")
    group.add_argument("--max-over-refusal", type=float, default=0.1, help="validation target: benign refusal (0.1)")


def add_model(p: argparse.ArgumentParser, default: str = "the cached SmolLM2-135M-Instruct") -> None:
    group = p.add_argument_group("model")
    group.add_argument("--model", help=f"a Hugging Face model folder (default: {default})")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    group.add_argument("--mesh", help="run on a device mesh: a preset (data, fsdp, tensor, fsdp-tensor2, ...) or "
                       "'data=2,fsdp=4' (-1: the remaining devices); on a TPU pod or cluster every process runs the "
                       "same command (default: $PRECISE_JAX_MESH, else one device)")
    group.add_argument("--device-memory", type=float, help="GiB one device holds, for the memory plan printed "
                       "before loading (default: what the device reports; CPU: the available host memory)")


def add_prompt_sets(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("prompt sets")
    group.add_argument("--harmful", default="jbb,harmbench-standard", help="real set names (jbb, harmbench, "
                       "harmbench-standard, advbench, do-not-answer, ...; `name:path` for a local benchmark copy) "
                       "or JSONL/CSV/Parquet files, comma-separated")
    group.add_argument("--benign", default="alpaca-eval", help="real set names or files, comma-separated")


def add_split(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("split and limits")
    group.add_argument("--held-out", type=float, default=0.3, help="fraction of each set held out (seeded split)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--limit", type=int, default=None, help="use at most this many examples of each part")
    group.add_argument("--max-tokens", type=int, default=256, help="drop examples longer than this many tokens")
    group.add_argument("--batch-size", type=int, default=8)


def add_output(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--out (required unless the command names a default) and --overwrite."""
    group = p.add_argument_group("output")
    where = f"default: {default}; " if default else ""
    group.add_argument("--out", required=default is None,
                       help=f"output folder ({where}written complete or not at all)")
    group.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def add_common(p: argparse.ArgumentParser) -> None:
    """The options of the step commands: model, prompt sets, split and limits, output folder."""
    add_model(p)
    add_prompt_sets(p)
    add_split(p)
    add_output(p)


def add_neuron_selection(p: argparse.ArgumentParser, *, ratio: float, positions: str = "prompt",
                         pool: str = "mean", score: str = "plnd") -> None:
    """How safety neurons are scored and chosen (`shield.locate`)."""
    group = p.add_argument_group("neuron selection")
    group.add_argument("--score", default=score, choices=["plnd", "frequency", "mean_diff", "cohen_d"])
    group.add_argument("--ratio", type=float, default=ratio, help=f"per-layer top-k = floor(ratio * d_ff) "
                       f"(default {ratio})")
    group.add_argument("--budget", type=int, default=None, help="one global top-k over all layers instead of --ratio")
    group.add_argument("--positions", default=positions, choices=["prompt", "last_prompt", "text", "all"])
    group.add_argument("--pool", default=pool, choices=["mean", "last", "max"])


def add_config_options(p: argparse.ArgumentParser, config: object, helps: dict[str, str], title: str) -> None:
    """One option per named field of a config dataclass, typed and defaulted by the config's value."""
    group = p.add_argument_group(title)
    for name, help_text in helps.items():
        default = getattr(config, name)
        group.add_argument("--" + name.replace("_", "-"), type=float if isinstance(default, float) else int,
                           default=default, help=f"{help_text} (default {default})")


# ----------------------------------------------------------------------------------------------------- care


@with_output
def care_diagnose_command(args: argparse.Namespace, out: Path) -> dict:
    """Causal diagnosis: skip layer pairs (block, attention, MLP) and patch each layer's sites from benign into
    harmful prompts; the refusal log-odds changes point to the layers CARE should project at."""
    from precise_jax.care import diagnose

    lm = load_model(args)
    harmful, _, benign, _ = split_sets(args, lm)
    diagnosis = diagnose(lm, harmful, benign, components=args.components, span=args.span, window=args.window,
                         choose_by=args.choose_by, attribution_layer=args.attribution_layer,
                         attribution_pairs=args.attribution_pairs, batch_size=args.batch_size)
    return {"model": args.model, **diagnosis.to_json()}


@with_output
def care_fit_command(args: argparse.Namespace, out: Path) -> dict:
    """Fit CARE's safety subspaces at the diagnosed layers: text (compliant vs refusing continuations of the same
    harmful prompts) and, for vision-language models, visual (typographic harmful images vs benign photos)."""
    from pathlib import Path

    from ports.errors import InputError
    from precise_jax.care import fit
    from precise_jax.subspace import save_subspaces

    if (args.layers is None) == (args.diagnosis is None):
        raise InputError("care fit: give the layers with --diagnosis (a `care diagnose` result.json) or --layers")
    layers = args.layers
    if args.diagnosis is not None:
        try:
            layers = json.loads(Path(args.diagnosis).read_text())["layers"]
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"care fit: {args.diagnosis} is not a `care diagnose` result.json ({e})") from e
    lm = load_model(args)
    harmful, _, benign, _ = split_sets(args, lm)
    provenance = {"layers": list(layers), "diagnosis": args.diagnosis, "harmful": args.harmful,
                  "benign": args.benign, "held_out": args.held_out, "seed": args.seed}
    subspaces = fit(lm, harmful, layers, benign=benign, site=args.site, k=args.k, mode=args.mode,
                    shrinkage=args.shrinkage, selection=args.selection, visual=args.visual,
                    batch_size=args.batch_size, provenance=provenance)
    save_subspaces(out / "subspaces.safetensors", subspaces, metadata=provenance)
    return {"model": args.model, "layers": list(layers), "site": args.site,
            "subspaces": {name: {"k": s.k, "top_eigenvalues": s.eigenvalues[:5].tolist(),
                                 "malicious_examples": s.provenance["malicious_examples"],
                                 "benign_examples": s.provenance["benign_examples"]}
                          for name, s in subspaces.items()},
            "file": str(Path(args.out) / "subspaces.safetensors"), "provenance": provenance,
            "harmful_train_ids": [e.id for e in harmful]}


@with_output
def care_generate_command(args: argparse.Namespace, out: Path) -> dict:
    """Generate on the held-out prompts with CARE's projection at every step and report refusal rates (keyword
    judge) of harmful and benign prompts before and after, for every α and k."""
    from ports.errors import InputError
    from precise_jax.care import evaluate_projection
    from precise_jax.subspace import load_subspaces

    lm = load_model(args)
    subspaces, metadata = load_subspaces(args.subspaces)
    fitted_on = {s.provenance.get("model") for s in subspaces.values()}
    if fitted_on != {lm.model_id}:
        raise InputError(f"care generate: {args.subspaces} was fitted on {sorted(map(str, fitted_on))}, not on "
                         f"{lm.model_id}; fit subspaces on this model first")
    _, harmful, _, benign = split_sets(args, lm)
    result = evaluate_projection(lm, subspaces, harmful, benign, alphas=args.alpha, ks=args.k or [None],
                                 fusion=args.fusion, apply_at=args.apply_at, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, examples=args.examples)
    return {"model": args.model, "subspaces": args.subspaces, "fit": metadata, **result}


def add_care_parser(commands: argparse._SubParsersAction) -> None:
    care = commands.add_parser(
        "care", help="CARE: causal diagnosis, safety subspaces, projection at inference",
        description="CARE in three steps: `diagnose` finds the layers, `fit` learns safety subspaces there from "
        "the training split, `generate` projects on the held-out split and reports refusal rates.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
               "  precise-jax care diagnose --limit 32 --out runs/care-diagnose\n"
               "  precise-jax care fit --diagnosis runs/care-diagnose/result.json --limit 64 --out runs/care-fit\n"
               "  precise-jax care generate --subspaces runs/care-fit/subspaces.safetensors --alpha 1 4 "
               "--limit 32 --out runs/care-generate")
    steps = care.add_subparsers(dest="step", required=True)

    p = steps.add_parser("diagnose", help="which layers carry refusal (layer skips, activation patching)",
                         description=care_diagnose_command.__doc__,
                         epilog="example: precise-jax care diagnose --limit 32 --attribution-layer 14 "
                                "--out runs/care-diagnose")
    add_common(p)
    p.add_argument("--components", nargs="*", default=["block", "attn", "mlp"], choices=["block", "attn", "mlp"],
                   help="what to skip (none: patching only)")
    p.add_argument("--span", type=int, default=2, help="consecutive layers skipped together (CARE: 2)")
    p.add_argument("--window", type=int, default=3, help="how many consecutive layers to choose")
    p.add_argument("--choose-by", default="mlp.out", help="the effect that chooses the layers: a patched site kind "
                   "(mlp.out, attn.out, resid) or skip-block / skip-attn / skip-mlp")
    p.add_argument("--attribution-layer", type=int, help="also compare attribution patching with exact "
                   "one-neuron patching over this layer's neurons (rank correlation)")
    p.add_argument("--attribution-pairs", type=int, default=4)
    p.set_defaults(run=care_diagnose_command)

    p = steps.add_parser("fit", help="fit safety subspaces (generalized eigen-decomposition)",
                         description=care_fit_command.__doc__,
                         epilog="example: precise-jax care fit --diagnosis runs/care-diagnose/result.json --k 16 "
                                "--limit 64 --out runs/care-fit")
    add_common(p)
    p.add_argument("--diagnosis", help="result.json of `care diagnose` (its chosen layers)")
    p.add_argument("--layers", type=int, nargs="+", help="the layers, instead of --diagnosis")
    p.add_argument("--site", default="resid", choices=["resid", "mlp.out", "attn.out"],
                   help="where activations are read (the official code: resid, the layer's output)")
    p.add_argument("--k", type=int, default=16, help="subspace dimension")
    p.add_argument("--mode", default="orthonormal", choices=["orthonormal", "faithful"])
    p.add_argument("--shrinkage", type=float, default=0.1, help="benign covariance shrinkage (orthonormal mode)")
    p.add_argument("--selection", default="kernel", choices=["kernel", "mean"],
                   help="CARE's kernel token selection, or mean pooling")
    p.add_argument("--visual", action=argparse.BooleanOptionalAction, default=None,
                   help="fit a visual subspace too (default: when the model has a vision tower)")
    p.set_defaults(run=care_fit_command)

    p = steps.add_parser("generate", help="project at inference on held-out prompts; refusal before/after",
                         description=care_generate_command.__doc__,
                         epilog="example: precise-jax care generate --subspaces runs/care-fit/subspaces.safetensors "
                                "--alpha 1 2 4 --k 4 16 --limit 32 --out runs/care-generate")
    add_common(p)
    p.add_argument("--subspaces", required=True, help="subspaces.safetensors written by `care fit`")
    p.add_argument("--alpha", type=float, nargs="+", default=[1.0], help="projection strengths (one run each)")
    p.add_argument("--k", type=int, nargs="+", help="leading directions used (one run each; default all)")
    p.add_argument("--fusion", default="adaptive", choices=["adaptive", "parallel", "sequential"])
    p.add_argument("--apply-at", choices=["mlp.out", "resid", "attn.out"],
                   help="site kind to project at (default: where the subspaces were fitted; official: mlp.out)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--examples", type=int, default=3, help="example responses to show in the summary")
    p.set_defaults(run=care_generate_command)


def build_parser() -> argparse.ArgumentParser:
    from precise_jax.shield import PipelineConfig

    parser = argparse.ArgumentParser(prog="precise-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    from precise_jax.claims import TRANSFER_MODELS, ClaimsConfig
    from precise_jax.organism import OrganismConfig

    p = commands.add_parser(
        "demo", help="the main job: the methods' claims tested on a model organism, with a report",
        description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  precise-jax demo\n  precise-jax demo --languages en it vi zh --train-languages en it "
               "--random-seeds 5 --out runs/claims\n  precise-jax demo --model path/to/hf-folder --transfer neurons "
               "\"random neurons\"")
    add_model(p, default="the model organism, built and cached on first use")
    add_output(p, default="runs/claims-<date>-<time>")
    claims = ClaimsConfig()
    group = p.add_argument_group("the claims")
    group.add_argument("--languages", nargs="+", default=list(claims.languages), help="MultiJail languages studied")
    group.add_argument("--train-languages", nargs="+", default=list(claims.train_languages),
                       help="transfer: align on these, the other languages are held out")
    group.add_argument("--transfer", nargs="+", default=list(claims.transfer), choices=TRANSFER_MODELS)
    add_config_options(p, claims, {
        "eval_examples": "held-out prompts per language",
        "locate_examples": "fitting prompts per language for the neuron statistics",
        "random_seeds": "random neuron sets and directions per control",
        "train_examples": "harmful -> refusal pairs per training language (and benign pairs)",
        "train_steps": "alignment steps of every transfer model",
        "max_new_tokens": "greedy tokens per reply", "ratio": "per-layer top-k fraction",
        "seed": "splits, data order, random sets", "batch_size": "prompts per batch"}, title="sizes")
    p.set_defaults(run=demo)

    p = commands.add_parser("organism", help="build (or find cached) the English-only refusing model organism",
                            description=organism_command.__doc__,
                            epilog="examples:\n  precise-jax organism\n  precise-jax organism --learning-rate 5e-5 "
                                   "--harmful advbench jbb harmbench-standard")
    p.add_argument("--base", help="the base model folder (default: the real SmolLM2-135M-Instruct)")
    organism = OrganismConfig()
    for f in dataclasses.fields(OrganismConfig):
        default = getattr(organism, f.name)
        if isinstance(default, tuple):  # prompt sets by name
            p.add_argument("--" + f.name.replace("_", "-"), nargs="+", default=None,
                           help=f"(default {' '.join(default)})")
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=None,
                           help=f"(default {default})")
    p.set_defaults(run=organism_command)

    p = commands.add_parser(
        "shield",
        help="Precise Shield end to end on a real model (locate, causal check, align, evaluate), with a report",
        description=(shield_pipeline.__doc__ or "") + " Every option of the pipeline can be passed; the defaults fit "
        "a 2-core CPU in about 10 minutes.",
        epilog="examples:\n  precise-jax shield\n  precise-jax shield --baselines random --eval-examples 64 --out "
               "runs/shield\n  precise-jax shield --model path/to/hf-folder --languages en de --translations "
               "de.jsonl --refusals refusals.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model(p)
    add_prompt_sets(p)
    add_output(p, default="runs/shield-<date>-<time>")
    defaults = PipelineConfig()
    group = p.add_argument_group("conditions")
    group.add_argument("--languages", nargs="+", default=list(defaults.languages),
                       help="conditions' languages; those the prompt sets lack need --translations or --apertium")
    group.add_argument("--modalities", nargs="+", default=list(defaults.modalities),
                       choices=["text", "typographic", "image+text"], help="conditions' modalities (images need a "
                       "vision-language model)")
    group.add_argument("--translations", help="a translation file or folder (columns id, language, prompt)")
    group.add_argument("--apertium", action="store_true", help="translate missing languages with the offline "
                       "Apertium tool (apt install apertium apertium-<pair>)")
    group.add_argument("--refusals", help="JSON {language: [refusal reply, ...]} for languages other than English")
    add_config_options(p, defaults, {
        "locate_examples": "harmful and benign prompts per condition for the neuron statistics",
        "train_examples": "harmful->refusal and benign->answer training pairs per condition",
        "eval_examples": "held-out harmful and benign prompts per condition",
        "held_out": "fraction of each prompt set held out (seeded split)",
        "max_tokens": "drop prompts and training pairs longer than this many tokens",
        "seed": "data split, training order and random neuron sets",
        "random_seeds": "random neuron sets in the causal check",
        "epochs": "alignment epochs",
        "learning_rate": "alignment learning rate (AdamW)",
        "weight_decay": "decoupled weight decay on the trained matrices",
        "max_new_tokens": "tokens generated per response (greedy)",
        "batch_size": "prompts per batch",
        "validate_every": "alignment steps between checks of the checkpoint rule (0: none)",
        "validation_examples": "harmful and benign fitting prompts of the checkpoint rule, never trained on",
        "min_refusal": "the rule: stop at the first check with harmful refusal >= this",
        "max_over_refusal": "... and benign refusal <= this; else keep the check with the best margin"},
        title="sizes and training")
    add_neuron_selection(p, ratio=defaults.ratio, positions=defaults.positions, pool=defaults.pool,
                         score=defaults.score)
    group = p.add_argument_group("method")
    group.add_argument("--combine", default=defaults.combine, choices=["union", "intersection"],
                       help="how the conditions' neuron sets combine")
    group.add_argument("--ablations", nargs="+", default=list(defaults.ablations), choices=["zero", "mean", "amplify"],
                       help="edits of the causal check (each against random sets of the same size)")
    group.add_argument("--mode", default=defaults.mode, choices=["lean", "masked"])
    group.add_argument("--baselines", nargs="*", default=list(defaults.baselines), choices=["random"],
                       help="also train a random neuron set of the same size per layer, the same way")
    group.add_argument("--judge", help="also judge attack success with a classifier: harmbench:FOLDER (HarmBench's "
                       "Llama-2-13b classifier) or llama-guard-3:FOLDER, a local checkpoint folder; the report names "
                       "the judge of every number")
    group.add_argument("--save-model", action="store_true", help="also export the aligned model (HF safetensors)")
    p.set_defaults(run=shield_pipeline)

    p = commands.add_parser("locate", help="locate safety neurons (Precise Shield stage 1)",
                            description=locate_command.__doc__,
                            epilog="example: precise-jax locate --limit 96 --ratio 0.01 --out runs/locate")
    add_common(p)
    add_neuron_selection(p, ratio=0.001)
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
    add_validation(p, default_every=0)
    p.set_defaults(run=align_command)
    add_care_parser(commands)
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
