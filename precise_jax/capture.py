"""Forward passes that capture named activation sites: raw, pooled per example, or as streaming statistics.

`capture` returns per-token activations of one batch. `collect` runs a whole data set through a jitted step that
pools on device and either keeps one vector per example or merges streaming statistics (`precise_jax.stats`), so
memory stays flat however many batches go through. The forward stops after the deepest requested layer.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import sys
from typing import Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict
from tqdm.auto import tqdm

from ports.errors import InputError
from ports.generate import NOT_MODEL_INPUTS
from ports.layers import Site
from ports.pretrained import Pretrained
from precise_jax.distributed import all_rows, gather, host_rows, place_batch, process_sum
from precise_jax.sites import check_sites, site_filter, site_name
from precise_jax.stats import Moments

POOLS = ("mean", "last", "max", "tokens")
Positions = str | Callable[[Mapping], np.ndarray]
# A pooling of one's own, traced inside the jitted step (hashable: it is a static argument):
# (acts [B, T, W], mask [B, T] bool, token_types [B, T] int) -> (samples [B, W], weights [B]).
Pool = str | Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def model_inputs(batch: Mapping) -> dict:
    """The keys of a batch the model consumes, as jax arrays."""
    return {k: jnp.asarray(v) for k, v in host_inputs(batch).items()}


def host_inputs(batch: Mapping) -> dict:
    """The keys of a batch the model consumes, as given (checked on the host before they go to the device)."""
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS + ("row_valid", "ids")}


_SITES: dict[nn.Module, tuple[str, ...]] = {}


def available_sites(lm: Pretrained) -> tuple[str, ...]:
    """Every site the model exposes, found by tracing its family's example batch (no computation)."""
    if lm.model not in _SITES:
        example = lm.family.example_batch(lm.config)
        _, state = jax.eval_shape(
            lambda p: lm.model.apply({"params": p}, **example,
                                     capture_intermediates=lambda m, method: isinstance(m, Site)),
            lm.params,
        )
        _SITES[lm.model] = tuple(site_name(path[:-1]) for path in flatten_dict(state["intermediates"]))
    return _SITES[lm.model]


def layers_needed(sites: Iterable[str]) -> int | None:
    """How many language-model layers a forward must run to reach the sites (None: all of them)."""
    depths = []
    for name in sites:
        m = re.fullmatch(r"lm\.layers\.(\d+)\..+", name)
        if m is None and name.startswith("lm."):
            return None
        depths.append(int(m.group(1)) + 1 if m else 0)
    return max(depths, default=None)


def _site_values(model: nn.Module, sites: tuple[str, ...], params, inputs) -> dict:
    _, state = model.apply({"params": params}, **inputs, num_layers=layers_needed(sites),
                           capture_intermediates=site_filter(sites))
    found = {site_name(path[:-1]): value for path, value in flatten_dict(state["intermediates"]).items()}
    return {name: found[name][0] for name in sites}


_forward = jax.jit(_site_values, static_argnames=("model", "sites"))


def capture(lm: Pretrained, batch: Mapping, sites: Iterable[str]) -> dict[str, jax.Array]:
    """Run `lm` on `batch` and return {site: activations} for the named sites.

    Language-model sites are [batch, tokens, width]; vision sites keep their tower's layout (LLaVA: [images or
    tiles, patches, width]; Qwen2-VL: [patches of all images, width]).
    """
    sites = tuple(sites)
    check_sites(sites, available_sites(lm))
    lm.model.check_batch(host_inputs(batch))  # inside jit a VLM cannot compare its image tokens with its images
    return _forward(lm.model, sites, lm.params, model_inputs(batch))


# ----------------------------------------------------------------------------------------------------- pooling


