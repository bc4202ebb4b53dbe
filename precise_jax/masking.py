"""Neuron masks as optax transforms: only the weights wired to selected neurons ever change.

Neuron i of layer l owns column i of the gate/up kernels ([d, d_ff] in linen, row i in Hugging Face), their bias
entry i, and row i of the down kernel ([d_ff, d], column i in Hugging Face). Two ways to train them:

- `neuron_masked(optimizer, params, neurons)`: the full parameter tree, updates restricted to the selected neurons
  before the optimizer (clean moments and clipping) and after it (decoupled weight decay would move frozen
  entries), and leaves without any selected neuron routed to `set_to_zero` with no optimizer state
  (`optax.partition`). The selection lives in the optimizer state as one boolean d_ff vector per trained leaf,
  broadcast along the leaf's neuron axis, so it costs O(layers x d_ff) and another set over the same layers
  reuses the compiled step;
- lean mode (`NeuronDeltas`): trainable deltas of shape [d, k] / [k, d] (and [k] for gate/up biases) per layer,
  added at the MLP by an interceptor, so gradients and optimizer state exist only for the k selected neurons.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.linen.module import Interceptor, InterceptorContext

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


def _neuron_leaves(params: Mapping, neurons: NeuronSet, matrices: Iterable[str]):
    """(layer, matrix, leaf name, leaf, neuron axis, indices) for every leaf wired to a selected neuron."""
    matrices = _check_matrices(matrices)
    for layer, idx in neurons.neurons.items():
        mlp = params["lm"][f"layers_{layer}"]["mlp"]
        for matrix in matrices:
            for name, value in mlp[matrix].items():
                axis = _neuron_axis(matrix, name)
                if axis is not None:
                    yield layer, matrix, name, value, axis, idx


def neuron_vectors(params: Mapping, neurons: NeuronSet, matrices: Iterable[str] = MATRICES) -> dict:
    """{(layer, matrix, leaf): bool selection over d_ff, shaped to broadcast along that leaf's neuron axis}
    ([1, d_ff] for gate/up kernels, [d_ff] for their biases, [d_ff, 1] for down kernels)."""
    out = {}
    for layer, matrix, name, value, axis, idx in _neuron_leaves(params, neurons, matrices):
        keep = np.zeros(value.shape[axis], bool)
        keep[idx] = True
        out[(layer, matrix, name)] = keep.reshape([-1 if a == axis else 1 for a in range(value.ndim)])
    return out


def neuron_masks(params: Mapping, neurons: NeuronSet, matrices: Iterable[str] = MATRICES) -> dict:
    """{(layer, matrix, leaf): 0/1 float mask of that leaf's full shape} for every leaf wired to a selected neuron
    (for inspection and tests; training keeps only the d_ff vectors of `neuron_vectors`)."""
    shapes = {(layer, matrix, name): value.shape for layer, matrix, name, value, _, _ in
              _neuron_leaves(params, neurons, matrices)}
    return {key: np.broadcast_to(keep, shapes[key]).astype(np.float32)
            for key, keep in neuron_vectors(params, neurons, matrices).items()}


def _leaf_key(path) -> tuple | None:
    keys = [getattr(p, "key", None) for p in path]
    if len(keys) == 5 and keys[0] == "lm" and keys[2] == "mlp" and keys[1].startswith("layers_"):
        return int(keys[1].split("_")[1]), keys[3], keys[4]
    return None


class NeuronMaskState(NamedTuple):
    keep: Any  # per trained leaf, a bool vector broadcasting along its neuron axis
    inner: optax.OptState


def _restricted(optimizer: optax.GradientTransformation, vectors: Mapping) -> optax.GradientTransformation:
    """`optimizer` on updates zeroed outside the selection, its output zeroed there again.

    The selection is state, read by `update` from its arguments: nothing neuron-specific is baked into a trace.
    """

    def restrict(updates: optax.Updates, keep: Any) -> optax.Updates:
        return jax.tree_util.tree_map(lambda u, k: jnp.where(k, u, jnp.zeros((), u.dtype)), updates, keep)

    def init(params: optax.Params) -> NeuronMaskState:
        keep = jax.tree_util.tree_map_with_path(lambda path, _: jnp.asarray(vectors[_leaf_key(path)]), params)
        return NeuronMaskState(keep, optimizer.init(params))

    def update(updates: optax.Updates, state: NeuronMaskState, params: optax.Params | None = None,
               ) -> tuple[optax.Updates, NeuronMaskState]:
        updates, inner = optimizer.update(restrict(updates, state.keep), state.inner, params)
        return restrict(updates, state.keep), NeuronMaskState(state.keep, inner)

    return optax.GradientTransformation(init, update)


def neuron_masked(
    optimizer: optax.GradientTransformation, params: Mapping, neurons: NeuronSet, matrices: Iterable[str] = MATRICES
) -> optax.GradientTransformation:
    """`optimizer` restricted to the entries wired to `neurons`; every other entry stays bit-identical."""
    vectors = neuron_vectors(params, neurons, matrices)
    if not vectors:
        raise InputError("the neuron set selects no parameters: it is empty or lists no trained matrix")
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "neurons" if _leaf_key(path) in vectors else "frozen", params)
    # Inside partition the frozen leaves are MaskedNode, so init sees (and keeps state for) neuron leaves only.
    return optax.partition({"neurons": _restricted(optimizer, vectors), "frozen": optax.set_to_zero()}, labels)


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
        """Zero deltas laid out like the MLP leaves they change: {layers_l: {matrix: {"kernel": [d, k] (gate/up) or
        [k, d] (down), "bias": [k] (gate/up, when the model has MLP biases)}}} in float32."""
        return jax.tree_util.tree_map(lambda w: jnp.zeros(w.shape, jnp.float32), self.selected(params))

    def selected(self, params: Mapping, deltas: Mapping | None = None) -> dict:
        """The selected neurons' entries of `params` (plus `deltas` when given), in the deltas' layout."""
        self.check(params)
        out: dict = {}
        for layer, matrix, name, value, axis, idx in _neuron_leaves(params, self.neurons, self.matrices):
            entries = jnp.take(value, jnp.asarray(idx), axis=axis)
            if deltas is not None:
                entries = entries.astype(jnp.float32) + deltas[f"layers_{layer}"][matrix][name]
            out.setdefault(f"layers_{layer}", {}).setdefault(matrix, {})[name] = entries
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

    def interceptor(self, deltas: Mapping) -> Interceptor:
        """An `nn.intercept_methods` function adding the deltas to the gate/up/down projections they belong to.

        Sites (`mlp.act`, `mlp.out`) still see the modified activations, so capture and hooks keep working.
        """
        indices = self.indices()

        def intercept(next_fun: Callable[..., Any], args: tuple, kwargs: dict[str, Any],
                      context: InterceptorContext) -> Any:
            out = next_fun(*args, **kwargs)
            path = context.module.path
            if (context.method_name != "__call__" or not isinstance(context.module, nn.Dense) or len(path) < 4
                    or path[-4] != "lm"  # a vision tower's layers_{i}/mlp is not the language model's
                    or path[-2] != "mlp" or path[-3] not in deltas or path[-1] not in deltas[path[-3]]):
                return out
            x, delta, idx = args[0], deltas[path[-3]][path[-1]], indices[path[-3]]
            if path[-1] == "down_proj":  # rows idx of the down kernel read the selected neurons
                extra = jnp.einsum("...k,kd->...d", x[..., idx], delta["kernel"].astype(x.dtype),
                                   preferred_element_type=jnp.float32)
                return out + extra.astype(out.dtype)
            extra = jnp.einsum("...d,dk->...k", x, delta["kernel"].astype(x.dtype),
                               preferred_element_type=jnp.float32)
            if "bias" in delta:
                extra = extra + delta["bias"]
            return out.at[..., idx].add(extra.astype(out.dtype))

        return intercept

    def merge(self, params: Mapping, deltas: Mapping) -> dict:
        """Full parameters with the deltas folded into the weights (for export or plain inference)."""
        params = jax.tree_util.tree_map(lambda x: x, params)  # new containers, shared leaves
        for layer, matrix, name, value, axis, idx in _neuron_leaves(params, self.neurons, self.matrices):
            module = params["lm"][f"layers_{layer}"]["mlp"][matrix]
            delta = deltas[f"layers_{layer}"][matrix][name]
            module[name] = value.at[(slice(None),) * axis + (jnp.asarray(idx),)].add(delta.astype(value.dtype))
        return params
