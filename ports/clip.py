"""CLIP's vision tower (ViT with a class token, learned positions and `pre_layrnorm`), as LLaVA-1.5 uses it.

Module names mirror Hugging Face's `CLIPVisionModel`, except that the encoder layers sit directly under the tower
(`layers_{i}`, not `encoder/layers_{i}`) so that their sites read `vision.layers.{i}.…` inside a composition.
Shapes: N images, C channels, S image side, P patch side, G = (S / P)^2 patches, D width.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterable

import flax.linen as nn
import flax.struct
import jax.numpy as jnp

from ports.errors import InputError, UnsupportedArchitectureError
from ports.layers import Array, Dtype, EncoderLayer, LayerNorm
from ports.weights import CONV, Rule, mirrored

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MODEL_TYPES = ("clip_vision_model",)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A pre-norm ViT tower: CLIP's and SigLIP's differ only in these fields (and in their embeddings)."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    use_head: bool = False  # SigLIP's attention-pooling head

    @property
    def grid(self) -> int:
        """Patches along each side of the image."""
        return self.image_size // self.patch_size


def config_from_hf(hf: PretrainedConfig) -> VisionConfig:
    """VisionConfig from a transformers `CLIPVisionConfig` or `SiglipVisionConfig`."""
    if hf.hidden_size % hf.num_attention_heads:
        raise UnsupportedArchitectureError(
            f"{hf.model_type}: hidden_size {hf.hidden_size} is not a multiple of num_attention_heads "
            f"{hf.num_attention_heads}; no such checkpoint exists, check config.json"
        )
    return VisionConfig(
        model_type=hf.model_type,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        image_size=hf.image_size,
        patch_size=hf.patch_size,
        num_channels=hf.num_channels,
        hidden_act=hf.hidden_act,
        layer_norm_eps=hf.layer_norm_eps,
        use_head=bool(getattr(hf, "vision_use_head", False)),
    )


@flax.struct.dataclass
class VisionOutput:
    """What Hugging Face's vision models return, with `hidden_states` always present."""

    hidden_states: tuple[Array, ...]  # L + 1 entries [N, tokens, D]: the input of layer 0, then each layer's output
    last_hidden_state: Array  # [N, tokens, D]
    pooled: Array | None  # [N, D]


def patch_embeddings(config: VisionConfig, pixel_values: Array, use_bias: bool, dtype: Dtype) -> Array:
    """pixel_values [N, C, S, S] (HF's NCHW) -> [N, G, D] in row-major patch order, as HF's Conv2d + flatten."""
    n, c, h, w = pixel_values.shape
    if (h, w) != (config.image_size, config.image_size) or c != config.num_channels:
        raise InputError(
            f"pixel_values of shape {tuple(pixel_values.shape)}: this {config.model_type} tower takes "
            f"[images, {config.num_channels}, {config.image_size}, {config.image_size}]; preprocess the images with "
            "the model's image processor"
        )
    p = config.patch_size
    conv = nn.Conv(config.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=use_bias,
                   dtype=dtype, param_dtype=dtype, name="patch_embedding")
    patches = conv(jnp.transpose(pixel_values.astype(dtype), (0, 2, 3, 1)))  # [N, S/P, S/P, D]
    return patches.reshape(n, -1, config.hidden_size)


class ClipVisionEmbeddings(nn.Module):
    """The class token, then the patches, plus learned positions (HF's `CLIPVisionEmbeddings`)."""

    config: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:  # [N, C, S, S] -> [N, 1 + G, D]
        c = self.config
        patches = patch_embeddings(c, pixel_values, False, self.dtype)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (c.hidden_size,), self.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (patches.shape[0], 1, c.hidden_size)), patches], axis=1)
        positions = nn.Embed(c.grid**2 + 1, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                             name="position_embedding")
        return x + positions.embedding[None].astype(self.dtype)


class ClipVisionTower(nn.Module):
    """HF's `CLIPVisionModel`: embeddings, `pre_layrnorm`, the encoder layers, `post_layernorm` on the class token."""

    config: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array) -> VisionOutput:  # [N, C, S, S]
        c = self.config
        x = ClipVisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
        x = LayerNorm(c.layer_norm_eps, self.dtype, name="pre_layrnorm")(x)
        hidden_states = [x]
        for i in range(c.num_layers):
            x = EncoderLayer(c.num_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps, self.dtype,
                             name=f"layers_{i}")(x)
            hidden_states.append(x)
        pooled = LayerNorm(c.layer_norm_eps, self.dtype, name="post_layernorm")(x[:, 0])
        return VisionOutput(hidden_states=tuple(hidden_states), last_hidden_state=x, pooled=pooled)


# ----------------------------------------------------------------------------------------------------- weights


def _join(prefix: str, name: str, sep: str = ".") -> str:
    return f"{prefix}{sep}{name}" if prefix else name


def layer_norm_rules(hf_prefix: str, port_prefix: str, names: Iterable[str]) -> list[Rule]:
    """torch LayerNorms (`weight`, `bias`) named as in HF."""
    return [Rule(f"{_join(hf_prefix, n)}.{p}", _join(port_prefix, f"{n.replace('.', '/')}/{p}", "/"))
            for n in names for p in ("weight", "bias")]


def encoder_rules(hf_prefix: str, port_prefix: str) -> list[Rule]:
    """HF `encoder.layers.{i}` (CLIP / SigLIP encoder layers) <-> port `layers_{i}`."""
    hf, port = _join(hf_prefix, "encoder.layers.{i}"), _join(port_prefix, "layers_{i}", "/")
    linears = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    return mirrored(hf, port, linears=linears) + layer_norm_rules(hf, port, ("layer_norm1", "layer_norm2"))


def weight_rules(hf_prefix: str, port_prefix: str) -> list[Rule]:
    """The tower's table; `hf_prefix` is where the checkpoint keeps it (e.g. 'vision_tower.vision_model')."""
    emb, port_emb = _join(hf_prefix, "embeddings"), _join(port_prefix, "embeddings", "/")
    return [
        Rule(f"{emb}.class_embedding", f"{port_emb}/class_embedding"),
        Rule(f"{emb}.patch_embedding.weight", f"{port_emb}/patch_embedding/kernel", CONV),
        Rule(f"{emb}.position_embedding.weight", f"{port_emb}/position_embedding/embedding"),
        Rule(f"{emb}.position_ids", None),  # a buffer some old checkpoints saved; the port recomputes it
        *layer_norm_rules(hf_prefix, port_prefix, ("pre_layrnorm", "post_layernorm")),
        *encoder_rules(hf_prefix, port_prefix),
    ]
