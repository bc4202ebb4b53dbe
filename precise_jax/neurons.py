"""Precise Shield stage 1: score FFN neurons on harmful and benign data, select safety neurons, compare sets.

A neuron (l, i) is coordinate i of `lm.layers.{l}.mlp.act`, the input of down_proj. Scores per data set:

- `plnd` (default): |mean activation| * ||W_down[:, i]||, normalised to sum 1 within each layer (PLND / SN-Tune);
- `frequency`: the fraction of samples in which the neuron is positive;

contrast scores (one score for the pair of data sets, no set difference):

- `mean_diff`: mean_harmful - mean_benign;   `cohen_d`: the same over the pooled standard deviation.

Selection: per-layer top-k with k = floor(ratio * d_ff) (or one global budget over all layers); safety neurons are
harmful top-k minus benign top-k for per-set scores, or the top-k of the contrast.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from ports.errors import InputError, PreciseJaxError
from precise_jax.distributed import fetch
from precise_jax.stats import Moments

PER_SET_SCORES = ("plnd", "frequency")
CONTRAST_SCORES = ("mean_diff", "cohen_d")
_NEURON_SITE = re.compile(r"lm\.layers\.(\d+)\.mlp\.act")


def down_projection_norms(params: Mapping, layer: int) -> np.ndarray:
    """||W_down[:, i]|| for every neuron i of a layer, from the port's down_proj kernel [d_ff, d]."""
    try:
        kernel = params["lm"][f"layers_{layer}"]["mlp"]["down_proj"]["kernel"]
    except KeyError as e:
        raise InputError(f"the model has no lm layer {layer} with a gated MLP (missing {e})") from e
    return np.linalg.norm(fetch(kernel).astype(np.float64), axis=1)


def neuron_layers(stats: Mapping[str, Moments]) -> dict[int, Moments]:
    """{layer: Moments} from statistics keyed by site, keeping only `lm.layers.{l}.mlp.act` sites."""
    layers = {int(m.group(1)): v for k, v in stats.items() if (m := _NEURON_SITE.fullmatch(k))}
    if not layers:
        raise InputError(f"no neuron sites (lm.layers.{{l}}.mlp.act) among the statistics' sites {sorted(stats)[:4]}")
    return layers


def score_layer(how: str, params: Mapping, layer: int, stats: Moments, eps: float = 1e-12) -> np.ndarray:
    """Per-set score [d_ff] of one layer's neurons on one data set."""
    if how == "plnd":
        importance = np.abs(np.asarray(stats.mean, np.float64)) * down_projection_norms(params, layer)
        return importance / (importance.sum() + eps)
    if how == "frequency":
        return np.asarray(stats.frequency(), np.float64)
    raise InputError(f"unknown per-set score {how!r}; choose one of {PER_SET_SCORES} (or a contrast score "
                     f"{CONTRAST_SCORES})")


def contrast_layer(how: str, harmful: Moments, benign: Moments) -> np.ndarray:
    """Contrast score [d_ff] of one layer: harmful minus benign mean, raw or in pooled standard deviations."""
    diff = np.asarray(harmful.mean, np.float64) - np.asarray(benign.mean, np.float64)
    if how == "mean_diff":
        return diff
    if how == "cohen_d":
        n_h, n_b = int(harmful.count), int(benign.count)
        pooled = (np.asarray(harmful.m2, np.float64) + np.asarray(benign.m2, np.float64)) / max(n_h + n_b - 2, 1)
        return diff / np.sqrt(pooled + 1e-12)
    raise InputError(f"unknown contrast score {how!r}; choose one of {CONTRAST_SCORES}")


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, ties broken by the lower index (deterministic)."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    return np.sort(order[:k])


# ----------------------------------------------------------------------------------------------------- sets


