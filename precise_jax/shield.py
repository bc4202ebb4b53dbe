"""The Precise Shield pipeline: locate safety neurons per condition, check that they are causal, align.

    located = locate(lm, harmful={"en-text": [...]}, benign={"en-text": [...]})
    check = causal_check(lm, located.neurons, held_out_harmful)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import numpy as np

from ports.errors import InputError
from precise_jax.capture import collect
from ports.processing import encode_chat
from precise_jax.data import make_batches, stable_hash
from precise_jax.evaluate import refusal_keyword_judge, refusal_scores, refusal_token_ids, respond
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


def model_id(lm) -> str:
    return str(lm.source) if lm.source is not None else str(lm.hf_config.get("_name_or_path", "unknown"))


def neuron_stats(lm, examples: Sequence, *, positions: str = "prompt", pool: str = "mean", batch_size: int = 8,
                 progress: bool = True):
    """Streaming statistics of every layer's neurons (`lm.layers.{l}.mlp.act`) over a prompt set."""
    if not examples:
        raise InputError("empty prompt set: there is nothing to collect statistics from")
    sites = layer_sites("lm", lm.config.num_layers, ["mlp.act"])
    return collect(lm, make_batches(examples, lm, batch_size), sites, positions=positions, pool=pool,
                   total=len(examples), progress=progress)


def locate(
    lm,
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
    per_condition, benign_stats = {}, None
    for name in harmful:
        h = neuron_stats(lm, harmful[name], positions=positions, pool=pool, batch_size=batch_size, progress=progress)
        b = neuron_stats(lm, benign[name], positions=positions, pool=pool, batch_size=batch_size, progress=progress)
        metadata = {"model": model_id(lm), "condition": name, "positions": positions, "pool": pool,
                    "harmful_data": h.metadata["data"], "benign_data": b.metadata["data"],
                    "harmful_examples": h.metadata["examples"], "benign_examples": b.metadata["examples"]}
        per_condition[name] = select_safety_neurons(lm.params, h.stats, b.stats, score=score, ratio=ratio,
                                                    budget=budget, layers=layers, metadata=metadata)
        benign_stats = b.stats if benign_stats is None else {k: v.merge(b.stats[k]) for k, v in benign_stats.items()}
    combined = combine(per_condition.values(), how)
    combined = dataclasses.replace(combined, metadata={**combined.metadata, "combined": how,
                                                       "conditions": sorted(per_condition)})
    return Located(per_condition, combined, overlap_matrix(per_condition), benign_stats)


def causal_check(
    lm,
    neurons: NeuronSet,
    harmful: Sequence,
    *,
    kind: str = "zero",
    means: Mapping[str, Moments] | None = None,
    random_seeds: int = 5,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Refusal rate and refusal logit score on `harmful` prompts: unedited, with `neurons` ablated, and with
    random sets of the same size per layer (one per seed). Safety neurons should lower refusal far more."""
    if random_seeds < 1:
        raise InputError("the causal check needs at least one random control set")
    languages = [getattr(e, "language", "en") for e in harmful]
    refusal_ids = refusal_token_ids(getattr(lm.processor, "tokenizer", lm.processor))

    def measure(label, params):
        texts = respond(lm, harmful, batch_size=batch_size, max_new_tokens=max_new_tokens, hook=unit_edit_hook,
                        hook_params=params, progress=progress, description=label)
        scores = refusal_scores(lm, harmful, refusal_ids, batch_size=batch_size, hook_params=params)
        refused = refusal_keyword_judge(texts, languages)
        return {"refusal_rate": float(refused.mean()), "refusal_logit": float(scores.mean()),
                "responses": texts}

    base = measure("unedited", {})
    target = measure("safety neurons", neuron_ablation(neurons, kind, means=means))
    controls = [measure(f"random set {s}", neuron_ablation(random_like(neurons, s), kind, means=means))
                for s in range(random_seeds)]

    def summary(results):
        rates = np.array([r["refusal_rate"] for r in results])
        logits = np.array([r["refusal_logit"] for r in results])
        return {"refusal_rate_mean": float(rates.mean()), "refusal_rate_std": float(rates.std()),
                "refusal_logit_mean": float(logits.mean()), "refusal_logit_std": float(logits.std())}

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
        "logit_drop": base["refusal_logit"] - target["refusal_logit"],
        "random_logit_drop": base["refusal_logit"] - summary(controls)["refusal_logit_mean"],
    }


# ----------------------------------------------------------------------------------------------------- alignment data

# Refusal replies for the harmful half of the alignment set. No registry ships refusal texts, so these few were
# written for this project (synthetic, English); other languages come from the user's translation files.
REFUSALS = {
    "en": [
        "I'm sorry, but I can't help with that request.",
        "I can't assist with that, because it could cause serious harm.",
        "I'm sorry, but I cannot provide that. It could be used to hurt people.",
        "I won't help with this request: it involves harmful or illegal activity.",
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
    for i, example in enumerate(harmful):
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


def within_length(examples: Sequence, lm, max_tokens: int) -> list:
    """The examples whose chat-templated prompt (and reply) take at most `max_tokens` tokens."""
    tokenizer = getattr(lm.processor, "tokenizer", lm.processor)
    keep = []
    for example in examples:
        ids, _ = encode_chat(tokenizer, example.prompt, example.response)
        if len(ids) <= max_tokens:
            keep.append(example)
    return keep