def pool_tokens(x: jax.Array, mask: jax.Array, how: str) -> tuple[jax.Array, jax.Array]:
    """x [B, T, W], mask [B, T] -> samples [N, W] and their 0/1 weights [N], in float32.

    mean / max / last: one sample per row over its masked positions (N = B); tokens: every masked token (N = B*T).
    """
    x = x.astype(jnp.float32)
    m = mask.astype(jnp.float32)
    has = m.sum(axis=1) > 0
    if how == "tokens":
        return x.reshape(-1, x.shape[-1]), m.reshape(-1)
    if how == "mean":
        # A float32 sum over the masked tokens (one fused pass over the activations, where a HIGHEST-precision
        # einsum first wrote a float32 copy of them for cuBLAS); masked-out values never enter it.
        pooled = jnp.sum(jnp.where(mask[..., None], x, 0.0), axis=1)
        pooled = pooled / jnp.maximum(m.sum(axis=1), 1.0)[:, None]
    elif how == "max":
        pooled = jnp.max(jnp.where(mask[..., None], x, -jnp.inf), axis=1)
    elif how == "last":
        last = x.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
        pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    else:
        raise InputError(f"unknown pooling {how!r}; choose one of {POOLS}")
    return jnp.where(has[:, None], pooled, 0.0), has.astype(jnp.float32)


@functools.partial(
    jax.jit, static_argnames=("model", "sites", "pool", "covariance", "keep"), donate_argnames=("state",)
)
def _step(model, sites, pool, covariance, keep, params, inputs, mask, row_valid, token_types, state):
    acts = _site_values(model, sites, params, inputs)
    mask = mask & row_valid[:, None]
    new_state, vectors = {}, {}
    for name in sites:
        if callable(pool):
            samples, weight = pool(acts[name], mask, token_types)
            weight = weight * row_valid
        else:
            samples, weight = pool_tokens(acts[name], mask, pool)
        if state is not None:
            new_state[name] = state[name].update(samples, weight)
        if keep:
            vectors[name] = samples
    return (new_state if state is not None else None), vectors


@dataclasses.dataclass
class Collected:
    """What `collect` gathered: streaming statistics and/or one pooled vector per example, with provenance."""

    stats: dict[str, Moments] | None
    vectors: dict[str, np.ndarray] | None  # site -> [examples, width] (pool != "tokens")
    ids: list | None  # example ids in the order of `vectors`, when the batches carry them
    metadata: dict


