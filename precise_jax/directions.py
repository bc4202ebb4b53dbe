"""Refusal directions (Arditi et al. 2024): the standard sanity check of a causal-intervention stack.

The direction r is the difference of means of the residual stream (`lm.layers.{l}.resid`) between harmful and
benign prompts at the last token before the reply. If a model's refusal is mediated by r, ablating r from every
layer's residual stream (h' = h − r̂ r̂ᵀ h, at prefill and every generated token) removes refusal from harmful
prompts, and adding r at its layer induces refusal on benign ones. A stack whose ablation / addition cannot do this
on a model that refuses has a bug before any neuron-level claim is worth testing.

    r = refusal_direction(lm, harmful, benign, layer=12)
    respond(lm, harmful, hook=projection_hook, hook_params=direction_ablation(r, lm.decoder.num_layers))
    respond(lm, benign, hook=unit_edit_hook, hook_params=direction_addition(r))
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from ports.errors import InputError
from precise_jax.interventions import ALL_TYPES, placement, projection
from precise_jax.subspace import Subspace

if TYPE_CHECKING:
    from ports.pretrained import Pretrained
    from precise_jax.data import Example


@dataclasses.dataclass(frozen=True)
class Direction:
    """A difference-of-means direction at one layer's residual stream."""

    layer: int
    vector: np.ndarray  # [D] float32: mean(harmful) − mean(benign), unnormalised
    positions: str = "last_prompt"

    @property
    def unit(self) -> np.ndarray:
        return self.vector / np.linalg.norm(self.vector)

    @property
    def site(self) -> str:
        return f"lm.layers.{self.layer}.resid"


def refusal_direction(lm: Pretrained, harmful: Sequence[Example], benign: Sequence[Example], layer: int, *,
                      positions: str = "last_prompt", batch_size: int = 8, progress: bool = False) -> Direction:
    """mean(resid | harmful) − mean(resid | benign) at `lm.layers.{layer}.resid`, pooled over `positions`."""
    from precise_jax.capture import collect
    from precise_jax.data import make_batches

    if not harmful or not benign:
        raise InputError("a refusal direction needs harmful and benign prompts (one of the sets is empty)")
    if not 0 <= layer < lm.decoder.num_layers:
        raise InputError(f"layer {layer} is outside the model's {lm.decoder.num_layers} layers")
    site = f"lm.layers.{layer}.resid"
    collected = [collect(lm, make_batches(list(examples), lm, batch_size), [site], positions=positions, pool="mean",
                         total=len(examples), progress=progress).stats or {} for examples in (harmful, benign)]
    means = [np.asarray(stats[site].mean, np.float64) for stats in collected]
    vector = means[0] - means[1]
    if not np.all(np.isfinite(vector)) or np.linalg.norm(vector) == 0:
        raise InputError(f"the harmful and benign means at {site} are equal (or not finite): no direction to "
                         "take; give prompt sets that differ, or another layer")
    return Direction(layer, vector.astype(np.float32), positions)


def direction_ablation(direction: Direction, layers: int | Iterable[int], *, at_decode: bool = True) -> dict:
    """`projection_hook` params that remove the direction from the residual stream after each of `layers` (an int:
    every layer 0..n-1), at every token."""
    layers = range(layers) if isinstance(layers, int) else list(layers)
    if not layers:
        raise InputError("direction_ablation: no layers given")
    subspace = Subspace(basis=direction.unit[:, None].astype(np.float32),
                        center=np.zeros(direction.vector.shape, np.float32), eigenvalues=np.ones(1, np.float32),
                        site=direction.site, modality="refusal direction")
    return {f"lm.layers.{layer}.resid": projection([subspace], alpha=1.0, at_decode=at_decode) for layer in layers}


def direction_addition(direction: Direction, scale: float = 1.0, *, at_decode: bool = True) -> dict:
    """`unit_edit_hook` params that add scale · r at the direction's own site, at every token."""
    width = direction.vector.shape[0]
    return {direction.site: {"mask": jnp.ones(width, jnp.float32), "scale": jnp.ones(width, jnp.float32),
                             "shift": jnp.asarray(scale * direction.vector, jnp.float32),
                             **placement(ALL_TYPES, at_decode)}}