@dataclasses.dataclass(frozen=True)
class NeuronSet:
    """Selected neurons per layer, with the provenance needed to refuse mixing models or settings."""

    neurons: Mapping[int, np.ndarray]  # layer -> sorted neuron indices
    width: int  # d_ff
    num_layers: int
    metadata: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        clean = {}
        for layer, idx in self.neurons.items():
            idx = np.unique(np.asarray(idx, np.int64))
            if not 0 <= layer < self.num_layers or (len(idx) and (idx[0] < 0 or idx[-1] >= self.width)):
                raise InputError(f"neuron set has layer {layer} or indices outside {self.num_layers} x {self.width}")
            if len(idx):
                clean[int(layer)] = idx
        object.__setattr__(self, "neurons", dict(sorted(clean.items())))

    @property
    def model(self) -> str | None:
        return self.metadata.get("model")

    def __len__(self) -> int:
        return sum(len(v) for v in self.neurons.values())

    def per_layer(self) -> list[int]:
        return [len(self.neurons.get(layer, ())) for layer in range(self.num_layers)]

    def mask(self) -> np.ndarray:
        """[num_layers, width] bool."""
        m = np.zeros((self.num_layers, self.width), bool)
        for layer, idx in self.neurons.items():
            m[layer, idx] = True
        return m

    def pairs(self) -> set[tuple[int, int]]:
        return {(layer, int(i)) for layer, idx in self.neurons.items() for i in idx}

    def _combine(self, other: "NeuronSet", op) -> "NeuronSet":
        self.check_compatible(other)
        m = op(self.mask(), other.mask())
        return NeuronSet({l: np.nonzero(m[l])[0] for l in range(self.num_layers)}, self.width, self.num_layers,
                         {**self.metadata, "combined": True})

    def union(self, other: "NeuronSet") -> "NeuronSet":
        return self._combine(other, np.logical_or)

    def intersection(self, other: "NeuronSet") -> "NeuronSet":
        return self._combine(other, np.logical_and)

    def difference(self, other: "NeuronSet") -> "NeuronSet":
        return self._combine(other, lambda a, b: a & ~b)

    def jaccard(self, other: "NeuronSet") -> float:
        self.check_compatible(other)
        a, b = self.mask(), other.mask()
        union = (a | b).sum()
        return float((a & b).sum() / union) if union else 1.0

    def check_compatible(self, other: "NeuronSet") -> None:
        if (self.num_layers, self.width) != (other.num_layers, other.width) or self.model != other.model:
            raise InputError(
                f"neuron sets of different models: {self.model!r} ({self.num_layers} x {self.width}) vs "
                f"{other.model!r} ({other.num_layers} x {other.width})"
            )

    def save(self, path: str | Path) -> Path:
        """Write `<path>.json` (provenance, per-layer counts) and `<path>.safetensors` (indices per layer)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"width": self.width, "num_layers": self.num_layers, "count": len(self),
                  "per_layer": self.per_layer(), "metadata": dict(self.metadata)}
        tensors = {f"layer_{l}": idx.astype(np.int32) for l, idx in self.neurons.items()}
        tensors["_present"] = np.asarray(sorted(self.neurons), np.int32)
        tmp_json, tmp_st = path.with_name(f".{path.name}.json.tmp"), path.with_name(f".{path.name}.st.tmp")
        tmp_json.write_text(json.dumps(header, indent=2, sort_keys=True, default=str))
        save_file(tensors, str(tmp_st))
        tmp_st.replace(path.with_suffix(".safetensors"))
        tmp_json.replace(path.with_suffix(".json"))
        return path.with_suffix(".json")

    @classmethod
    def load(cls, path: str | Path) -> "NeuronSet":
        path = Path(path)
        try:
            header = json.loads(path.with_suffix(".json").read_text())
            tensors = load_file(str(path.with_suffix(".safetensors")))
        except (OSError, ValueError) as e:
            raise PreciseJaxError(f"cannot read the neuron set {path.with_suffix('.json')} ({e})") from e
        neurons = {int(k.split("_")[1]): v for k, v in tensors.items() if k.startswith("layer_")}
        return cls(neurons, header["width"], header["num_layers"], header["metadata"])


def check_for_model(neurons: NeuronSet, model_id: str | None, num_layers: int, width: int) -> None:
    """Refuse an empty neuron set, or one located on another model."""
    if len(neurons) == 0:
        raise InputError("the neuron set is empty: nothing to ablate or train; locate with a larger ratio")
    if (neurons.num_layers, neurons.width) != (num_layers, width) or (
        model_id is not None and neurons.model is not None and neurons.model != model_id
    ):
        raise InputError(
            f"the neuron set was located on {neurons.model!r} ({neurons.num_layers} layers x {neurons.width}); "
            f"this model is {model_id!r} ({num_layers} x {width}). Locate neurons on this model first."
        )


# ----------------------------------------------------------------------------------------------------- select


def layer_budgets(num_layers: int, width: int, ratio: float, layers: Iterable[int] | None) -> dict[int, int]:
    if not 0 < ratio <= 1:
        raise InputError(f"ratio must be in (0, 1], got {ratio}")
    chosen = range(num_layers) if layers is None else layers
    return {l: max(1, int(np.floor(ratio * width))) for l in chosen}


def select_safety_neurons(
    params: Mapping,
    harmful: Mapping[str, Moments],
    benign: Mapping[str, Moments],
    *,
    score: str = "plnd",
    ratio: float = 0.001,
    budget: int | None = None,
    layers: Sequence[int] | None = None,
    metadata: Mapping[str, object] | None = None,
) -> NeuronSet:
    """Safety neurons from harmful and benign statistics of the `lm.layers.{l}.mlp.act` sites.

    Per-set scores: top-k(harmful) minus top-k(benign) per layer (k = floor(ratio * d_ff)), or, with `budget`,
    the `budget` highest harmful scores over all layers minus the same number of benign ones. Contrast scores:
    the top-k (or top-`budget`) of the contrast.
    """
    harm, ben = neuron_layers(harmful), neuron_layers(benign)
    if set(harm) != set(ben):
        raise InputError(f"harmful and benign statistics cover different layers: {sorted(harm)} vs {sorted(ben)}")
    chosen = sorted(harm) if layers is None else list(layers)
    missing = sorted(set(chosen) - set(harm))
    if missing:
        raise InputError(f"no statistics for layers {missing}; capture lm.layers.{{l}}.mlp.act there first")
    width = int(harm[chosen[0]].mean.shape[0])
    num_layers = _count_layers(params)
    if score in PER_SET_SCORES:
        s_h = {l: score_layer(score, params, l, harm[l]) for l in chosen}
        s_b = {l: score_layer(score, params, l, ben[l]) for l in chosen}
        top_h, top_b = _select(s_h, ratio, budget, width), _select(s_b, ratio, budget, width)
        neurons = {l: np.setdiff1d(top_h.get(l, []), top_b.get(l, [])) for l in chosen}
    elif score in CONTRAST_SCORES:
        neurons = _select({l: contrast_layer(score, harm[l], ben[l]) for l in chosen}, ratio, budget, width)
    else:
        raise InputError(f"unknown score {score!r}; choose one of {PER_SET_SCORES + CONTRAST_SCORES}")
    info = {"score": score, "ratio": ratio, "budget": budget, "layers": chosen, **(metadata or {})}
    return NeuronSet(neurons, width, num_layers, info)


def _select(scores: Mapping[int, np.ndarray], ratio: float, budget: int | None, width: int) -> dict[int, np.ndarray]:
    if budget is None:
        k = layer_budgets(len(scores), width, ratio, scores)
        return {l: top_k(s, k[l]) for l, s in scores.items()}
    if budget < 1:
        raise InputError(f"budget must be >= 1 neuron, got {budget}")
    layers = sorted(scores)
    flat = np.concatenate([scores[l] for l in layers])
    chosen = top_k(flat, budget)
    return {l: chosen[(chosen >= i * width) & (chosen < (i + 1) * width)] - i * width for i, l in enumerate(layers)}


def _count_layers(params: Mapping) -> int:
    return sum(1 for k in params["lm"] if re.fullmatch(r"layers_\d+", k))


def random_like(neurons: NeuronSet, seed: int, exclude: bool = True) -> NeuronSet:
    """A random set with the same count in every layer (outside the original set when `exclude`)."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer, idx in neurons.neurons.items():
        pool = np.setdiff1d(np.arange(neurons.width), idx) if exclude else np.arange(neurons.width)
        out[layer] = np.sort(rng.choice(pool, size=len(idx), replace=False))
    return NeuronSet(out, neurons.width, neurons.num_layers, {**neurons.metadata, "random_seed": seed})


