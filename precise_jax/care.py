"""The CARE pipeline: diagnose which layers carry refusal, fit safety subspaces there, project at generation.

    diagnosis = diagnose(lm, harmful, benign)                      # layer skips + activation patching
    subspaces = fit(lm, harmful_train, diagnosis.layers)           # compliant vs refusing continuations
    report = evaluate_projection(lm, subspaces, held_out_harmful, held_out_benign, alphas=[1, 4])

The text subspace contrasts, on the *same* harmful prompts, a compliant reply opening (the data set's target,
e.g. JBB's "Sure, here is ...", else one of `COMPLIANT`) with a refusal (`shield.REFUSALS`), as the official code
contrasts compliant and non-compliant responses. A model with a vision tower also gets a visual subspace:
harmful prompts as typographic images vs benign prompts with real photos.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from ports.errors import InputError
from ports.pretrained import Pretrained
from precise_jax.capture import available_sites
from precise_jax.data import Example, build_conditions, make_batches, stable_hash
from precise_jax.distributed import process_share
from precise_jax.evaluate import (
    mean_interval, refusal_keyword_judge, refusal_scores, refusal_token_ids, respond, sequence_refusal_scores,
    tokenizer_of,
)
from precise_jax.interventions import FUSIONS, care_projection, projection_hook
from precise_jax.mediation import activation_patching, attribution_patching, layer_skip_effects, neuron_patching
from precise_jax.shield import REFUSALS
from precise_jax.subspace import MODES, SELECTIONS, Subspace, build_subspace, collect_care

SITE_KINDS = ("resid", "mlp.out", "attn.out")
# Compliant reply openings for harmful prompts without a data-set target (synthetic, written for this project).
COMPLIANT = [
    "Sure, here is what you asked for.",
    "Certainly! Here is a step-by-step guide:",
    "Of course. Here is how you can do it:",
    "Absolutely, here you go:",
]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _num_layers(lm) -> int:
    return lm.decoder.num_layers


# ----------------------------------------------------------------------------------------------------- diagnose


@dataclasses.dataclass
class Diagnosis:
    """Per-layer causal effects on the harmful prompts' refusal log-odds, and the layers they point to."""

    layers: list[int]  # the chosen window of consecutive layers
    clean_score: float  # mean refusal log-odds on the harmful prompts, unedited
    skip: dict[str, list[float]]  # component -> [L - span + 1] Δ refusal log-odds when skipping layers l..l+span-1
    patching: dict[str, list[float]]  # site kind -> [L] mean indirect effect of patching from benign prompts
    attribution: dict | None  # rank agreement of attribution patching with exact neuron patching, when asked
    chosen_by: str
    examples: dict[str, int]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def diagnose(
    lm: Pretrained,
    harmful: Sequence[Example],
    benign: Sequence[Example],
    *,
    components: Sequence[str] = ("block", "attn", "mlp"),
    span: int = 2,
    kinds: Sequence[str] = SITE_KINDS,
    window: int = 3,
    choose_by: str = "mlp.out",
    attribution_layer: int | None = None,
    attribution_pairs: int = 4,
    batch_size: int = 8,
) -> Diagnosis:
    """Skip `span` consecutive layers (each component) and patch each layer's sites from benign into harmful
    prompts (last prompt token); choose the `window` consecutive layers where the `choose_by` effect (a site
    kind, or 'skip-<component>') on the refusal log-odds is largest in magnitude, whichever its sign."""
    if not harmful or not benign:
        raise InputError("diagnose needs harmful and benign prompts")
    n = _num_layers(lm)
    if not 1 <= window <= n:
        raise InputError(f"diagnose: window must be in [1, {n}] layers, got {window}")
    unknown = [k for k in kinds if k not in SITE_KINDS]
    if unknown:
        raise InputError(f"diagnose: unknown site kinds {unknown}; choose from {SITE_KINDS}")
    criteria = list(kinds) + [f"skip-{c}" for c in components]
    if choose_by not in criteria:
        raise InputError(f"diagnose: choose_by={choose_by!r} is not measured here; choose one of {criteria}")
    refusal_ids = refusal_token_ids(tokenizer_of(lm))
    batches = list(make_batches(harmful, lm, batch_size))

    skip = {}
    for component in components:
        started = time.perf_counter()
        effects = layer_skip_effects(lm, batches, refusal_ids, component=component, span=span)
        skip[component] = effects.delta_score.tolist()
        clean = effects.clean_score
        _log(f"care diagnose: skipping {component} ({len(effects.skipped)} configurations) "
             f"{time.perf_counter() - started:.0f} s")

    pairs = (min(len(harmful), len(benign)) // batch_size) * batch_size
    if pairs == 0:
        raise InputError(f"diagnose: activation patching pairs harmful and benign prompts in full batches of "
                         f"{batch_size}; give at least {batch_size} of each or a smaller batch size")
    sites = [f"lm.layers.{l}.{kind}" for l in range(n) for kind in kinds]
    totals = {s: 0.0 for s in sites}
    started = time.perf_counter()
    for h, b in zip(make_batches(harmful[:pairs], lm, batch_size), make_batches(benign[:pairs], lm, batch_size)):
        for site, ie in activation_patching(lm, h, b, refusal_ids, sites=sites).items():
            totals[site] += float(np.sum(ie))
    patching = {kind: [totals[f"lm.layers.{l}.{kind}"] / pairs for l in range(n)] for kind in kinds}
    _log(f"care diagnose: patched {len(sites)} sites over {pairs} pairs {time.perf_counter() - started:.0f} s")
    if not components:
        clean = float(np.mean(refusal_scores(lm, harmful, refusal_ids, batch_size=batch_size)))

    if choose_by.startswith("skip-"):
        per_start = np.asarray(skip[choose_by[5:]])  # Δ for skipping layers [s, s + span)
        per_layer = np.full(n, 0.0)
        for s, d in enumerate(per_start):  # a layer's effect: the mean over the skips that include it
            per_layer[s:s + span] += d / span
    else:
        per_layer = np.asarray(patching[choose_by])
    # A model that seldom refuses can move either way under a patch; what matters is how much the layers decide.
    sums = np.convolve(np.abs(per_layer), np.ones(window), mode="valid")
    start = int(np.argmax(sums))
    layers = list(range(start, start + window))

    attribution = None
    if attribution_layer is not None:
        attribution = attribution_agreement(lm, harmful, benign, attribution_layer, pairs=attribution_pairs)
    return Diagnosis(layers=layers, clean_score=clean, skip=skip, patching=patching, attribution=attribution,
                     chosen_by=choose_by, examples={"harmful": len(harmful), "benign": len(benign),
                                                    "patching_pairs": pairs})


def attribution_agreement(lm: Pretrained, harmful: Sequence[Example], benign: Sequence[Example], layer: int, *,
                          pairs: int = 4) -> dict:
    """Spearman and Pearson correlation of attribution patching (one forward + backward) with exact one-neuron
    patching (one forward per neuron) over the neurons of `layer`, on `pairs` harmful/benign prompt pairs."""
    from scipy.stats import pearsonr, spearmanr

    if len(harmful) < pairs or len(benign) < pairs:
        raise InputError(f"attribution check: needs {pairs} harmful and {pairs} benign prompts")
    refusal_ids = refusal_token_ids(tokenizer_of(lm))
    h = next(iter(make_batches(harmful[:pairs], lm, pairs)))
    b = next(iter(make_batches(benign[:pairs], lm, pairs)))
    started = time.perf_counter()
    estimate = attribution_patching(lm, h, b, refusal_ids, layers=[layer])
    attribution_seconds = time.perf_counter() - started
    started = time.perf_counter()
    exact = neuron_patching(lm, h, b, refusal_ids, layers=[layer])
    exact_seconds = time.perf_counter() - started
    site = f"lm.layers.{layer}.mlp.act"
    _log(f"care diagnose: attribution vs exact patching of {len(exact[site])} neurons "
         f"({attribution_seconds:.1f} s vs {exact_seconds:.0f} s)")
    top = np.argsort(-np.abs(exact[site]))[:50]
    return {"site": site, "neurons": int(len(exact[site])), "pairs": pairs,
            "spearman": float(spearmanr(exact[site], estimate[site]).statistic),
            "pearson": float(pearsonr(exact[site], estimate[site]).statistic),
            "spearman_top50_exact": float(spearmanr(exact[site][top], estimate[site][top]).statistic),
            "attribution_seconds": attribution_seconds, "exact_seconds": exact_seconds}


# ----------------------------------------------------------------------------------------------------- fit


def continuations(harmful: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """(compliant, refusing): each harmful prompt with a compliant opening (its data-set target when it has one,
    e.g. JBB's "Sure, here is ...") and with a refusal, chosen by a stable hash of its id."""
    compliant, refusing = [], []
    for e in harmful:
        if e.language not in REFUSALS:
            raise InputError(f"no refusal replies for language {e.language!r} (example {e.id!r}); CARE's text "
                             "subspace needs refusing continuations in the prompt's language")
        target = (e.metadata or {}).get("target")
        opening = target or COMPLIANT[stable_hash(e.id) % len(COMPLIANT)]
        replies = REFUSALS[e.language]
        compliant.append(dataclasses.replace(e, response=opening))
        refusing.append(dataclasses.replace(e, response=replies[stable_hash(e.id) % len(replies)]))
    return compliant, refusing


def has_vision(lm: Pretrained) -> bool:
    return any(s.startswith("vision.") for s in available_sites(lm))


def fit(
    lm: Pretrained,
    harmful: Sequence[Example],
    layers: Sequence[int],
    *,
    benign: Sequence[Example] = (),
    site: str = "resid",
    k: int = 16,
    mode: str = "orthonormal",
    shrinkage: float = 0.1,
    selection: str = "kernel",
    visual: bool | None = None,
    batch_size: int = 8,
    provenance: dict | None = None,
) -> dict[str, Subspace]:
    """CARE subspaces at `lm.layers.{l}.{site}` for each layer: text (compliant vs refusing continuations of the
    harmful prompts) and, for a model with a vision tower (or visual=True), visual (harmful prompts as
    typographic images vs `benign` prompts with real photos). Keyed `modality/site`."""
    if site not in SITE_KINDS:
        raise InputError(f"fit: unknown site {site!r}; choose one of {SITE_KINDS}")
    if mode not in MODES or selection not in SELECTIONS:
        raise InputError(f"fit: mode must be one of {MODES} and selection one of {SELECTIONS}")
    if len(harmful) < 2:
        raise InputError(f"fit: {len(harmful)} harmful prompt(s); a covariance needs at least 2 (more than k={k})")
    n = _num_layers(lm)
    if not layers or any(not 0 <= int(l) < n for l in layers):
        raise InputError(f"fit: layers {list(layers)} must be a non-empty list within the model's {n} layers")
    sites = [f"lm.layers.{int(l)}.{site}" for l in layers]
    visual = has_vision(lm) if visual is None else visual
    common = {"model": lm.model_id, "selection": selection, **(provenance or {})}
    options = {"mode": mode, "shrinkage": 0.0 if mode == "faithful" else shrinkage}

    def subspaces(modality: str, malicious: Sequence[Example], benign_examples: Sequence[Example],
                  extra: Mapping[str, str]) -> dict[str, Subspace]:
        kw = {"batch_size": batch_size, "with_response": True}
        mal = collect_care(lm, process_share(make_batches(malicious, lm, **kw), lm.mesh), sites, modality,
                           selection=selection, total=len(malicious))
        ben = collect_care(lm, process_share(make_batches(benign_examples, lm, **kw), lm.mesh), sites, modality,
                           selection=selection, total=len(benign_examples))
        record = {**common, **extra, "malicious_data": mal.metadata["data"], "benign_data": ben.metadata["data"]}
        return {f"{modality}/{s}": build_subspace(ben.stats[s], mal.stats[s], k, site=s, modality=modality,
                                                  provenance=record, **options)
                for s in sites}

    compliant, refusing = continuations(harmful)
    out = subspaces("text", compliant, refusing, {"malicious": "harmful prompt + compliant opening",
                                                  "benign": "the same harmful prompt + a refusal"})
    if visual:
        if len(benign) < 2:
            raise InputError("fit: the visual subspace needs benign prompts (at least 2) to pair with real photos")
        typographic = build_conditions(compliant, modalities=("typographic",))
        photos = build_conditions([dataclasses.replace(e, response=e.response or "") for e in benign],
                                  modalities=("image+text",))
        out |= subspaces("visual", next(iter(typographic.values())), next(iter(photos.values())),
                         {"malicious": "harmful prompt as a typographic image", "benign": "benign prompt + photo"})
    return out


# ----------------------------------------------------------------------------------------------------- generate


def by_layer(subspaces: dict[str, Subspace]) -> dict[int, list[Subspace]]:
    """{layer: [its subspaces, visual first]} from `fit`'s or `load_subspaces`' dictionary."""
    layers: dict[int, list[Subspace]] = {}
    for s in sorted(subspaces.values(), key=lambda s: (s.modality != "visual", s.site)):
        parts = s.site.split(".")
        if len(parts) < 4 or parts[:2] != ["lm", "layers"] or not parts[2].isdigit():
            raise InputError(f"subspace {s.name!r} was not fitted at a language-model layer site")
        layers.setdefault(int(parts[2]), []).append(s)
    return layers


def evaluate_projection(
    lm: Pretrained,
    subspaces: dict[str, Subspace],
    harmful: Sequence[Example],
    benign: Sequence[Example],
    *,
    alphas: Sequence[float] = (1.0,),
    ks: Sequence[int | None] = (None,),
    fusion: str = "adaptive",
    apply_at: str | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    examples: int = 3,
) -> dict:
    """Greedy responses and keyword-judged refusal rates of harmful and benign prompts, without projection and
    with it for every (α, k); the projection h' = h − α U Uᵀ (h − μ) runs at prefill and every decode step."""
    if not subspaces:
        raise InputError("no subspaces to project with; fit them first (precise-jax care fit)")
    if fusion not in FUSIONS:
        raise InputError(f"unknown fusion {fusion!r}; choose one of {FUSIONS}")
    layers = by_layer(subspaces)
    kinds = {s.site.split(".", 3)[3] for s in subspaces.values()}
    kind = apply_at or (kinds.pop() if len(kinds) == 1 else None)
    if kind not in SITE_KINDS:
        raise InputError(f"apply_at must be one of {SITE_KINDS} (the subspaces were fitted at {sorted(kinds)})")
    widths = {s.width for s in subspaces.values()}
    hidden = getattr(lm.config, "hidden_size", None)
    if hidden is not None and widths != {hidden}:
        raise InputError(f"the subspaces have width {sorted(widths)}, the model's hidden size is "
                         f"{lm.decoder.hidden_size}: they were fitted on another model")
    max_k = max(s.k for s in subspaces.values())

    def run(label: str, hook_params: Mapping[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        out = {}
        for name, prompts in (("harmful", harmful), ("benign", benign)):
            texts = respond(lm, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            hook=projection_hook, hook_params=hook_params, description=f"{label} {name}")
            refused = refusal_keyword_judge(texts, [e.language for e in prompts])
            scores = sequence_refusal_scores(lm, prompts, batch_size=batch_size, hook=projection_hook,
                                             hook_params=hook_params)
            out[name] = {"refusal_rate": float(refused.mean()),
                         "refusal_interval": dataclasses.asdict(mean_interval(refused)),
                         "refusal_score": float(scores.sequence.mean()),
                         "refusal_logit": float(scores.first_token.mean()), "refused": refused.tolist(),
                         "responses": texts}
        out["seconds"] = round(time.perf_counter() - started, 1)
        _log(f"care generate: {label}: harmful refusal {out['harmful']['refusal_rate']:.3f}, "
             f"benign refusal {out['benign']['refusal_rate']:.3f}")
        return out

    baseline = run("no projection", {})
    configs = []
    for alpha in alphas:
        for k in ks:
            params = care_projection(layers, kind=kind, alpha=alpha, k=k, fusion=fusion, max_k=max_k)
            result = run(f"alpha={alpha:g} k={k or 'all'}", params)
            configs.append({"alpha": alpha, "k": k, **result})
    return {
        "layers": sorted(layers), "apply_at": kind, "fusion": fusion, "max_new_tokens": max_new_tokens,
        "judge": "precise_jax.evaluate.refusal_keyword_judge",
        "harmful_prompts": [e.id for e in harmful], "benign_prompts": [e.id for e in benign],
        "baseline": baseline, "projected": configs,
        "summary": [{"alpha": c["alpha"], "k": c["k"],
                     "harmful_refusal": c["harmful"]["refusal_rate"], "benign_refusal": c["benign"]["refusal_rate"],
                     "harmful_refusal_score": c["harmful"]["refusal_score"],
                     "benign_refusal_score": c["benign"]["refusal_score"],
                     "harmful_refusal_logit": c["harmful"]["refusal_logit"],
                     "benign_refusal_logit": c["benign"]["refusal_logit"]}
                    for c in [{"alpha": 0.0, "k": 0, **baseline}, *configs]],
        "examples": [{"prompt": e.prompt, "id": e.id, "before": baseline["harmful"]["responses"][i],
                      **{f"alpha={c['alpha']:g} k={c['k'] or 'all'}": c["harmful"]["responses"][i] for c in configs}}
                     for i, e in enumerate(harmful[:examples])],
    }
