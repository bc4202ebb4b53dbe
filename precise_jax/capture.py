"""Forward passes that capture named activation sites."""

from __future__ import annotations

import functools
from typing import Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

from ports.generate import NOT_MODEL_INPUTS
from ports.layers import Site
from ports.pretrained import Pretrained
from precise_jax.sites import check_sites, site_filter, site_name

def model_inputs(batch: Mapping) -> dict:
    """The keys of a batch the model consumes, as jax arrays."""
    return {k: jnp.asarray(v) for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


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


@functools.partial(jax.jit, static_argnames=("model", "sites"))
def _forward(model: nn.Module, sites: tuple[str, ...], params, inputs):
    _, state = model.apply({"params": params}, **inputs, capture_intermediates=site_filter(sites))
    found = {site_name(path[:-1]): value for path, value in flatten_dict(state["intermediates"]).items()}
    return {name: found[name][0] for name in sites}


def capture(lm: Pretrained, batch: Mapping, sites: Iterable[str]) -> dict[str, jax.Array]:
    """Run `lm` on `batch` and return {site: activations [batch, tokens, width]} for the named sites."""
    sites = tuple(sites)
    check_sites(sites, available_sites(lm))
    return _forward(lm.model, sites, lm.params, model_inputs(batch))
