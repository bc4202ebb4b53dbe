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


@functools.lru_cache(maxsize=64)
def available_sites(model: nn.Module) -> tuple[str, ...]:
    """Every site the model exposes, found by tracing (no computation)."""
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    _, state = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros((1, 1), jnp.int32),
                              capture_intermediates=lambda m, method: isinstance(m, Site)),
        variables,
    )
    return tuple(site_name(path[:-1]) for path in flatten_dict(state["intermediates"]))


@functools.partial(jax.jit, static_argnames=("model", "sites"))
def _forward(model: nn.Module, sites: tuple[str, ...], params, inputs):
    _, state = model.apply({"params": params}, **inputs, capture_intermediates=site_filter(sites))
    found = {site_name(path[:-1]): value for path, value in flatten_dict(state["intermediates"]).items()}
    return {name: found[name][0] for name in sites}


def capture(lm: Pretrained, batch: Mapping, sites: Iterable[str]) -> dict[str, jax.Array]:
    """Run `lm` on `batch` and return {site: activations [batch, tokens, width]} for the named sites."""
    sites = tuple(sites)
    check_sites(sites, available_sites(lm.model))
    return _forward(lm.model, sites, lm.params, model_inputs(batch))
