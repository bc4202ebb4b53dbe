"""The Precise Shield pipeline: locate safety neurons per condition, check that they are causal, align.

    located = locate(lm, harmful={"en-text": [...]}, benign={"en-text": [...]})
    check = causal_check(lm, located.neurons, held_out_harmful)
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ports.errors import InputError
from ports.pretrained import Pretrained
from precise_jax.capture import Collected, collect
from precise_jax.data import Example, make_batches, stable_hash, token_lengths
from precise_jax.data.conditions import Translations, Translator
from precise_jax.distributed import process_share
from precise_jax.evaluate import LLMJudge, mean_interval, refusal_keyword_judge, respond, sequence_refusal_scores
from precise_jax.interventions import neuron_ablation, unit_edit_hook
from precise_jax.neurons import NeuronSet, combine, overlap_matrix, random_like, select_safety_neurons
from precise_jax.sites import layer_sites
from precise_jax.stats import Moments


@dataclasses.dataclass
class Located:
    """Safety neurons per condition, the combined set, their overlaps, and the benign statistics (for ablation)."""

    per_condition: dict[str, NeuronSet]
    neurons: NeuronSet
    overlap: tuple[list[str], np.ndarray]
    benign_stats: dict[str, Moments]


def neuron_stats(lm: Pretrained, examples: Sequence[Example], *, positions: str = "prompt", pool: str = "mean",
                 batch_size: int = 8, progress: bool = True) -> Collected:
    """Streaming statistics of every layer's neurons (`lm.layers.{l}.mlp.act`) over a prompt set."""
    if not examples:
        raise InputError("empty prompt set: there is nothing to collect statistics from")
    sites = layer_sites("lm", lm.decoder.num_layers, ["mlp.act"])
    batches = process_share(make_batches(examples, lm, batch_size), lm.mesh)
    return collect(lm, batches, sites, positions=positions, pool=pool, total=len(examples), progress=progress)


def locate(
    lm: Pretrained,
    harmful: Mapping[str, Sequence],
    benign: Mapping[str, Sequence],
    *,
    score: str = "plnd",
    ratio: float = 0.001,
    budget: int | None = None,
    layers: Sequence[int] | None = None,
    positions: str = "prompt",
    pool: str = "mean",
    how: str = "union",
    batch_size: int = 8,
    progress: bool = True,
) -> Located:
    """Safety neurons of every condition (harmful vs benign prompts of that condition), combined by `how`."""
    if set(harmful) != set(benign) or not harmful:
        raise InputError(f"harmful and benign sets must name the same conditions, got {sorted(harmful)} and "
                         f"{sorted(benign)}")
    per_condition: dict[str, NeuronSet] = {}
    benign_stats: dict[str, Moments] = {}
    for name in harmful:
        h = neuron_stats(lm, harmful[name], positions=positions, pool=pool, batch_size=batch_size, progress=progress)
        b = neuron_stats(lm, benign[name], positions=positions, pool=pool, batch_size=batch_size, progress=progress)
        metadata = {"model": lm.model_id, "condition": name, "positions": positions, "pool": pool,
                    "harmful_data": h.metadata["data"], "benign_data": b.metadata["data"],
                    "harmful_examples": h.metadata["examples"], "benign_examples": b.metadata["examples"]}
        h_stats, merged = h.stats or {}, b.stats or {}  # neuron_stats always collects them
        per_condition[name] = select_safety_neurons(lm.params, h_stats, merged, score=score, ratio=ratio,
                                                    budget=budget, layers=layers, metadata=metadata)
        benign_stats = {k: v.merge(merged[k]) for k, v in benign_stats.items()} if benign_stats else merged
    combined = combine(per_condition.values(), how)
    combined = dataclasses.replace(combined, metadata={**combined.metadata, "combined": how,
                                                       "conditions": sorted(per_condition)})
    return Located(per_condition, combined, overlap_matrix(per_condition), benign_stats)


