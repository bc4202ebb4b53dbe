"""Qwen2-VL and Qwen2.5-VL: a dynamic-resolution vision transformer, a patch merger and the Qwen2 decoder with M-RoPE.

The two differ only inside the vision tower: Qwen2-VL uses LayerNorm and an fc1/fc2 quick-GELU MLP with attention
within each image; Qwen2.5-VL uses RMSNorm, a SwiGLU MLP and attention within windows of `window_size` pixels
except in the `fullatt_block_indexes` blocks. Images are packed as Hugging Face packs them: `pixel_values`
[patches, C*T*P*P] holds every image of the batch, patch rows in 2x2 merge-block order, `image_grid_thw` [images, 3]
their (frames, rows, columns) of patches. Vision sites are packed the same way: [patches, width], image by image
in pixel_values order (HF's Qwen2.5-VL runs its blocks in window order; this port keeps patch order throughout
and expresses windows as attention masks, which gives the same result). `projector.out` is [image tokens, d_model].
Batches come from `ports.processing.image_chat_batch` with this module's torch-free `Qwen2VLProcessor`.
Shapes: N patches, M = N / merge**2 image tokens, W vision width, E head dim, I images.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ports import llama
from ports.errors import InputError, UnsupportedArchitectureError
from ports.layers import (
    CausalLM, CausalLMOutput, DecoderConfig, DenseMLP, GatedMLP, KVCache, LayerNorm, RMSNorm, Site, activation,
    apply_rotary, default_positions, dot_product_attention,
)
from ports.weights import CONV, LINEAR, Rule, mirrored

if TYPE_CHECKING:
    from transformers import PretrainedConfig

Array = jax.Array
Dtype = Any

QWEN2_VL_TYPES = ("qwen2_vl",)
QWEN2_5_VL_TYPES = ("qwen2_5_vl",)


# ----------------------------------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower and patch merger of Qwen2-VL (`norm="layer"`) or Qwen2.5-VL (`norm="rms"`, windows)."""

    depth: int
    width: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    out_width: int  # the language model's width: what the merger produces
    norm: str  # "layer": LayerNorm + fc1/fc2 MLP (Qwen2-VL); "rms": RMSNorm + SwiGLU MLP (Qwen2.5-VL)
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0
    window_size: int | None = None  # pixels per window side; None: every block attends within whole images
    fullatt_block_indexes: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    def windowed(self, block: int) -> bool:
        return self.window_size is not None and block not in self.fullatt_block_indexes


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    text: DecoderConfig  # the Qwen2 decoder, its rotary with mrope_section
    vision: VisionConfig
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    video_token_id: int


def config_from_hf(hf: PretrainedConfig) -> Qwen2VLConfig:
    """Qwen2VLConfig / Qwen2_5_VLConfig (transformers) -> the port's config."""
    v = hf.vision_config
    rope = dict(getattr(v, "rope_parameters", None) or {})
    if hf.model_type == "qwen2_vl":
        vision = VisionConfig(
            depth=v.depth, width=v.embed_dim, num_heads=v.num_heads, intermediate_size=int(v.embed_dim * v.mlp_ratio),
            hidden_act=v.hidden_act, out_width=v.hidden_size, norm="layer",
        )
    elif hf.model_type == "qwen2_5_vl":
        vision = VisionConfig(
            depth=v.depth, width=v.hidden_size, num_heads=v.num_heads, intermediate_size=v.intermediate_size,
            hidden_act=v.hidden_act, out_width=v.out_hidden_size, norm="rms", window_size=v.window_size,
            fullatt_block_indexes=tuple(v.fullatt_block_indexes),
        )
    else:
        raise UnsupportedArchitectureError(f"model_type {hf.model_type!r} is not Qwen2-VL or Qwen2.5-VL")
    vision = dataclasses.replace(
        vision, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, in_channels=v.in_channels,
        spatial_merge_size=v.spatial_merge_size, rope_theta=float(rope.get("rope_theta", 10000.0)),
    )
    text_hf = hf.text_config
    # The language model is Qwen2 (q/k/v biases); whether the head is tied is the composite config's setting.
    text = llama.decoder_config(text_hf, qkv_bias=True, out_bias=False, mlp_bias=False,
                          tie_word_embeddings=bool(hf.tie_word_embeddings))
    if sum(text.rope.mrope_section) != text.head_dim // 2:
        raise UnsupportedArchitectureError(
            f"rope_parameters.mrope_section {list(text.rope.mrope_section)} must sum to head_dim / 2 = "
            f"{text.head_dim // 2}"
        )
    return Qwen2VLConfig(text, vision, hf.image_token_id, hf.vision_start_token_id, hf.vision_end_token_id,
                         hf.video_token_id)


