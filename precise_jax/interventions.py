"""Interventions at named sites, as hooks for `ports.generate.generate` and for plain forwards.

A hook is a static function; what it does is decided by `hook_params`, a dict {site name: arrays}, so a sweep over
strengths, masks or neuron sets reuses one compilation. Every edit can be limited to token types at prefill
(e.g. only image tokens) and switched on or off for generated tokens.

`unit_edit`: per-unit affine edit x' = x + m * ((a - 1) * x + b) with a 0/1 unit mask m, scale a and shift b:
zero-ablation (a=0, b=0), mean-ablation (a=0, b=mean) and amplification (a=factor, b=0) are one function.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ports.errors import InputError
from ports.generate import HookInfo, intercept_sites
from ports.processing import TokenType
from precise_jax.capture import model_inputs
from precise_jax.neurons import NeuronSet
from precise_jax.sites import site_name
from precise_jax.stats import Moments

if TYPE_CHECKING:
    from ports.generate import Hook
    from ports.pretrained import Pretrained
    from precise_jax.subspace import Subspace

Array = jax.Array
ALL_TYPES = tuple(TokenType)


def where_mask(info: HookInfo, types: Array, at_decode: Array, shape: tuple[int, ...]) -> Array:
    """[B, T, 1] float: 1 where the edit applies (token type selected at prefill; `at_decode` for new tokens)."""
    if info.prefill and info.token_types is not None:
        where = types[jnp.clip(info.token_types.astype(jnp.int32), 0, len(ALL_TYPES) - 1)]
    elif info.prefill:  # forward_with refuses type-restricted edits on batches without token types
        where = jnp.ones(shape[:2], jnp.float32)
    else:
        where = jnp.ones(shape[:2], jnp.float32) * at_decode
    return where[..., None]


def placement(token_types: Iterable[int] = ALL_TYPES, at_decode: bool = True) -> dict:
    """Where an edit applies: which token types at prefill, and whether at generated tokens."""
    types = np.zeros(len(ALL_TYPES), np.float32)
    types[[int(t) for t in token_types]] = 1.0
    return {"types": jnp.asarray(types), "at_decode": jnp.asarray(float(at_decode), jnp.float32)}


def unit_edit_hook(hook_params: Mapping, site_path: tuple, x: Array, info: HookInfo) -> Array:
    """Apply the per-unit affine edit of `hook_params[site]`, if any, at the positions it is placed at."""
    p = hook_params.get(site_name(site_path))
    if p is None:
        return x
    where = where_mask(info, p["types"], p["at_decode"], x.shape)
    edit = p["mask"] * ((p["scale"] - 1.0) * x.astype(jnp.float32) + p["shift"])
    return (x.astype(jnp.float32) + where * edit).astype(x.dtype)


def unit_edit(width: int, units: np.ndarray, kind: str, *, mean: np.ndarray | None = None, factor: float = 2.0,
              token_types: Iterable[int] = ALL_TYPES, at_decode: bool = True) -> dict:
    """The arrays of one site's edit: kind 'zero', 'mean' (needs `mean` [width]) or 'amplify' (by `factor`)."""
    mask = np.zeros(width, np.float32)
    mask[np.asarray(units, np.int64)] = 1.0
    if kind == "zero":
        scale, shift = np.zeros(width), np.zeros(width)
    elif kind == "mean":
        if mean is None:
            raise InputError("mean-ablation needs the mean activations (statistics of a reference data set)")
        scale, shift = np.zeros(width), np.asarray(mean, np.float64)
    elif kind == "amplify":
        scale, shift = np.full(width, factor), np.zeros(width)
    else:
        raise InputError(f"unknown edit {kind!r}; choose 'zero', 'mean' or 'amplify'")
    return {"mask": jnp.asarray(mask), "scale": jnp.asarray(scale, jnp.float32),
            "shift": jnp.asarray(shift, jnp.float32), **placement(token_types, at_decode)}


