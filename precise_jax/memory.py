"""A run's memory per device, planned from config.json alone (no weights read) and a (data, fsdp, tensor) mesh.

`plan_for_folder` (or `plan_for_config`, `plan_memory`) gives a `MemoryPlan`; `check_plan` refuses one that cannot
fit before anything is loaded. What each number counts:

- parameters: exact. Every leaf of the port's abstract parameters (`ports.presets.build_abstract`) laid out by the
  project's sharding rules (`ports.sharding`) on the mesh; a device holds the largest shard of each leaf (a
  dimension the mesh axes do not divide stays whole).
- trained, optimizer, gradients (training only): exact shapes from `train.make_plan` traced abstractly, sharded
  like their parameters (`distributed.param_shardings`). `trained` is the tree the step updates when it is not the
  caller's parameters: a copy of every parameter in masked / random / full mode (`train` copies it, the step donates
  the copy), the float32 neuron deltas in lean mode, the float32 adapters in LoRA mode. `optimizer` is the optax
  state (AdamW: mu and nu in the trained tree's dtype, plus masked mode's per-leaf neuron selections).
  `gradients` are the trained leaves whose gradient the step computes (masked / random: every MLP matrix of a layer
  with a neuron, full size; gradients of frozen leaves are discarded by `set_to_zero` and dead code to XLA).
- activations: an analytic estimate (see `activation_estimate`), checked against XLA's own buffer assignment on
  tiny Llamas by tests/precise_jax/test_memory.py: it errs high, by 1.1 to 2.0x there.

The total adds them all: an upper bound in that everything is taken to be live at once, a lower bound in that XLA's
temporaries around the optimizer update and its fusion choices are not modelled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh

from ports.errors import InputError
from ports.layers import DecoderConfig, Dtype
from ports.pretrained import Pretrained, read_config
from ports.sharding import AXES

TASKS = ("capture", "generate", "train")
ATTENTION = ("auto", "xla", "fused")
GIB = 1 << 30
Device = Literal["device"]


# ----------------------------------------------------------------------------------------------------- the device


def device_memory() -> int | None:
    """Bytes one local device can hold: the backend's `bytes_limit` (GPU, TPU); on CPU the host's MemAvailable over
    the local device count; None when neither is known."""
    devices = jax.local_devices()
    stats = devices[0].memory_stats() if devices else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if devices and devices[0].platform == "cpu":
        available = _mem_available()
        return None if available is None else available // len(devices)
    return None


def _mem_available(path: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------------------------------- sharding


def check_mesh(mesh_shape: Sequence[int]) -> tuple[int, int, int]:
    """(data, fsdp, tensor) as three integers >= 1 (resolve -1 first with `distributed.mesh_shape`)."""
    sizes = tuple(mesh_shape)
    if len(sizes) != 3 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1
                                  for s in sizes):
        raise InputError(f"a memory plan's mesh is (data, fsdp, tensor), three integers >= 1; got {sizes!r} "
                         "(resolve -1 with precise_jax.distributed.mesh_shape first)")
    data, fsdp, tensor = (int(s) for s in sizes)
    return data, fsdp, tensor


def shard_bytes(tree: Any, mesh_shape: Sequence[int] = (1, 1, 1)) -> int:
    """Bytes one device holds of a tree (arrays or ShapeDtypeStructs at parameter paths: parameters, moments,
    gradients) laid out by the parameter rules on a (data, fsdp, tensor) mesh; no device is needed."""
    from precise_jax.distributed import param_shardings

    mesh: Any = AbstractMesh(check_mesh(mesh_shape), AXES)  # the sharding rules read only its axis sizes
    leaves = jax.tree_util.tree_leaves(tree)
    shardings = jax.tree_util.tree_leaves(param_shardings(tree, mesh))
    return sum(math.prod(s.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
               for leaf, s in zip(leaves, shardings))


# ----------------------------------------------------------------------------------------------------- activations


def _per_device(size: int, tensor: int) -> int:
    """A width split over the tensor axis when it divides (as the sharding rules split heads, MLP and vocab)."""
    return size // tensor if size % tensor == 0 else size


def _layer_working_set(rows: int, tokens: int, keys: int, d: int, heads: int, kv_heads: int, head_dim: int,
                       d_ff: int, mlp_inputs: int, itemsize: int, materialised: bool, score_bytes: int = 8) -> int:
    """One transformer layer's working set: the residual stream plus the larger of its attention half (normed
    input, q/k/v, attention output and o_proj's; with the XLA kernel `score_bytes` (8) per score [rows, heads,
    tokens, keys]: forward, the float32 scores and softmax; backward, the float32 gradients of both) and its MLP half
    (normed input, `mlp_inputs` [rows, tokens, d_ff] buffers: gate, up and act for a gated MLP, fc1 and act for a
    ViT's, and the output). XLA on CPU was seen to hold 4 to 12 bytes per forward score, by size."""
    rt = rows * tokens
    attention = rt * (2 * d + (2 * heads + 2 * kv_heads) * head_dim) * itemsize
    if materialised:
        attention += rows * heads * tokens * keys * score_bytes
    mlp = rt * (2 * d + mlp_inputs * d_ff) * itemsize
    return rt * d * itemsize + max(attention, mlp)


def _layer_saved(rows: int, tokens: int, d: int, heads: int, kv_heads: int, head_dim: int, d_ff: int,
                 mlp_inputs: int, itemsize: int, materialised: bool, attention: bool = True) -> int:
    """What one layer keeps for the backward pass: its mid-layer residual, the MLP's normed input and its
    `mlp_inputs` [rows, tokens, d_ff] buffers, the RMSNorms' float32 statistics and, when the gradient flows through
    its attention, the layer input, the normed input, q/k/v and the attention output; with the XLA kernel also 13
    bytes per score: the boolean mask and three float32 [rows, heads, tokens, tokens] arrays (masked scores, their
    exponentials, the probabilities), what `jax.ad_checkpoint.print_saved_residuals` lists for
    `ports.layers.dot_product_attention`."""
    rt = rows * tokens
    saved = rt * (2 * d + mlp_inputs * d_ff) * itemsize + rt * 2 * 4
    if attention:
        saved += rt * (2 * d + (2 * heads + 2 * kv_heads) * head_dim) * itemsize
        if materialised:
            saved += rows * heads * tokens * tokens * 13
    return saved


def loss_bytes(rows: int, tokens: int, d: int, vocab: int, itemsize: int) -> int:
    """The chunked reply loss (`train.reply_nll`) of `rows` x `tokens`, vocab the (per-device) vocabulary: the
    packed hidden states and their gradient, one chunk's float32 logits and their gradient."""
    from precise_jax.train import LOSS_CHUNK_ELEMENTS

    n = max(rows * (tokens - 1), 1)
    chunk = min(1 << (max(LOSS_CHUNK_ELEMENTS // vocab, 1).bit_length() - 1), 1 << (n - 1).bit_length())
    packed = -(-n // chunk) * chunk
    return 2 * packed * d * itemsize + 2 * chunk * vocab * 4


BACKWARD = ("mlp", "lm", "full")


def activation_estimate(config: Any, *, task: str, rows: int, tokens: int, dtype: Dtype, tensor: int = 1,
                        attention: str = "xla", sites: Sequence[str] = (), new_tokens: int = 0, images: int = 0,
                        backward: str = "mlp") -> dict[str, int]:
    """Activation bytes per device of `rows` x `tokens` (the rows this device holds), by part.

    `config` is a port config (a `DecoderConfig`, or a composition's with `.text` and `.vision`). Heads, kv heads,
    the MLP width and the vocabulary count 1/tensor each where the tensor axis divides them; the residual stream
    is whole on every device. Parts (bytes):

    - `layer`: the largest per-layer forward working set (`_layer_working_set`), the vision tower's included when
      `images` (images or tiles per row) > 0; the forward keeps nothing else between layers;
    - `inputs`: token ids, rotary cos/sin (float32) and, with the XLA attention kernel, the boolean mask;
    - capture: `sites`, the kept site values (language-model sites [rows, tokens, width]; vision sites [rows x
      images, patches, width]); no logits: the capture step returns site values only, so XLA drops the LM head;
    - generate: `cache`, the KV cache of tokens + new_tokens - 1 slots, and `logits` of the last position;
      the prefill attends over every slot, by the XLA kernel (the fused one needs no cache);
    - train: `saved`, every layer's residuals for the backward pass (`_layer_saved`) plus the final norm's input and
      output, `loss`, the chunked loss (`loss_bytes`), and as `layer` the larger transient on top of them: the
      backward's working set in one layer, or the last layer's forward working set less what it saves. `backward`
      says how far the gradient flows: "mlp" (neuron modes, LoRA on MLP projections: nothing trains before layer
      0's MLP, so layer 0's attention keeps nothing), "lm" (LoRA on attention projections), "full" (full mode:
      every layer, and the vision tower when `images`).
    """
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; the memory plan knows {TASKS}")
    if attention not in ("xla", "fused"):
        raise InputError(f"attention must be 'xla' or 'fused' here (resolve 'auto' first), got {attention!r}")
    if backward not in BACKWARD:
        raise InputError(f"backward must be one of {BACKWARD}, got {backward!r}")
    if rows < 1 or tokens < 1 or new_tokens < 0 or images < 0:
        raise InputError(f"rows ({rows}) and tokens ({tokens}) must be >= 1, new_tokens ({new_tokens}) and images "
                         f"({images}) >= 0")
    text: DecoderConfig = getattr(config, "text", config)
    s = jnp.dtype(dtype).itemsize
    d, e = text.hidden_size, text.head_dim
    h, k = _per_device(text.num_heads, tensor), _per_device(text.num_kv_heads, tensor)
    f, v = _per_device(text.intermediate_size, tensor), _per_device(text.vocab_size, tensor)
    keys = tokens + new_tokens - 1 if task == "generate" and new_tokens else tokens
    materialised = attention == "xla" or task == "generate"
    rt = rows * tokens
    out = {"layer": _layer_working_set(rows, tokens, keys, d, h, k, e, f, 3, s, materialised),
           "inputs": rt * 4 + 2 * rt * e * 4 + (rows * tokens * keys if materialised else 0)}
    vision = _tower(config)
    if images:
        if vision is None:
            raise InputError("images > 0 needs a ViT vision tower (CLIP / SigLIP: LLaVA, LLaVA-OneVision); this "
                             "model has none the plan models")
        patches = _patches(vision)
        vh = _per_device(vision.num_heads, tensor)
        vf = _per_device(vision.intermediate_size, tensor)
        head_dim = vision.hidden_size // vision.num_heads
        tower = _layer_working_set(rows * images, patches, patches, vision.hidden_size, vh, vh, head_dim, vf, 2, s,
                                   attention == "xla")
        out["layer"] = max(out["layer"], tower)
    if task == "capture":
        out["sites"] = _site_bytes(config, sites, rows, tokens, images, tensor, s)
    elif task == "generate":
        out["cache"] = 2 * text.num_layers * rows * keys * k * e * s
        out["logits"] = rows * v * 4
    else:
        per_layer = [_layer_saved(rows, tokens, d, h, k, e, f, 3, s, materialised, attention=i > 0 or backward != "mlp")
                     for i in range(text.num_layers)]
        saved = 2 * rt * d * s + sum(per_layer)
        out["layer"] = max(out["layer"] - per_layer[-1],
                           _layer_working_set(rows, tokens, keys, d, h, k, e, f, 3, s, materialised))
        if images and backward == "full":
            saved += vision.num_layers * _layer_saved(rows * images, patches, vision.hidden_size, vh, vh, head_dim,
                                                      vf, 2, s, attention == "xla")
        out["saved"] = saved
        out["loss"] = loss_bytes(rows, tokens, d, v, s)
    return out


def _tower(config: Any) -> Any:
    """The composition's ViT tower config (CLIP / SigLIP), or None."""
    vision = getattr(config, "vision", None)
    return vision if hasattr(vision, "image_size") else None


def _patches(vision: Any) -> int:
    """Tokens per image in a ViT tower: its patches, plus CLIP's class token."""
    return vision.grid**2 + (vision.model_type == "clip_vision_model")


def _site_bytes(config: Any, sites: Sequence[str], rows: int, tokens: int, images: int, tensor: int,
                itemsize: int) -> int:
    """Bytes of the kept site values: [rows, tokens, width] for `lm.` sites, [rows x images, patches, width] for
    `vision.` sites (`mlp.act` is the MLP width, split over tensor; the others the model's width)."""
    text, vision = getattr(config, "text", config), _tower(config)
    total = 0
    for name in sites:
        tower, _, rest = name.partition(".")
        if tower == "lm":
            width = (_per_device(text.intermediate_size, tensor) if rest.endswith("mlp.act")
                     else text.hidden_size)
            total += rows * tokens * width * itemsize
        elif tower == "vision" and images and vision is not None:
            patches = _patches(vision)
            width = (_per_device(vision.intermediate_size, tensor) if rest.endswith("mlp.act")
                     else vision.hidden_size)
            total += rows * images * patches * width * itemsize
        elif tower == "projector":
            total += rows * tokens * text.hidden_size * itemsize  # at most one feature per token
        elif tower != "vision":
            raise InputError(f"site {name!r} is not a site name (lm.layers.{{i}}.…, vision.layers.{{i}}.…, "
                             "projector.out)")
    return total


# ----------------------------------------------------------------------------------------------------- training


Neurons = int | Sequence[int]


def neuron_set_of(neurons: Neurons, layers: int, width: int) -> Any:
    """A NeuronSet standing for `neurons`: a total spread evenly over the layers (the first layers take the
    remainder), or a count per layer (`NeuronSet.per_layer()`, which sharded lean deltas depend on: a count the
    tensor axis does not divide stays whole)."""
    from precise_jax.neurons import NeuronSet

    if isinstance(neurons, (int, np.integer)):
        total = int(neurons)
        counts = [total // layers + (i < total % layers) for i in range(layers)]
    else:
        counts = [int(n) for n in neurons]
        total = sum(counts)
        if len(counts) != layers or any(not 0 <= n <= width for n in counts):
            raise InputError(f"neurons per layer must be {layers} counts between 0 and {width}, got {counts}")
    if not 1 <= total <= layers * width:
        raise InputError(f"neurons must be between 1 and {layers * width:,} (layers x d_ff) for a neuron mode, "
                         f"got {total}; give the count the neuron set holds (its len()) or its per_layer()")
    return NeuronSet({i: np.arange(n) for i, n in enumerate(counts) if n}, width, layers, {})


def training_trees(lm: Pretrained, config: Any, neurons: Neurons = 0) -> tuple[Any, Any, Any]:
    """(trained tree, optimizer state, gradients) of `train.make_plan` for a `TrainConfig`, as ShapeDtypeStructs,
    traced from the (possibly abstract) parameters; neuron modes train `neurons` (see `neuron_set_of`)."""
    from precise_jax.masking import NeuronMaskState
    from precise_jax.train import NEURON_MODES, make_plan

    text = lm.decoder
    neuron_set = (neuron_set_of(neurons, text.num_layers, text.intermediate_size)
                  if config.mode in NEURON_MODES else None)

    def trees(params: Any) -> tuple[Any, Any]:
        plan = make_plan(dataclasses.replace(lm, params=params), neuron_set, config, 1)
        return plan.trained, plan.optimizer.init(plan.trained)

    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lm.params)
    trained, state = jax.eval_shape(trees, abstract)
    masks = [node for node in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, NeuronMaskState))
             if isinstance(node, NeuronMaskState)]
    if not masks:
        return trained, state, trained
    # Masked modes: only the leaves holding a neuron selection get a gradient the step uses.
    kept = {_dict_path(path) for mask in masks for path, _ in jax.tree_util.tree_flatten_with_path(mask.keep)[0]}
    gradients = jax.tree_util.tree_map_with_path(lambda path, x: x if _dict_path(path) in kept else None, trained)
    return trained, state, gradients


def _dict_path(path: Sequence[Any]) -> tuple:
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


# ----------------------------------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one run (see the module docstring for what each field counts)."""

    task: str
    mesh: tuple[int, int, int]  # (data, fsdp, tensor)
    dtype: str
    batch_size: int  # global rows
    tokens: int
    rows: int  # rows per device: batch_size / (data x fsdp), rounded up
    mode: str | None
    parameters: int
    trained: int
    gradients: int
    optimizer: int
    activations: int
    limit: int | None  # bytes one device can hold (None: unknown)
    parts: Mapping[str, int] = dataclasses.field(default_factory=dict)  # the activations by part
    model: str = "model"

    @property
    def total(self) -> int:
        return self.parameters + self.trained + self.gradients + self.optimizer + self.activations

    @property
    def fits(self) -> bool | None:
        return None if self.limit is None else self.total <= self.limit

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(mesh=list(self.mesh), parts=dict(self.parts), total=self.total, fits=self.fits)
        return out

    def describe(self) -> str:
        """A short table in GiB, for stderr before loading."""
        data, fsdp, tensor = self.mesh
        what = self.task + (f" ({self.mode})" if self.mode else "")
        lines = [f"memory plan: {self.model}, {what}, {self.dtype}, batch {self.batch_size} x {self.tokens} tokens "
                 f"on mesh data={data},fsdp={fsdp},tensor={tensor} ({self.rows} rows per device)"]
        rows = [("parameters", self.parameters), ("trained copy / deltas", self.trained),
                ("gradients", self.gradients), ("optimizer state", self.optimizer),
                ("activations", self.activations), ("total", self.total)]
        if self.limit is not None:
            rows.append(("device limit", self.limit))
        lines += [f"  {name:<22} {value / GIB:>9.2f} GiB" for name, value in rows if value or name == "total"]
        if self.fits is not None:
            over = self.total - self.limit if self.limit is not None else 0
            lines.append("  fits" if self.fits else f"  does NOT fit: {over / GIB:.2f} GiB over")
        return "\n".join(lines)


def plan_memory(lm: Pretrained, mesh_shape: Sequence[int], *, task: str, batch_size: int, tokens: int,
                mode: str | None = None, neurons: Neurons = 0, sites: Sequence[str] = (), new_tokens: int = 0,
                images: int = 0, attention: str = "auto", train_config: Any = None,
                limit: int | None | Device = "device") -> MemoryPlan:
    """The memory plan of `task` on a (possibly abstract) model; see `plan_for_folder` for the arguments."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; the memory plan knows {TASKS}")
    data, fsdp, tensor = check_mesh(mesh_shape)
    if batch_size < 1 or tokens < 1:
        raise InputError(f"batch_size ({batch_size}) and tokens ({tokens}) must be at least 1")
    dtype = lm.dtype
    text = lm.decoder
    if attention == "auto":
        from ports.layers import fused_attention_chosen

        attention = "fused" if fused_attention_chosen(dtype, text.head_dim) else "xla"
    elif attention not in ATTENTION:
        raise InputError(f"attention must be one of {ATTENTION}, got {attention!r}")
    rows = -(-batch_size // (data * fsdp))
    mesh = (data, fsdp, tensor)
    trained = gradients = optimizer = 0
    backward = "mlp"
    if task == "train":
        from precise_jax.train import MODES, TrainConfig

        if mode is None and train_config is None:
            raise InputError(f"task 'train' needs a mode, one of {MODES}")
        config = train_config if train_config is not None else TrainConfig(mode=mode or "masked")
        if mode is not None and config.mode != mode:
            config = dataclasses.replace(config, mode=mode)
        mode, backward = config.mode, _backward(config)
        trained_tree, state, grads = training_trees(lm, config, neurons)
        trained, optimizer, gradients = (shard_bytes(t, mesh) for t in (trained_tree, state, grads))
    elif mode is not None:
        raise InputError(f"mode {mode!r} is for task 'train', not {task!r}")
    parts = activation_estimate(lm.config, task=task, rows=rows, tokens=tokens, dtype=dtype, tensor=tensor,
                                attention=attention, sites=sites, new_tokens=new_tokens, images=images,
                                backward=backward)
    return MemoryPlan(task, mesh, jnp.dtype(dtype).name, batch_size, tokens, rows, mode, shard_bytes(lm.params, mesh),
                      trained, gradients, optimizer, sum(parts.values()),
                      device_memory() if limit == "device" else limit, parts,
                      str(lm.hf_config.get("_name_or_path") or lm.hf_config.get("model_type") or "model"))


def plan_for_config(config: Mapping[str, Any], mesh_shape: Sequence[int], *, dtype: Dtype = jnp.bfloat16,
                    **kwargs: Any) -> MemoryPlan:
    """`plan_memory` of config.json contents, built abstractly in `dtype` (nothing allocated)."""
    return plan_memory(_abstract(json.dumps(dict(config), sort_keys=True), jnp.dtype(dtype).name), mesh_shape,
                       **kwargs)


def plan_for_folder(folder: str | os.PathLike, mesh_shape: Sequence[int], *, dtype: Dtype = jnp.bfloat16,
                    task: str, batch_size: int, tokens: int, mode: str | None = None, neurons: Neurons = 0,
                    sites: Sequence[str] = (), new_tokens: int = 0, images: int = 0, attention: str = "auto",
                    train_config: Any = None, limit: int | None | Device = "device") -> MemoryPlan:
    """The memory plan of a run on the model folder's config.json (no weights read).

    - mesh_shape: (data, fsdp, tensor), each >= 1 (resolve -1 with `distributed.mesh_shape` first);
    - task: "capture", "generate" or "train"; batch_size: global rows; tokens: the padded length of a batch
      (`--max-tokens`, or the prompt length when generating); dtype: the parameters' (`--dtype`);
    - train: `mode` (masked, lean, full, lora, random); for neuron modes `neurons`, how many the set holds (or
      its `per_layer()` counts, exact for sharded lean deltas); `train_config` (a `train.TrainConfig`) for the
      other settings (optimizer, matrices, LoRA rank and targets);
    - capture: `sites` whose per-token values are kept whole (`capture.capture`); `collect` pools inside its step,
      so give none there; generate: `new_tokens`;
    - images: images (or tiles) per row through the vision tower (0: the tower is not counted);
    - attention: "auto" (what this process would run), "xla" (materialised scores), "fused" (cuDNN flash);
    - limit: bytes per device ("device": `device_memory()`; None: unknown, nothing is refused).
    """
    config = read_config(Path(folder))
    plan = plan_for_config(config, mesh_shape, dtype=dtype, task=task, batch_size=batch_size, tokens=tokens,
                           mode=mode, neurons=neurons, sites=sites, new_tokens=new_tokens, images=images,
                           attention=attention, train_config=train_config, limit=limit)
    return dataclasses.replace(plan, model=str(folder))


def _backward(config: Any) -> str:
    """How far a mode's gradient flows (see `activation_estimate`)."""
    if config.mode == "full":
        return "full"
    attention = {"q_proj", "k_proj", "v_proj", "o_proj"}
    return "lm" if config.mode == "lora" and attention & set(config.lora_targets) else "mlp"


_ABSTRACT: dict[tuple[str, str], Pretrained] = {}


def _abstract(config_json: str, dtype: str) -> Pretrained:
    """`build_abstract`, cached by config contents: tracing a 72B port takes seconds."""
    from ports.presets import build_abstract

    key = (config_json, dtype)
    if key not in _ABSTRACT:
        _ABSTRACT[key] = build_abstract(json.loads(config_json), jnp.dtype(dtype))
    return _ABSTRACT[key]


def check_plan(plan: MemoryPlan) -> MemoryPlan:
    """The plan when it fits (or its limit is unknown); InputError naming the numbers and what to change if not."""
    if plan.fits is not False or plan.limit is None:
        return plan
    data, fsdp, tensor = plan.mesh
    advice = [f"a larger mesh (more fsdp or tensor devices than data={data},fsdp={fsdp},tensor={tensor})",
              "a smaller --batch-size or --max-tokens"]
    if plan.dtype == "float32":
        advice.append("--dtype bfloat16 (half the parameter and activation bytes)")
    if plan.mode in ("masked", "random", "full"):
        advice.append("lean mode (--mode lean: optimizer state and gradients for the neurons only)")
    parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in (
        ("parameters", plan.parameters), ("trained copy", plan.trained), ("gradients", plan.gradients),
        ("optimizer", plan.optimizer), ("activations", plan.activations)) if value)
    what = plan.task + (f" ({plan.mode})" if plan.mode else "")
    raise InputError(
        f"{plan.model} does not fit: the {what} plan needs {plan.total / GIB:.2f} GiB per device ({parts} GiB) "
        f"but a device holds {plan.limit / GIB:.2f} GiB (limit {plan.limit:,} bytes). Try " + "; or ".join(advice)
        + ". Nothing was loaded.")


__all__ = ["ATTENTION", "TASKS", "MemoryPlan", "activation_estimate", "check_mesh", "check_plan", "device_memory",
           "loss_bytes", "neuron_set_of", "plan_for_config", "plan_for_folder", "plan_memory", "shard_bytes",
           "training_trees"]