def collect(
    lm: Pretrained,
    batches: Iterable[Mapping],
    sites: Iterable[str],
    *,
    positions: Positions = "prompt",
    pool: Pool = "mean",
    stats: bool = True,
    covariance: Iterable[str] = (),
    vectors: bool = False,
    total: int | None = None,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> Collected:
    """Run every batch through `lm` and pool the sites' activations over `positions` (see `positions_mask`).

    Batches carry HF keys plus `token_types`, optionally `row_valid` [B] (padding rows) and `ids`. Statistics are
    float32 at highest precision; covariances only for the sites listed in `covariance`. `pool` is a name in
    POOLS or a function of one's own (see `Pool`; e.g. `precise_jax.subspace.CarePool`). With a `mesh`
    (`precise_jax.distributed`; default: the one `lm`'s parameters are laid out on), every process passes its own
    rows, split over the mesh's data axes: statistics are reduced over all processes and readable on each; vectors
    and ids are this process's rows.
    """
    mesh = lm.mesh if mesh is None else mesh
    sites = tuple(sites)
    check_sites(sites, available_sites(lm))
    if not callable(pool) and pool not in POOLS:
        raise InputError(f"unknown pooling {pool!r}; choose one of {POOLS}")
    covariance = tuple(covariance)
    check_sites(covariance, sites)
    if vectors and pool == "tokens":
        raise InputError("vectors=True keeps one vector per example; it needs pool='mean', 'last' or 'max'")
    if not stats and not vectors:
        raise InputError("collect has nothing to do: ask for stats=True and/or vectors=True")
    widths = {name: shape[-1] for name, shape in _site_shapes(lm, sites).items()}
    state = {name: Moments.zeros(widths[name], name in covariance) for name in sites} if stats else None
    kept: dict[str, list] = {name: [] for name in sites}
    ids: list = []
    digest = hashlib.sha256()
    shared: list[tuple[np.ndarray, np.ndarray]] = []  # several processes: (input_ids, row_valid), digested at the end
    seen = 0
    bar = tqdm(total=total, unit="ex", desc="capture", file=sys.stderr, dynamic_ncols=True, disable=not progress)
    # Nothing in this loop waits for the device (no device-to-host copy): batch k+1 is prepared and queued while
    # batch k runs; pooled vectors come to the host after the loop.
    for batch in batches:
        mask = position_mask(batch, positions)
        valid, batch_ids = row_info(batch)
        inputs = host_inputs(batch)
        lm.model.check_batch(inputs)
        if callable(pool) and "token_types" not in batch:
            raise InputError("a pooling function reads the batch's token_types; build batches with precise_jax.data")
        types = batch["token_types"] if callable(pool) else None
        inputs, placed_mask, placed_valid, types = _place(mesh, inputs, mask, valid, types)
        state, pooled = _step(lm.model, sites, pool, covariance, vectors, lm.params, inputs,
                              placed_mask, placed_valid, types, state)
        if vectors:
            for name in sites:
                kept[name].append((pooled[name] if mesh is None else host_rows(mesh, pooled[name]), valid))
        if batch_ids is not None:
            ids += [i for i, ok in zip(batch_ids, valid) if ok]
        if jax.process_count() == 1:
            digest.update(np.ascontiguousarray(np.asarray(batch["input_ids"])[valid]).tobytes())
        else:
            shared.append((np.asarray(batch["input_ids"]), valid))
        seen += int(valid.sum())
        bar.update(int(valid.sum()))
    bar.close()
    if mesh is not None:
        seen = process_sum(seen)
        state = gather(state, mesh) if state is not None else None
    for input_ids, valid in shared:  # every process's rows in process order: the data of a one-process run
        digest.update(np.ascontiguousarray(all_rows(input_ids)[all_rows(valid)]).tobytes())
    if seen == 0:
        raise InputError("collect got no examples: the batches were empty")
    metadata = {
        "model": lm.model_id,
        "model_type": lm.hf_config.get("model_type"),
        "sites": list(sites),
        "positions": positions if isinstance(positions, str) else getattr(positions, "__name__", "custom"),
        "pool": pool if isinstance(pool, str) else getattr(pool, "__name__", repr(pool)),
        "dtype": np.dtype(lm.dtype).name,
        "examples": seen,
        "data": digest.hexdigest()[:16],
    }
    return Collected(
        stats=state,
        vectors={name: np.concatenate([np.asarray(rows)[valid] for rows, valid in kept[name]]) for name in sites}
        if vectors else None,
        ids=ids or None,
        metadata=metadata,
    )


def _place(mesh, inputs: dict, *rows):
    """Model inputs and per-row arrays on device: on the default device without a mesh; with one, this process's
    rows become its part of global arrays split over the mesh's data axes."""
    placed = place_batch(mesh, {**inputs, **{str(i): a for i, a in enumerate(rows) if a is not None}})
    return {k: placed[k] for k in inputs}, *(placed.get(str(i)) for i in range(len(rows)))


def row_info(batch: Mapping) -> tuple[np.ndarray, list | None]:
    """(row_valid [B] bool, example ids or None) of a data-layer Batch (attributes) or a plain dict (keys)."""
    valid = getattr(batch, "row_valid", None)
    valid = batch.get("row_valid") if valid is None else valid
    ids = getattr(batch, "ids", None)
    ids = batch.get("ids") if ids is None else ids
    rows = np.asarray(batch["input_ids"]).shape[0]
    return (np.ones(rows, bool) if valid is None else np.asarray(valid, bool)), (None if ids is None else list(ids))


def position_mask(batch: Mapping, positions: Positions) -> np.ndarray:
    """[B, T] bool positions to pool over: a name understood by `precise_jax.data.positions_mask`, or a callable."""
    if callable(positions):
        return np.asarray(positions(batch), bool)
    from precise_jax.data.batching import positions_mask

    return positions_mask(batch, positions)


_SHAPES: dict[tuple[nn.Module, tuple[str, ...]], dict[str, tuple[int, ...]]] = {}


def _site_shapes(lm: Pretrained, sites: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    # Cached like _SITES: tracing a 7B model for the shapes takes about a second, once per collect call otherwise.
    if (lm.model, sites) not in _SHAPES:
        example = lm.family.example_batch(lm.config)
        shapes = jax.eval_shape(lambda p: _site_values(lm.model, sites, p, example), lm.params)
        _SHAPES[(lm.model, sites)] = {name: s.shape for name, s in shapes.items()}
    return _SHAPES[(lm.model, sites)]
