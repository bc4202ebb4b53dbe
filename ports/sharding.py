"""Where port parameters live on a (data, fsdp, tensor) mesh: logical axes by parameter path, then mesh axes.

Every port parameter gets logical axes from `PARAM_RULES` (a regex table over the port's '/'-separated paths);
`LOGICAL_RULES` maps logical axes to mesh axes. `load_pretrained(..., mesh=)` lays parameters out by these rules;
meshes themselves are made by `precise_jax.distributed`.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # a batch is split over both; `tensor` devices see the same rows

# Logical axes of every port parameter ('/'-separated path, first match wins). Kernels are linen's (in, out).
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r".*embed_tokens/embedding", ("vocab", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r".*(q_proj|k_proj|v_proj|qkv)/kernel", ("embed", "heads")),
    (r".*(q_proj|k_proj|v_proj|qkv)/bias", ("heads",)),
    (r".*(o_proj|out_proj|attn/proj|self_attn/proj)/kernel", ("heads", "embed")),
    (r".*(gate_proj|up_proj|fc1)/kernel", ("embed", "mlp")),
    (r".*(gate_proj|up_proj|fc1)/bias", ("mlp",)),
    (r".*(down_proj|fc2)/kernel", ("mlp", "embed")),
    (r"projector/linear_\d+/kernel", ("embed", "mlp")),  # LLaVA projector [vision width, d] and [d, d]
    (r"projector/linear_\d+/bias", ("mlp",)),
    (r".*patch_embed(ding)?(/proj)?/kernel", ("conv",) * 3 + ("embed",)),  # Conv (*kernel, in, out); 3-D: 4 dims
    (r".*position_embedding/embedding", (None, "embed")),
    (r".*(norm|layernorm|layrnorm|ln_q|norm\d)/(weight|bias)", ("norm",)),
    (r".*", ()),  # anything else (class embedding, image newline, small biases): replicated
)

# Logical axis -> mesh axes (None: replicated). Activations: `batch` rows, `act_*` widths inside layers.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "vocab": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "embed": "fsdp",
    "norm": None,
    "conv": None,
    "batch": BATCH_AXES,
    "length": None,
    "act_embed": None,
    "act_mlp": "tensor",
    "act_heads": "tensor",
}


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """The logical axes of the port parameter at `path` ('/'-separated) with `ndim` dimensions.

    The path may carry a prefix (an optimizer state's `mu/...`): a tree laid out like the parameters (moments,
    gradients, neuron masks) gets the parameters' axes.
    """
    for pattern, axes in PARAM_RULES:
        if re.fullmatch(rf"(?:.*/)?(?:{pattern})", path):
            if len(axes) == ndim:
                return axes
            if axes and axes[0] == "conv":  # a convolution kernel: every dim but the output channels replicated
                return ("conv",) * (ndim - 1) + (axes[-1],)
            return (None,) * ndim
    return (None,) * ndim


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """The PartitionSpec of logical axes on `mesh`; a dimension its mesh axes do not divide stays replicated."""
    parts: list[str | tuple[str, ...] | None] = []
    used: set[str] = set()
    for name, size in zip(logical, shape):
        axes = LOGICAL_RULES.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        if not axes or size % int(np.prod([mesh.shape[a] for a in axes])):
            parts.append(None)
            continue
        used.update(axes)
        parts.append(axes[0] if len(axes) == 1 else axes)
    return P(*parts)


def param_sharding(path: str, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical_axes(path, len(shape)), shape, mesh))
