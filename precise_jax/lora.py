"""LoRA, the baseline Precise Shield is compared with: rank-r adapters on chosen projections of every LM layer.

The adapters are added at call time by an `nn.intercept_methods` interceptor (as gemma's peft does), so the port is
untouched: a projection's output becomes `W x + (alpha / r) * B(A x)`, with A drawn like peft's Kaiming-uniform
and B zero, so training starts from the base model exactly. `merge` folds them into the kernels for export.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.module import Interceptor, InterceptorContext

from ports.errors import InputError

# Which submodule of a decoder layer holds each projection.
PARENTS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraAdapters:
    """Rank-`rank` adapters on `targets` (projection names) of every language-model layer, scaled by alpha / rank."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = sorted(set(self.targets) - set(PARENTS))
        if unknown or not self.targets:
            raise InputError(f"LoRA targets must be a non-empty subset of {tuple(PARENTS)}, got {list(self.targets)}")
        if self.rank < 1:
            raise InputError(f"LoRA rank must be at least 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def init(self, params: Mapping, key: jax.Array) -> dict:
        """{layers_l: {target: {"a": [in, r], "b": [r, out]}}} in float32; A ~ U(+-1/sqrt(in)), B = 0."""
        out: dict = {}
        for i, layer in enumerate(_lm_layers(params)):
            out[layer] = {}
            for j, target in enumerate(self.targets):
                d_in, d_out = _kernel(params, layer, target).shape
                a_key = jax.random.fold_in(jax.random.fold_in(key, i), j)
                bound = 1.0 / d_in**0.5  # peft: kaiming_uniform_(a=sqrt(5)) on A [r, in]
                out[layer][target] = {
                    "a": jax.random.uniform(a_key, (d_in, self.rank), jnp.float32, -bound, bound),
                    "b": jnp.zeros((self.rank, d_out), jnp.float32),
                }
        return out

    def interceptor(self, adapters: Mapping) -> Interceptor:
        """An `nn.intercept_methods` function adding `scale * B(A x)` to the targeted language-model projections."""
        scale = self.scale

        def intercept(next_fun: Callable[..., Any], args: tuple, kwargs: dict[str, Any],
                      context: InterceptorContext) -> Any:
            out = next_fun(*args, **kwargs)
            path = context.module.path
            # path[-4] == "lm" keeps vision towers (whose blocks are also layers_{i}/mlp/gate_proj) untouched.
            if (context.method_name != "__call__" or not isinstance(context.module, nn.Dense) or len(path) < 4
                    or path[-4] != "lm" or path[-3] not in adapters or path[-1] not in adapters[path[-3]]
                    or path[-2] != PARENTS[path[-1]]):
                return out
            ab = adapters[path[-3]][path[-1]]
            x = args[0]
            low = jnp.einsum("...i,ir->...r", x, ab["a"].astype(x.dtype), preferred_element_type=jnp.float32)
            extra = jnp.einsum("...r,ro->...o", low, ab["b"], preferred_element_type=jnp.float32)
            return out + (scale * extra).astype(out.dtype)

        return intercept

    def merge(self, params: Mapping, adapters: Mapping) -> dict:
        """Full parameters with `scale * A @ B` added to each targeted kernel (for export or plain inference)."""
        params = jax.tree_util.tree_map(lambda x: x, params)  # new containers, shared leaves
        for layer, per_target in adapters.items():
            for target, ab in per_target.items():
                module = params["lm"][layer][PARENTS[target]]
                kernel = module[target]["kernel"]
                delta = self.scale * jnp.matmul(ab["a"], ab["b"], precision=jax.lax.Precision.HIGHEST)
                module[target] = {**module[target], "kernel": kernel + delta.astype(kernel.dtype)}
        return params

    def count(self, params: Mapping) -> int:
        """Trainable parameters: rank * (in + out) per adapted projection."""
        return sum(self.rank * sum(_kernel(params, layer, t).shape) for layer in _lm_layers(params)
                   for t in self.targets)


def _lm_layers(params: Mapping) -> list[str]:
    layers = sorted((k for k in params["lm"] if re.fullmatch(r"layers_\d+", k)), key=lambda k: int(k.split("_")[1]))
    if not layers:
        raise InputError("the parameters have no language-model layers (params['lm']['layers_{i}'])")
    return layers


def _kernel(params: Mapping, layer: str, target: str) -> jax.Array:
    try:
        return params["lm"][layer][PARENTS[target]][target]["kernel"]
    except KeyError:
        raise InputError(f"LoRA target {target!r} is not a projection of lm.{layer}.{PARENTS[target]} in this "
                         f"model; choose targets among its projections") from None