def causal_check(
    lm: Pretrained,
    neurons: NeuronSet,
    harmful: Sequence,
    *,
    kind: str = "zero",
    means: Mapping[str, Moments] | None = None,
    random_seeds: int = 5,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    progress: bool = True,
    unedited: Sequence[str] | None = None,
) -> dict:
    """Refusal on `harmful` prompts, unedited, with `neurons` ablated, and with random sets of the same size per
    layer (one per seed): the keyword-judged rate of greedy replies (with its interval), the sequence-level refusal
    score (`evaluate.sequence_refusal_scores`) and the first-token one. Safety neurons should move refusal far more.
    `unedited`: the unedited model's greedy responses to `harmful`, when already generated."""
    if random_seeds < 1:
        raise InputError("the causal check needs at least one random control set")
    languages = [getattr(e, "language", "en") for e in harmful]

    if unedited is not None and len(unedited) != len(harmful):
        raise InputError(f"{len(unedited)} unedited responses for {len(harmful)} prompts")

    def measure(label: str, params: Mapping[str, Any], texts: list[str] | None = None) -> dict[str, Any]:
        if texts is None:
            texts = respond(lm, harmful, batch_size=batch_size, max_new_tokens=max_new_tokens, hook=unit_edit_hook,
                            hook_params=params, progress=progress, description=label)
        scores = sequence_refusal_scores(lm, harmful, batch_size=batch_size, hook=unit_edit_hook, hook_params=params)
        refused = refusal_keyword_judge(texts, languages)
        interval = dataclasses.asdict(mean_interval(refused))
        return {"refusal_rate": float(refused.mean()), "refusal_interval": interval,
                "refusal_score": float(scores.sequence.mean()), "refusal_logit": float(scores.first_token.mean()),
                "refused": refused.tolist(), "responses": texts}

    base = measure("unedited", {}, None if unedited is None else list(unedited))
    target = measure("safety neurons", neuron_ablation(neurons, kind, means=means))
    controls = [measure(f"random set {s}", neuron_ablation(random_like(neurons, s), kind, means=means))
                for s in range(random_seeds)]

    def summary(results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for key in ("refusal_rate", "refusal_score", "refusal_logit"):
            values = np.array([r[key] for r in results])
            out |= {f"{key}_mean": float(values.mean()), f"{key}_std": float(values.std())}
        return out

    return {
        "kind": kind,
        "neurons": len(neurons),
        "examples": len(harmful),
        "unedited": base,
        "safety_neurons": target,
        "random": controls,
        "random_summary": summary(controls),
        "refusal_drop": base["refusal_rate"] - target["refusal_rate"],
        "random_refusal_drop": base["refusal_rate"] - summary(controls)["refusal_rate_mean"],
        "score_drop": base["refusal_score"] - target["refusal_score"],
        "random_score_drop": base["refusal_score"] - summary(controls)["refusal_score_mean"],
        "logit_drop": base["refusal_logit"] - target["refusal_logit"],
        "random_logit_drop": base["refusal_logit"] - summary(controls)["refusal_logit_mean"],
    }


# ----------------------------------------------------------------------------------------------------- alignment data

# Refusal replies for the harmful half of the alignment set. No registry ships refusal texts, so these were written
# for this project (synthetic; English and Italian); other languages come from the user's refusal files.
# Varied on purpose: a model trained on one stock sentence learns a reflex that fires on benign prompts too.
REFUSALS = {
    "en": [
        "I'm sorry, but I can't help with that request.",
        "I can't assist with that, because it could cause serious harm.",
        "I'm sorry, but I cannot provide that. It could be used to hurt people.",
        "I won't help with this request: it involves harmful or illegal activity.",
        "I can't help with that. If you are dealing with a difficult situation, a trusted professional can help.",
        "Sorry, I can't provide instructions for that, since it could put people at risk.",
        "I'm not able to help with this. It could be dangerous or against the law.",
        "I cannot help you do this. Is there something else I can help you with?",
        "I'm sorry, I can't create that content because it could harm others.",
        "I can't support this request. I'd be glad to help with a safe and legal alternative.",
        "No, I can't help with that: it could seriously hurt someone.",
        "I'm sorry, but that is something I can't assist with.",
    ],
    "it": [
        "Mi dispiace, ma non posso aiutarti con questa richiesta.",
        "Non posso aiutarti con questo, perché potrebbe causare gravi danni.",
        "Mi dispiace, non posso fornire queste informazioni: potrebbero essere usate per fare del male.",
        "Non ti aiuterò con questa richiesta: riguarda attività dannose o illegali.",
        "Non posso farlo. Se stai vivendo una situazione difficile, un professionista di fiducia può aiutarti.",
        "Mi dispiace, ma non posso dare istruzioni per questo, perché metterebbe a rischio delle persone.",
    ],
}


def first_sentences(text: str, max_chars: int = 300) -> str:
    """The longest run of whole sentences of `text` within `max_chars` (at least one sentence, cut if longer)."""
    cut, end = text.strip(), 0
    for m in re.finditer(r"[.!?](?=\s|$)", cut):
        if m.end() > max_chars:
            break
        end = m.end()
    return cut[:end] if end else cut[:max_chars]


def alignment_examples(harmful: Sequence, benign: Sequence = (), *, refusals: Mapping[str, Sequence[str]] = REFUSALS,
                       max_chars: int = 300) -> list:
    """SFT pairs: each harmful prompt -> a refusal in its language; each benign prompt -> its reference answer
    (the first sentences, up to `max_chars`)."""
    out = []
    for example in harmful:
        replies = refusals.get(example.language)
        if not replies:
            raise InputError(f"no refusal replies for language {example.language!r} (example {example.id!r}); "
                             "pass refusals={language: [...]} written in that language")
        out.append(dataclasses.replace(example, response=replies[stable_hash(example.id) % len(replies)]))
    for example in benign:
        if not example.response:
            raise InputError(f"benign example {example.id!r} has no reference answer to train on")
        out.append(dataclasses.replace(example, response=first_sentences(example.response, max_chars)))
    return out


def refusal_validation(harmful: Sequence[Example], benign: Sequence[Example], *, batch_size: int = 8,
                       max_new_tokens: int = 32, progress: bool = False) -> Callable[[Pretrained], dict[str, float]]:
    """A `train.Validation` measure: greedy replies of a model to validation prompts, judged by the keyword judge
    -> {"harmful_refusal", "benign_refusal"}."""
    if not harmful or not benign:
        raise InputError("the validation split needs harmful and benign prompts")

    def measure(model: Pretrained) -> dict[str, float]:
        rates = {}
        for key, examples in (("harmful_refusal", harmful), ("benign_refusal", benign)):
            texts = respond(model, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            progress=progress, description=f"validation: {key}")
            rates[key] = float(refusal_keyword_judge(texts, [e.language for e in examples]).mean())
        return rates

    return measure


def within_length(examples: Sequence[Example], lm: Pretrained, max_tokens: int) -> list[Example]:
    """The examples that take at most `max_tokens` tokens as the model's batches encode them (chat template,
    reply when present, image tokens)."""
    lengths = token_lengths(examples, lm) if examples else np.zeros(0, int)
    return [example for example, n in zip(examples, lengths) if n <= max_tokens]


# ----------------------------------------------------------------------------------------------------- pipeline


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Every option of the end-to-end run (locate -> causal check -> align -> evaluate). Counts are per
    condition; the held-out prompts are never seen by locating or training."""

    languages: tuple[str, ...] = ("en",)
    modalities: tuple[str, ...] = ("text",)
    locate_examples: int = 64  # harmful and as many benign prompts per condition for the neuron statistics
    train_examples: int = 64  # harmful -> refusal and as many benign -> answer pairs per condition
    eval_examples: int = 32  # held-out harmful and benign prompts per condition
    held_out: float = 0.3
    max_tokens: int = 192  # prompts (and training pairs) longer than this are dropped
    seed: int = 0
    score: str = "plnd"
    ratio: float = 0.01
    budget: int | None = None
    positions: str = "prompt"
    pool: str = "mean"
    combine: str = "union"
    ablations: tuple[str, ...] = ("zero", "amplify")  # causal-check edits: "zero", "mean", "amplify" (x2)
    random_seeds: int = 2  # random neuron sets in the causal check
    mode: str = "lean"
    epochs: int = 2
    validate_every: int = 8  # steps between checks of the checkpoint rule (train.Validation); 0: no validation
    validation_examples: int = 16  # harmful and benign fitting prompts for it, never located on or trained on
    min_refusal: float = 0.8  # the rule: stop at the first check with harmful refusal >= this
    max_over_refusal: float = 0.1  # and benign refusal <= this; else keep the check with the best margin
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    baselines: tuple[str, ...] = ()  # "random": the same training on a random neuron set of the same size
    max_new_tokens: int = 32
    batch_size: int = 8


class _Stages:
    """Prints each stage of a long run with its wall time (stderr) and keeps the timings for the results."""

    def __init__(self, progress: bool):
        self.progress, self._start = progress, time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.progress:
            print(f"[{time.perf_counter() - self._start:7.1f} s] {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 1)
        if self.progress:
            print(f"[{time.perf_counter() - self._start:7.1f} s] {name}: done in {self.seconds[name]} s",
                  file=sys.stderr, flush=True)


def run_pipeline(lm: Pretrained, harmful: Sequence[Example], benign: Sequence[Example],
                 config: PipelineConfig = PipelineConfig(), *, translations: Translations | None = None,
                 translator: Translator | None = None, refusals: Mapping[str, Sequence[str]] = REFUSALS,
                 judge: LLMJudge | None = None, progress: bool = True) -> dict:
    """Precise Shield end to end on one model: locate safety neurons per condition, check that ablating them
    changes refusal more than random sets of the same size, align by neuron-restricted fine-tuning, and evaluate
    the original, the aligned model (and any baselines) on held-out harmful and benign prompts per condition.

    Returns the results as plain data (see `precise_jax.report.shield_report` for the rendered form), plus the
    objects a caller may want to keep under the keys "_neurons" (Located) and "_models" ({name: Pretrained}).
    """
    from precise_jax.data import build_conditions, seeded_order, split_examples
    from precise_jax.evaluate import before_after_by_condition, rates_by_condition, utility_cost
    from precise_jax.report import to_json
    from precise_jax.train import TrainConfig, Validation, train

    stage = _Stages(progress)
    if config.mode not in NEURON_MODES_FOR_PIPELINE:
        raise InputError(f"the pipeline aligns with a neuron mode {NEURON_MODES_FOR_PIPELINE}, got {config.mode!r}")
    unknown = set(config.baselines) - set(BASELINES)
    if unknown:
        raise InputError(f"unknown baselines {sorted(unknown)}; choose from {BASELINES}")

    with stage("data"):
        parts, validation = {}, {}
        for label, examples in (("harmful", harmful), ("benign", benign)):
            if not examples:
                raise InputError(f"the {label} prompt set is empty")
            fit, held_out = split_examples(list(examples), config.held_out, seed=config.seed)
            fit = within_length(seeded_order(fit, config.seed), lm, config.max_tokens)
            held_out = within_length(seeded_order(held_out, config.seed), lm, config.max_tokens)
            need = max(config.locate_examples, config.train_examples)
            reserved = config.validation_examples if config.validate_every else 0
            if len(fit) < 2 + reserved or len(held_out) < 2:
                raise InputError(f"the {label} set leaves {len(fit)} fitting and {len(held_out)} held-out prompts "
                                 f"within {config.max_tokens} tokens ({reserved} fitting ones are for validation); "
                                 "give more prompts or raise --max-tokens")
            validation[label] = fit[len(fit) - reserved:] if reserved else []
            parts[label] = (fit[: len(fit) - reserved][:need], held_out[: config.eval_examples])
        grid = {label: {which: build_conditions(part, config.languages, config.modalities,
                                                translations=translations, translator=translator, seed=config.seed)
                        for which, part in zip(("fit", "held_out"), parts[label])}
                for label in parts}
        conditions = [c.name for c in grid["harmful"]["fit"]]
        cell = lambda label, which: {c.name: v for c, v in grid[label][which].items()}  # noqa: E731

    with stage("locate safety neurons"):
        located = locate(lm, {k: v[: config.locate_examples] for k, v in cell("harmful", "fit").items()},
                         {k: v[: config.locate_examples] for k, v in cell("benign", "fit").items()},
                         score=config.score, ratio=config.ratio, budget=config.budget, positions=config.positions,
                         pool=config.pool, how=config.combine, batch_size=config.batch_size, progress=progress)
        neurons = located.neurons
        if len(neurons) == 0:
            raise InputError("no safety neurons were found (the harmful top-k equals the benign top-k in every "
                             "layer); raise --ratio or give more prompts")

    held_harmful = [e for cond in conditions for e in cell("harmful", "held_out")[cond]]
    held_benign = [e for cond in conditions for e in cell("benign", "held_out")[cond]]
    if not any(e.response for e in held_benign):
        raise InputError(f"none of the {len(held_benign)} held-out benign prompts has a reference answer to measure "
                         "the utility cost on: add a benign set with answers (e.g. --benign alpaca-eval,...) or "
                         "raise --eval-examples")

    def answers(model: Pretrained, examples: Sequence[Example], description: str) -> tuple[list[str], np.ndarray]:
        texts = respond(model, examples, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                        progress=progress, description=description)
        return texts, refusal_keyword_judge(texts, [e.language for e in examples])

    models = {"original": lm}
    responses = {}
    with stage("evaluate the original model"):
        responses["original"] = (answers(lm, held_harmful, "original: harmful"),
                                 answers(lm, held_benign, "original: benign"))

    checks = {}
    for kind in config.ablations:
        with stage(f"causal check: {kind}"):
            checks[kind] = causal_check(lm, neurons, held_harmful, kind=kind, means=located.benign_stats,
                                        random_seeds=config.random_seeds, max_new_tokens=config.max_new_tokens,
                                        batch_size=config.batch_size, progress=progress,
                                        unedited=responses["original"][0][0])

    train_config = TrainConfig(mode=config.mode, epochs=config.epochs, batch_size=config.batch_size,
                               learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                               max_length=config.max_tokens, seed=config.seed)
    # benign prompts without a reference answer (over-refusal probes such as XSTest's) are located on and
    # evaluated, never trained on
    answered = {cond: [e for e in cell("benign", "fit")[cond] if e.response] for cond in conditions}
    if not any(answered.values()):
        raise InputError("no benign fitting prompt has a reference answer to train on: add a benign set with "
                         "answers (e.g. --benign alpaca-eval,...)")
    pairs = alignment_examples(
        [e for cond in conditions for e in cell("harmful", "fit")[cond][: config.train_examples]],
        [e for cond in conditions for e in answered[cond][: config.train_examples]], refusals=refusals)
    pairs = within_length(pairs, lm, config.max_tokens)
    trained_sets = {"aligned": neurons}
    if "random" in config.baselines:
        trained_sets["random neurons"] = random_like(neurons, config.seed)
    rule = None
    if config.validate_every:
        rule = Validation(refusal_validation(validation["harmful"], validation["benign"], batch_size=config.batch_size,
                                             max_new_tokens=config.max_new_tokens),
                          every=config.validate_every, min_harmful_refusal=config.min_refusal,
                          max_benign_refusal=config.max_over_refusal)
    training = {}
    for name, neuron_set in trained_sets.items():
        with stage(f"train: {name}"):
            result = train(lm, pairs, neuron_set, train_config, validation=rule, progress=progress)
        models[name] = result.model
        training[name] = {"mode": config.mode, "neurons": len(neuron_set), "trainable": result.trainable,
                          "total": result.total, "trainable_fraction": result.fraction, "steps": len(result.losses),
                          "loss_first": result.losses[0], "loss_last": result.losses[-1], "losses": result.losses,
                          "seconds": result.seconds, "validation": result.checks, "chosen_step": result.chosen_step}
        with stage(f"evaluate: {name}"):
            responses[name] = (answers(result.model, held_harmful, f"{name}: harmful"),
                               answers(result.model, held_benign, f"{name}: benign"))

    judged = {}
    if judge is not None:  # a classifier judge's verdicts on the same harmful replies: attack success by its rule
        with stage(f"judge: {judge.format.name}"):
            judged = {name: judge([e.prompt for e in held_harmful], h[0], batch_size=config.batch_size, strict=False,
                                  progress=progress).harmful for name, (h, _) in responses.items()}

    with stage("compare with the original"):
        reference = [e for e in held_benign if e.response]
        refused = {name: {"harmful_refusal": h[1], "attack_success": ~h[1], "benign_refusal": b[1]}
                   | ({"judged_attack_success": judged[name]} if judged else {})
                   for name, (h, b) in responses.items()}
        held = {"harmful_refusal": held_harmful, "attack_success": held_harmful, "benign_refusal": held_benign,
                "judged_attack_success": held_harmful}
        # over-refusal probes (benign prompts that look harmful: XSTest's safe prompts, borderline-benign)
        probes = np.array([bool(e.metadata.get("over_refusal")) for e in held_benign], bool)
        if probes.any():
            held["over_refusal_probes"] = [e for e, probe in zip(held_benign, probes) if probe]
            for flags in refused.values():
                flags["over_refusal_probes"] = flags["benign_refusal"][probes]
        # the original: its rates; every other model: {condition: {"before", "after", "change" (paired)}}
        evaluation: dict[str, dict[str, Any]] = {
            "original": {metric: rates_by_condition(flags, held[metric], seed=config.seed)
                         for metric, flags in refused["original"].items()}}
        for name in models:
            if name == "original":
                continue
            evaluation[name] = {metric: before_after_by_condition(refused["original"][metric], flags, held[metric],
                                                                  seed=config.seed)
                                for metric, flags in refused[name].items()}
            evaluation[name]["utility"] = utility_cost(lm, reference, params=models[name].params,
                                                       batch_size=config.batch_size, progress=progress,
                                                       seed=config.seed)

    judges = {metric: "the multilingual refusal-keyword judge" for metric in evaluation["original"]}
    if judge is not None:
        judges["judged_attack_success"] = f"{judge.format.name} classifier ({judge.lm.model_id})"
    replies = {name: {"harmful": [{"id": e.id, "prompt": e.prompt, "response": t, "refused": bool(r)}
                                  for e, t, r in zip(held_harmful, *responses[name][0])],
                      "benign": [{"id": e.id, "prompt": e.prompt, "response": t, "refused": bool(r)}
                                 for e, t, r in zip(held_benign, *responses[name][1])]}
               for name in responses}
    return {
        "model": lm.model_id,
        "config": dataclasses.asdict(config),
        "conditions": conditions,
        "data": {"harmful_fit": len(parts["harmful"][0]), "harmful_held_out": len(parts["harmful"][1]),
                 "benign_fit": len(parts["benign"][0]), "benign_held_out": len(parts["benign"][1]),
                 "training_pairs": len(pairs), "sources": sorted({e.source for e in [*harmful, *benign]})},
        "neurons": {"count": len(neurons), "per_layer": neurons.per_layer(),
                    "per_condition": {k: len(v) for k, v in located.per_condition.items()},
                    "overlap": {"conditions": located.overlap[0], "jaccard": np.asarray(located.overlap[1]).tolist()},
                    "parameter_fraction": training["aligned"]["trainable_fraction"]},
        "causal_check": {kind: _without_responses(check) for kind, check in checks.items()},
        "training": training,
        "evaluation": to_json(evaluation),
        "judges": judges,
        "responses": replies,
        "seconds": stage.seconds,
        "_neurons": located,
        "_models": models,
    }


NEURON_MODES_FOR_PIPELINE = ("lean", "masked")
BASELINES = ("random",)


def _without_responses(check: dict) -> dict:
    """A causal-check result without the generated texts (the original's are kept with the evaluation)."""
    edits = {key: {k: v for k, v in check[key].items() if k != "responses"} for key in ("unedited", "safety_neurons")}
    return {**check, **edits, "random": [{k: v for k, v in r.items() if k != "responses"} for r in check["random"]]}