def neuron_ablation(neurons: NeuronSet, kind: str = "zero", *, means: Mapping[str, Moments] | None = None,
                    factor: float = 2.0, token_types: Iterable[int] = ALL_TYPES, at_decode: bool = True) -> dict:
    """hook_params that ablate (or amplify) a NeuronSet at `lm.layers.{l}.mlp.act`."""
    if len(neurons) == 0:
        raise InputError("the neuron set is empty: there is nothing to ablate")
    params = {}
    for layer, idx in neurons.neurons.items():
        site = f"lm.layers.{layer}.mlp.act"
        mean = None
        if kind == "mean":
            if means is None or site not in means:
                raise InputError(f"mean-ablation needs statistics of {site}; collect them on a reference set")
            mean = np.asarray(means[site].mean)
        params[site] = unit_edit(neurons.width, idx, kind, mean=mean, factor=factor, token_types=token_types,
                                 at_decode=at_decode)
    return params


@functools.partial(jax.jit, static_argnames=("model", "hook"))
def _forward(model, hook, params, inputs, token_types, hook_params):
    info = HookInfo.for_forward(inputs["attention_mask"], token_types)
    with intercept_sites(hook, hook_params, info):
        return model.apply({"params": params}, **inputs).logits


def forward_with(lm: Pretrained, batch: Mapping, hook: Hook | None = unit_edit_hook, hook_params: Any = None,
                 ) -> Array:
    """Logits [B, T, V] of a plain forward with `hook` applied at every site (teacher-forced scoring)."""
    inputs = model_inputs(batch)
    if "attention_mask" not in inputs:
        inputs["attention_mask"] = jnp.ones(inputs["input_ids"].shape, jnp.int32)
    token_types = batch.get("token_types")
    restricted = any(not bool(jnp.all(p["types"] == 1)) for p in (hook_params or {}).values() if "types" in p)
    if token_types is None and restricted:
        raise InputError("the edit is limited to some token types but the batch has no token_types; build "
                         "batches with precise_jax.data (or ports.processing) so every token is typed")
    return _forward(lm.model, hook, lm.params, inputs, None if token_types is None else jnp.asarray(token_types),
                    hook_params if hook_params is not None else {})


# ----------------------------------------------------------------------------------------------------- projection

FUSIONS = ("adaptive", "parallel", "sequential")
HIGHEST = jax.lax.Precision.HIGHEST


def projection_hook(hook_params: Mapping, site_path: tuple, x: Array, info: HookInfo) -> Array:
    """Apply the subspace projection of `hook_params[site]` (see `projection`), if any, fused across subspaces."""
    p = hook_params.get(site_name(site_path))
    if p is None:
        return x
    h = x.astype(jnp.float32)  # [B, T, D]
    count = p["basis"].shape[0]
    where = [where_mask(info, p["types"][m], p["at_decode"][m], x.shape) for m in range(count)]  # [B, T, 1] each

    def correction(m: int, v: Array) -> Array:
        """−α U Uᵀ (v − μ) of subspace m, at the positions it is placed at; U keeps the columns switched on."""
        u = p["basis"][m] * p["columns"][m]  # [D, K]
        coords = jnp.einsum("btd,dk->btk", v - p["center"][m], u, precision=HIGHEST)
        return -p["alpha"][m] * where[m] * jnp.einsum("btk,dk->btd", coords, u, precision=HIGHEST)

    def adaptive() -> Array:
        # The official weights: w_m = ‖Δ_m‖ / (Σ ‖Δ‖ + 1e-8), applied to the corrected vectors h + Δ_m.
        deltas = [correction(m, h) for m in range(count)]
        sizes = [jnp.linalg.norm(d, axis=-1, keepdims=True) for d in deltas]
        total = sum(sizes)
        fused = sum(s / (total + 1e-8) * (h + d) for s, d in zip(sizes, deltas))
        return jnp.where(total > 0, fused, h)  # where no correction applies, the weights would zero h

    def parallel() -> Array:
        return h + sum(p["ratios"][m] * correction(m, h) for m in range(count))

    def sequential() -> Array:
        v = h
        for m in range(count):
            v = v + correction(m, v)
        return v

    # One compilation serves every fusion mode: the mode is an array, only its branch runs.
    return jax.lax.switch(p["fusion"], [adaptive, parallel, sequential]).astype(x.dtype)