# ----------------------------------------------------------------------------------------------------- weights

_BLOCK, _LAYER = "visual.blocks.{i}", "vision/layers_{i}"


def weight_rules(config: Qwen2VLConfig) -> list[Rule]:
    """HF keys as transformers saves them (`model.layers`, `visual.blocks`) first, so export writes that layout;
    then the same tensors under the in-memory v5 names (`model.language_model`, `model.visual`) for loading."""
    v = config.vision
    mlp = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") if v.norm == "rms" else ("mlp.fc1", "mlp.fc2")
    norms = ("norm1", "norm2")
    vision = [
        Rule("visual.patch_embed.proj.weight", "vision/patch_embed/proj/kernel", CONV),
        *mirrored(_BLOCK, _LAYER, linears=mlp, norms=norms),
        *mirrored(f"{_BLOCK}.attn", f"{_LAYER}/self_attn", linears=("qkv", "proj")),
        *mirrored("visual.merger", "projector", norms=("ln_q",)),
        Rule("visual.merger.mlp.0.weight", "projector/fc1/kernel", LINEAR),
        Rule("visual.merger.mlp.0.bias", "projector/fc1/bias"),
        Rule("visual.merger.mlp.2.weight", "projector/fc2/kernel", LINEAR),
        Rule("visual.merger.mlp.2.bias", "projector/fc2/bias"),
    ]
    if v.norm == "layer":  # LayerNorm carries a bias too
        vision += [Rule(f"{_BLOCK}.{n}.bias", f"{_LAYER}/{n}/bias") for n in norms]
        vision.append(Rule("visual.merger.ln_q.bias", "projector/ln_q/bias"))
    saved = llama.weight_rules(config.text) + vision
    in_memory = [Rule(_in_memory_key(r.hf), r.port, r.transform) for r in saved if r.hf != "lm_head.weight"]
    return saved + in_memory


def _in_memory_key(key: str) -> str:
    if key.startswith("visual."):
        return "model." + key
    return "model.language_model." + key.removeprefix("model.")


# ----------------------------------------------------------------------------------------------------- vision


