"""Neuron masks as optax transforms: only the weights wired to selected neurons ever change.

Neuron i of layer l owns column i of the gate/up kernels ([d, d_ff] in linen, row i in Hugging Face), their bias
entry i, and row i of the down kernel ([d_ff, d], column i in Hugging Face). Two ways to train them:

- `neuron_masked(optimizer, params, neurons)`: the full parameter tree, updates multiplied by a 0/1 mask before
  the optimizer (clean moments and clipping) and after it (decoupled weight decay would move frozen entries), and
  leaves without any selected neuron routed to `set_to_zero` with no optimizer state (`optax.partition`);
- lean mode (`NeuronDeltas`): trainable deltas of shape [d, k] / [k, d] per layer, added at the MLP by an
  interceptor, so gradients and optimizer state exist only for the k selected neurons.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ports.errors import InputError
from precise_jax.neurons import NeuronSet

MATRICES = ("gate_proj", "up_proj", "down_proj")
Array = jax.Array


def _check_matrices(matrices: Iterable[str]) -> tuple[str, ...]:
    matrices = tuple(matrices)
    unknown = sorted(set(matrices) - set(MATRICES))
    if unknown or not matrices:
        raise InputError(f"matrices must be a non-empty subset of {MATRICES}, got {list(matrices)}")
    return matrices


def _neuron_axis(matrix: str, leaf: str) -> int | None:
    """Which axis of a linen MLP leaf indexes neurons (None: the leaf has no neuron axis)."""
    if matrix in ("gate_proj", "up_proj"):
        return 1 if leaf == "kernel" else 0  # kernel [d, d_ff]; bias [d_ff]
    return 0 if leaf == "kernel" else None  # down kernel [d_ff, d]; its bias [d] belongs to no neuron


def neuron_masks(params: Mapping, neurons: NeuronSet, matrices: Iterable[str] = MATRICES) -> dict:
    """{(layer, matrix, leaf): 0/1 float mask of that leaf's shape} for every leaf wired to a selected neuron."""
    matrices = _check_matrices(matrices)
    masks = {}
    for layer, idx in neurons.neurons.items():
        mlp = params["lm"][f"layers_{layer}"]["mlp"]
        for matrix in matrices:
            for leaf, value in mlp[matrix].items():
                axis = _neuron_axis(matrix, leaf)
                if axis is None:
                    continue
                m = np.zeros(value.shape, np.float32)
                m[(slice(None),) * axis + (idx,)] = 1.0
                masks[(layer, matrix, leaf)] = m
    return masks


def _leaf_key(path) -> tuple | None:
    keys = [getattr(p, "key", None) for p in path]
    if len(keys) == 5 and keys[0] == "lm" and keys[2] == "mlp" and keys[1].startswith("layers_"):
        return int(keys[1].split("_")[1]), keys[3], keys[4]
    return None


def _mask_tree(params: Mapping, masks: Mapping) -> tuple:
    """(labels tree 'neurons'/'frozen', mask tree with arrays at neuron leaves and MaskedNode elsewhere)."""
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "neurons" if _leaf_key(path) in masks else "frozen", params)
    mask_tree = jax.tree_util.tree_map_with_path(
        lambda path, _: jnp.asarray(masks[_leaf_key(path)]) if _leaf_key(path) in masks else optax.MaskedNode(),
        params)
    return labels, mask_tree


def multiply_updates(mask_tree) -> optax.GradientTransformation:
    """Multiply every update element-wise by its 0/1 mask (leaves that are MaskedNode pass untouched)."""

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u, m: u * m.astype(u.dtype), updates, mask_tree), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def neuron_masked(
    optimizer: optax.GradientTransformation, params: Mapping, neurons: NeuronSet, matrices: Iterable[str] = MATRICES
) -> optax.GradientTransformation:
    """`optimizer` restricted to the entries wired to `neurons`; every other entry stays bit-identical."""
    masks = neuron_masks(params, neurons, matrices)
    if not masks:
        raise InputError("the neuron set selects no parameters: it is empty or lists no trained matrix")
    labels, mask_tree = _mask_tree(params, masks)
    # Inside partition the frozen leaves of the updates are MaskedNode too, so the trees line up.
    mask_tree = jax.tree_util.tree_map(lambda label, m: m if label == "neurons" else optax.MaskedNode(),
                                       labels, mask_tree)
    inner = optax.chain(multiply_updates(mask_tree), optimizer, multiply_updates(mask_tree))
    return optax.partition({"neurons": inner, "frozen": optax.set_to_zero()}, labels)