def projection(subspaces: Iterable[Subspace], *, alpha: float | Sequence[float] = 1.0,
               k: int | Sequence[int] | None = None, fusion: str = "adaptive", ratios: Sequence[float] | None = None,
               token_types: Sequence[Iterable[int] | None] | None = None, at_decode: bool | Sequence[bool] = True,
               max_k: int | None = None) -> dict:
    """The arrays of one site's projection h' = h − α_m U_m U_mᵀ (h − μ_m) for subspaces m (e.g. visual, text).

    alpha, k (leading basis columns kept), at_decode: one value or one per subspace. token_types: None (every
    token, as the official code) or one entry per subspace (None or token types at prefill). fusion 'adaptive'
    weighs the corrections by their size per token, 'parallel' by `ratios` (default equal), 'sequential' chains them."""
    subs = list(subspaces)
    if not subs:
        raise InputError("projection needs at least one Subspace")
    count, width = len(subs), subs[0].width
    if any(s.width != width for s in subs):
        raise InputError(f"projection: the subspaces have different widths {[s.width for s in subs]}; "
                         "they must come from sites of the same width")
    if fusion not in FUSIONS:
        raise InputError(f"unknown fusion {fusion!r}; choose one of {FUSIONS}")
    alpha = _per_subspace(alpha, count, "alpha")
    ks = [s.k for s in subs] if k is None else [int(v) for v in _per_subspace(k, count, "k")]
    for s, n in zip(subs, ks):
        if not 1 <= n <= s.k:
            raise InputError(f"projection: k={n} for the subspace {s.name!r}, which has {s.k} directions; "
                             f"choose 1 <= k <= {s.k}")
    max_k = max(s.k for s in subs) if max_k is None else max_k
    if max_k < max(s.k for s in subs):
        raise InputError(f"projection: max_k={max_k} is smaller than a subspace's {max(s.k for s in subs)} directions")
    shares = np.full(count, 1.0 / count) if ratios is None else np.asarray(_per_subspace(ratios, count, "ratios"))
    if abs(float(shares.sum()) - 1.0) > 1e-6:
        raise InputError(f"projection: the parallel ratios must sum to 1, got {shares.tolist()}")
    if token_types is None:
        token_types = [None] * count
    if len(token_types) != count:
        raise InputError(f"projection: token_types needs one entry per subspace ({count}), got {len(token_types)}")
    decode = _per_subspace(at_decode, count, "at_decode")
    basis = np.zeros((count, width, max_k), np.float32)  # [M, D, K]: zero-padded to max_k, so any k shares a shape
    columns = np.zeros((count, max_k), np.float32)
    for m, (s, n) in enumerate(zip(subs, ks)):
        basis[m, :, :s.k] = s.basis
        columns[m, :n] = 1.0
    places = [placement(ALL_TYPES if t is None else t, bool(d)) for t, d in zip(token_types, decode)]
    return {
        "basis": jnp.asarray(basis),
        "center": jnp.asarray(np.stack([np.asarray(s.center, np.float32) for s in subs])),
        "columns": jnp.asarray(columns),
        "alpha": jnp.asarray(np.asarray(alpha, np.float32)),
        "ratios": jnp.asarray(shares.astype(np.float32)),
        "fusion": jnp.asarray(FUSIONS.index(fusion), jnp.int32),
        "types": jnp.stack([q["types"] for q in places]),
        "at_decode": jnp.stack([q["at_decode"] for q in places]),
    }


def care_projection(layers: Mapping[int, Iterable[Subspace]], *, kind: str = "mlp.out", **options: Any) -> dict:
    """hook_params projecting at `lm.layers.{l}.{kind}` with each layer's subspaces (the official code: the MLP
    output of layers 12-14 of Qwen2.5-VL-7B, visual then text subspace, α = 4, adaptive fusion)."""
    if not layers:
        raise InputError("care_projection: no layers given")
    return {f"lm.layers.{layer}.{kind}": projection(subs, **options) for layer, subs in layers.items()}


def _per_subspace(value, count: int, what: str) -> list:
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value] * count
    if len(values) != count:
        raise InputError(f"projection: {what} needs one value or one per subspace ({count}), got {len(values)}")
    return values