def overlap_matrix(sets: Mapping[str, NeuronSet]) -> tuple[list[str], np.ndarray]:
    """Pairwise Jaccard overlaps of named neuron sets (e.g. one per language x modality condition)."""
    names = list(sets)
    m = np.array([[sets[a].jaccard(sets[b]) for b in names] for a in names])
    return names, m


def combine(sets: Iterable[NeuronSet], how: str = "union") -> NeuronSet:
    """Union (the trained set over training conditions) or intersection (shared neurons) of several sets."""
    sets = list(sets)
    if not sets:
        raise InputError("no neuron sets to combine")
    if how not in ("union", "intersection"):
        raise InputError(f"combine how must be 'union' or 'intersection', got {how!r}")
    out = sets[0]
    for s in sets[1:]:
        out = out.union(s) if how == "union" else out.intersection(s)
    return out


def parameter_fraction(neurons: NeuronSet, hidden_size: int, total_params: int, matrices: int = 3) -> float:
    """Fraction of all parameters wired to the neurons (`matrices` of gate rows, up rows, down columns)."""
    return len(neurons) * matrices * hidden_size / total_params


__all__ = [
    "NeuronSet", "select_safety_neurons", "random_like", "overlap_matrix", "combine", "check_for_model",
    "parameter_fraction", "score_layer", "contrast_layer", "down_projection_norms", "top_k",
]