def trainable_count(neurons: NeuronSet, hidden_size: int, matrices: Iterable[str] = MATRICES,
                    gate_up_bias: bool = False) -> int:
    """Parameters wired to the neurons: hidden_size per neuron per matrix (+1 per gate/up bias)."""
    matrices = _check_matrices(matrices)
    per_neuron = hidden_size * len(matrices) + (
        sum(m in ("gate_proj", "up_proj") for m in matrices) if gate_up_bias else 0)
    return len(neurons) * per_neuron


# ----------------------------------------------------------------------------------------------------- lean mode


@dataclasses.dataclass(frozen=True)
class NeuronDeltas:
    """Lean mode: trainable deltas for the selected neurons only, applied at the MLPs by an interceptor."""

    neurons: NeuronSet
    matrices: tuple[str, ...] = MATRICES

    def init(self, params: Mapping) -> dict:
        """Zero deltas: {layers_l: {matrix: [d, k] (gate/up) or [k, d] (down)}} in float32."""
        self.check(params)
        out = {}
        for layer, idx in self.neurons.neurons.items():
            mlp = params["lm"][f"layers_{layer}"]["mlp"]
            d = mlp["down_proj"]["kernel"].shape[1]
            out[f"layers_{layer}"] = {
                m: jnp.zeros((d, len(idx)) if m != "down_proj" else (len(idx), d), jnp.float32) for m in self.matrices
            }
        return out

    def check(self, params: Mapping) -> None:
        _check_matrices(self.matrices)
        if len(self.neurons) == 0:
            raise InputError("the neuron set is empty: there is nothing to train")
        layers = sum(1 for k in params["lm"] if k.startswith("layers_"))
        width = params["lm"]["layers_0"]["mlp"]["down_proj"]["kernel"].shape[0]
        if (self.neurons.num_layers, self.neurons.width) != (layers, width):
            raise InputError(f"the neuron set is for {self.neurons.num_layers} layers x {self.neurons.width} "
                             f"neurons; this model has {layers} x {width}. Locate neurons on this model first.")

    def indices(self) -> dict[str, Array]:
        return {f"layers_{l}": jnp.asarray(idx, jnp.int32) for l, idx in self.neurons.neurons.items()}

    def interceptor(self, deltas: Mapping):
        """An `nn.intercept_methods` function adding the deltas to the gate/up/down projections they belong to.

        Sites (`mlp.act`, `mlp.out`) still see the modified activations, so capture and hooks keep working.
        """
        indices = self.indices()

        def intercept(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = context.module.path
            if (context.method_name != "__call__" or not isinstance(context.module, nn.Dense) or len(path) < 4
                    or path[-4] != "lm"  # a vision tower's layers_{i}/mlp is not the language model's
                    or path[-2] != "mlp" or path[-3] not in deltas or path[-1] not in deltas[path[-3]]):
                return out
            x, delta, idx = args[0], deltas[path[-3]][path[-1]], indices[path[-3]]
            if path[-1] == "down_proj":  # rows idx of the down kernel read the selected neurons
                extra = jnp.einsum("...k,kd->...d", x[..., idx], delta.astype(x.dtype),
                                   preferred_element_type=jnp.float32)
                return out + extra.astype(out.dtype)
            extra = jnp.einsum("...d,dk->...k", x, delta.astype(x.dtype), preferred_element_type=jnp.float32)
            return out.at[..., idx].add(extra.astype(out.dtype))

        return intercept

    def merge(self, params: Mapping, deltas: Mapping) -> dict:
        """Full parameters with the deltas folded into the weights (for export or plain inference)."""
        params = jax.tree_util.tree_map(lambda x: x, params)
        for layer, idx in self.indices().items():
            mlp = params["lm"][layer]["mlp"]
            for m, delta in deltas[layer].items():
                kernel = mlp[m]["kernel"]
                if m == "down_proj":
                    kernel = kernel.at[idx, :].add(delta.astype(kernel.dtype))
                else:
                    kernel = kernel.at[:, idx].add(delta.astype(kernel.dtype))
                mlp[m] = {**mlp[m], "kernel": kernel}
        return params