def patch_layout(grid_thw: Array, num_patches: int, config: VisionConfig) -> dict[str, Array]:
    """Where each packed patch sits: its (row, column) in its image, its attention segment (image frame) and window.

    grid_thw [I, 3] may be traced; every output is [N] int32.
    """
    m = config.spatial_merge_size
    grid = grid_thw.astype(jnp.int32)
    sizes = jnp.prod(grid, axis=-1)
    ends = jnp.cumsum(sizes)
    p = jnp.arange(num_patches, dtype=jnp.int32)
    image = jnp.minimum(jnp.searchsorted(ends, p, side="right", method="compare_all"), grid.shape[0] - 1)
    h, w = grid[image, 1], grid[image, 2]
    local = p - (ends - sizes)[image]
    frame, q = local // (h * w), local % (h * w)
    # Within a frame, patches come in merge blocks: block row-major over the merged grid, then m x m inside.
    block, inner = q // (m * m), q % (m * m)
    block_row, block_col = block // (w // m), block % (w // m)
    row, col = block_row * m + inner // m, block_col * m + inner % m
    first_frame = jnp.cumsum(grid[:, 0]) - grid[:, 0]
    segment = first_frame[image] + frame  # HF's cu_seqlens: one segment per frame of each image
    if config.window_size is None:
        window = jnp.zeros_like(segment)
    else:
        side = config.window_size // m // config.patch_size  # window side in merged tokens
        windows_per_row = (w // m + side - 1) // side
        window = (block_row // side) * windows_per_row + block_col // side
    return {"row": row, "col": col, "segment": segment, "window": window}


def vision_rotary(row: Array, col: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """2-D rotary: the first half of each head's frequencies turn with the row, the second with the column."""
    quarter = np.arange(0, head_dim // 2, 2, dtype=np.float32) / np.float32(head_dim // 2)
    inv = jnp.asarray((1.0 / np.power(np.float32(theta), quarter)).astype(np.float32))  # [E/4]
    freqs = jnp.concatenate([row[:, None] * inv, col[:, None] * inv], axis=-1)  # [N, E/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class PatchEmbed(nn.Module):
    """Conv3d with stride = kernel = (T, P, P) over each flattened patch: [N, C*T*P*P] -> [N, W]."""

    config: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:
        c = self.config
        kernel = (c.temporal_patch_size, c.patch_size, c.patch_size)
        x = pixel_values.astype(self.dtype).reshape(-1, c.in_channels, *kernel).transpose(0, 2, 3, 4, 1)  # NTHWC
        conv = nn.Conv(c.width, kernel, strides=kernel, padding="VALID", use_bias=False, dtype=self.dtype,
                       param_dtype=self.dtype, name="proj")
        return conv(x).reshape(x.shape[0], c.width)


class VisionAttention(nn.Module):
    """Fused-qkv attention with 2-D rotary over packed patches, restricted by `allowed`; site `out`."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cos_sin: tuple[Array, Array], allowed: Array) -> Array:  # x [N, W], allowed [N, N]
        n, width = x.shape
        dense = lambda k, name: nn.Dense(k, dtype=self.dtype, param_dtype=self.dtype, name=name)  # noqa: E731
        qkv = dense(3 * width, "qkv")(x).reshape(n, 3, self.num_heads, -1)
        q, k, v = (qkv[None, :, i] for i in range(3))  # [1, N, H, E]
        cos, sin = (a[None] for a in cos_sin)
        # HF rotates the vision queries and keys in float32 whatever the dtype.
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(v.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(v.dtype)
        out = dot_product_attention(q, k, v, allowed[None, None], q.shape[-1] ** -0.5)
        return Site(name="out")(dense(width, "proj")(out.reshape(n, width)))


def _norm(config: VisionConfig, dtype: Dtype, name: str) -> nn.Module:
    """Qwen2-VL's LayerNorm or Qwen2.5-VL's RMSNorm (eps 1e-6 in both)."""
    return LayerNorm(1e-6, dtype, name=name) if config.norm == "layer" else RMSNorm(1e-6, dtype, name=name)


class VisionBlock(nn.Module):
    config: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cos_sin: tuple[Array, Array], allowed: Array) -> Array:
        c = self.config
        norm = lambda name: _norm(c, self.dtype, name)  # noqa: E731
        # `self_attn`, not HF's `attn`: canonical site names map `attn` to modules of that name.
        x = x + VisionAttention(c.num_heads, self.dtype, name="self_attn")(norm("norm1")(x), cos_sin, allowed)
        if c.norm == "layer":
            mlp = DenseMLP(c.intermediate_size, c.hidden_act, bias=True, dtype=self.dtype, name="mlp")
        else:
            mlp = GatedMLP(c.intermediate_size, c.hidden_act, bias=True, dtype=self.dtype, name="mlp")
        x = x + mlp(norm("norm2")(x))
        return Site(name="resid")(x)


class VisionTower(nn.Module):
    """Patch embedding and blocks: pixel_values [N, C*T*P*P], image_grid_thw [I, 3] -> [N, W]."""

    config: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array, image_grid_thw: Array) -> Array:
        c = self.config
        x = PatchEmbed(c, self.dtype, name="patch_embed")(pixel_values)
        where = patch_layout(image_grid_thw, x.shape[0], c)
        cos_sin = vision_rotary(where["row"], where["col"], c.head_dim, c.rope_theta)
        # Dense [N, N] masks over the packed batch: exact and simple; memory grows with the square of all patches.
        same_frame = where["segment"][:, None] == where["segment"][None, :]
        same_window = same_frame & (where["window"][:, None] == where["window"][None, :])
        for i in range(c.depth):
            allowed = same_window if c.windowed(i) else same_frame
            x = VisionBlock(c, self.dtype, name=f"layers_{i}")(x, cos_sin, allowed)
        return x


class PatchMerger(nn.Module):
    """Norm, then each 2x2 block of patches concatenated and mapped to the LM width; site `out` (projector.out)."""

    config: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [N, W] -> [M, D]
        c = self.config
        merged = c.width * c.spatial_merge_size**2
        x = _norm(c, self.dtype, "ln_q")(x).reshape(-1, merged)
        x = nn.Dense(merged, dtype=self.dtype, param_dtype=self.dtype, name="fc1")(x)
        x = nn.Dense(c.out_width, dtype=self.dtype, param_dtype=self.dtype, name="fc2")(activation("gelu")(x))
        return Site(name="out")(x)


# ----------------------------------------------------------------------------------------------------- positions


def multimodal_positions(
    input_ids: Array, attention_mask: Array, image_grid_thw: Array, image_token_id: int, spatial_merge_size: int
) -> tuple[Array, Array]:
    """HF's `get_rope_index` for images: M-RoPE positions [3, B, T] and rope deltas [B].

    Text tokens count up on all three streams; an image's tokens sit at (start + frame, start + row, start + col) of
    its merged grid, and the text after it resumes at start + max(rows, cols). Pads get 0. Image tokens take the
    images in row-major order over the batch, as HF's masked_scatter places their features.
    """
    valid = attention_mask.astype(bool)
    image = (input_ids == image_token_id) & valid
    grid = image_grid_thw.astype(jnp.int32)
    rows, cols = grid[:, 1] // spatial_merge_size, grid[:, 2] // spatial_merge_size
    tokens = grid[:, 0] * rows * cols  # [I] image tokens of each image
    ends = jnp.cumsum(tokens)
    k = _image_token_index(image)
    which = jnp.minimum(jnp.searchsorted(ends, k, side="right", method="compare_all"), grid.shape[0] - 1)
    offset = k - (ends - tokens)[which]  # [B, T] place of each image token within its image
    h, w = rows[which], cols[which]
    last = image & (offset == tokens[which] - 1)
    advance = jnp.where(image, jnp.where(last, jnp.maximum(h, w), 0), valid.astype(jnp.int32))
    start = jnp.cumsum(advance, axis=1) - advance
    cell = jnp.stack([offset // (h * w), (offset // w) % h, offset % w])  # [3, B, T] (frame, row, col)
    positions = jnp.where(valid, start + jnp.where(image, cell, 0), 0)
    deltas = jnp.max(positions, axis=(0, 2)) + 1 - valid.sum(axis=1)
    return positions.astype(jnp.int32), deltas.astype(jnp.int32)


def _image_token_index(image: Array) -> Array:
    """[B, T] bool -> how many image tokens precede each one, counted row-major over the whole batch."""
    return jnp.cumsum(image.reshape(-1)).reshape(image.shape) - 1


@flax.struct.dataclass
class MRopeCache(KVCache):
    """A KV cache that also keeps HF's `rope_deltas`: how far each row's M-RoPE positions run ahead of its tokens."""

    rope_deltas: Array  # [B] int32


def _image_embeddings(input_ids: Array, embeds: Array, features: Array, image_token_id: int) -> Array:
    """Put the image features [M, D] at the image tokens, in row-major order (HF's masked_scatter)."""
    image = input_ids == image_token_id
    placed = features[jnp.clip(_image_token_index(image), 0, features.shape[0] - 1)].astype(embeds.dtype)
    return jnp.where(image[..., None], placed, embeds)


def _concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


# ----------------------------------------------------------------------------------------------------- model


class Qwen2VL(CausalLM):
    """Qwen2-VL / Qwen2.5-VL for conditional generation; `config` is the decoder's (as in CausalLM), `spec` the
    composition's. Call with Hugging Face batch keys; returns CausalLMOutput. Decoding steps pass no pixels: the
    cache holds the image tokens and each row's rope delta."""

    spec: Qwen2VLConfig | None = None

    def setup(self) -> None:
        super().setup()
        self.vision = VisionTower(self.spec.vision, self.dtype)
        self.projector = PatchMerger(self.spec.vision, self.dtype)

    def __call__(
        self,
        input_ids: Array,  # [B, T]
        attention_mask: Array | None = None,  # [B, T]
        position_ids: Array | None = None,  # [3, B, T] or [B, T]; default: HF's get_rope_index / rope deltas
        *,
        pixel_values: Array | None = None,  # [N, C*T*P*P]
        image_grid_thw: Array | None = None,  # [I, 3]
        cache: MRopeCache | None = None,
        logits_to_keep: int = 0,
        token_types: Array | None = None,  # carried by every batch; the port does not need it
        mm_token_type_ids: Array | None = None,  # HF processors emit it; image tokens are found by id instead
        num_layers: int | None = None,  # run only the first LM layers and return no logits (capture needs no more)
        pixel_values_videos: Array | None = None,
        video_grid_thw: Array | None = None,
    ) -> CausalLMOutput:
        del mm_token_type_ids
        s = self.spec
        if pixel_values_videos is not None or video_grid_thw is not None:
            raise InputError("videos are not supported by the Qwen2-VL port; pass images only")
        if (pixel_values is None) != (image_grid_thw is None):
            raise InputError("pass pixel_values and image_grid_thw together (both from the processor), or neither")
        if pixel_values is not None and _concrete(input_ids, pixel_values, image_grid_thw):
            self.check_batch(dict(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw))
        input_ids = jnp.asarray(input_ids)
        mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
        deltas = None
        if position_ids is None:
            if pixel_values is not None:
                position_ids, deltas = multimodal_positions(
                    input_ids, mask, jnp.asarray(image_grid_thw), s.image_token_id, s.vision.spatial_merge_size)
            elif cache is not None:
                # Decoding (or a text-only prefill): positions continue from the prompt's last M-RoPE position.
                position_ids = default_positions(mask, cache) + cache.rope_deltas[:, None]
            else:
                position_ids = default_positions(mask, None)
        # The decoder stopped before its first layer returns the token embeddings.
        embeds, _ = self.lm(input_ids, mask, position_ids, num_layers=0)
        if pixel_values is not None:
            features = self.projector(self.vision(jnp.asarray(pixel_values), jnp.asarray(image_grid_thw)))
            embeds = _image_embeddings(input_ids, embeds, features, s.image_token_id)
        if cache is not None and deltas is not None:
            cache = cache.replace(rope_deltas=deltas)
        return super().__call__(None, mask, position_ids, inputs_embeds=embeds, cache=cache,
                                logits_to_keep=logits_to_keep, token_types=token_types, num_layers=num_layers)

    @nn.nowrap
    def init_cache(self, batch: int, slots: int) -> MRopeCache:
        """An empty cache for `batch` rows and `slots` tokens; the prefill stores the rows' rope deltas in it."""
        kv = super().init_cache(batch, slots)
        return MRopeCache(keys=kv.keys, values=kv.values, valid=kv.valid, length=kv.length,
                          rope_deltas=jnp.zeros((batch,), jnp.int32))

    def check_batch(self, batch: Mapping) -> None:
        """Raise InputError unless the batch's image tokens, patches and grids agree (run on the host)."""
        if batch.get("pixel_values") is None:
            return
        if batch.get("image_grid_thw") is None:
            raise InputError("pixel_values come with image_grid_thw (the processor gives both); it is missing")
        grid = np.asarray(batch["image_grid_thw"])
        patches = int(np.prod(grid, axis=-1).sum())
        if np.shape(batch["pixel_values"])[0] != patches:
            raise InputError(f"pixel_values has {np.shape(batch['pixel_values'])[0]} patches but image_grid_thw "
                             f"{grid.tolist()} describes {patches}; pass the processor's two arrays together")
        features = patches // self.spec.vision.spatial_merge_size**2
        tokens = int(np.sum(np.asarray(batch["input_ids"]) == self.spec.image_token_id))
        if tokens != features:
            raise InputError(
                f"the batch has {tokens} image tokens but its {len(grid)} image(s) give {features} image features; "
                "build batches with the model's processor (ports.processing.image_chat_batch) so that every image "
                "gets exactly its tokens"
            )


def build(config: Qwen2VLConfig, dtype: Any = jnp.float32) -> Qwen2VL:
    return Qwen2VL(config.text, dtype, spec=config)


# ----------------------------------------------------------------------------------------------------- processor


class Qwen2VLProcessor:
    """transformers' Qwen2VLProcessor for images, without torch (transformers 5.x builds its own only with
    torchvision): the tokenizer plus the PIL image processor, with the methods `ports.processing.image_chat_batch`,
    loading, saving and decoding use."""

    image_token = "<|image_pad|>"

    def __init__(self, tokenizer, image_processor):
        if self.image_token not in tokenizer.get_vocab():
            raise InputError(f"the tokenizer has no {self.image_token} token; load the checkpoint's own tokenizer")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Qwen2VLProcessor":
        import transformers

        folder = Path(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        if tokenizer.chat_template is None and (folder / "chat_template.json").exists():
            # Qwen2-VL checkpoints keep the template at the processor level.
            tokenizer.chat_template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
        if (folder / "preprocessor_config.json").exists():
            images = transformers.Qwen2VLImageProcessorPil.from_pretrained(folder)
        else:
            images = transformers.Qwen2VLImageProcessorPil()
        return cls(tokenizer, images)

    def save_pretrained(self, folder: str | Path) -> None:
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs: Any) -> str:
        """The rendered conversation, each image as one `<|image_pad|>` (expanded by `replace_image_token`)."""
        if tokenize:
            raise InputError("Qwen2VLProcessor renders text only (tokenize=False); build batches with "
                             "ports.processing.image_chat_batch")
        return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **kwargs)

    def replace_image_token(self, image_inputs: Mapping, image_idx: int) -> str:
        """The image tokens of image `image_idx`: one per merge block of its patches."""
        grid = np.asarray(image_inputs["image_grid_thw"][image_idx])
        return self.image_token * int(np.prod(grid) // self.image_processor.merge_size**2)

    def batch_decode(self, rows: Sequence[Sequence[int]], skip_special_tokens: bool = True, **kwargs: Any,
                     ) -> list[str]:
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True, **kwargs: Any) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)


def load_processor(folder: Path) -> Qwen2VLProcessor | None:
    """The folder's processor, or None when it has no tokenizer."""
    if not ((folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()):
        return None
    return Qwen2VLProcessor.from_pretrained(folder)


def example_batch(config: Qwen2VLConfig) -> dict:
    """One image of one merged token: the smallest batch that reaches every parameter and site (tracing only)."""
    v = config.vision
    m = v.spatial_merge_size
    width = v.in_channels * v.temporal_patch_size * v.patch_size**2
    return {
        "input_ids": np.full((1, 1), config.image_token_id, np.int32),
        "pixel_values": np.zeros((m * m, width), np.float32),
        "image_grid_thw": np.array([[1, m, m]], np.int32),
    }
