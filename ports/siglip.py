"""SigLIP's vision tower (ViT without class token, learned positions, `post_layernorm`, optional pooling head).

LLaVA-OneVision reads `hidden_states[vision_feature_layer]`, the encoder outputs before `post_layernorm`, so the
norm and the head (absent from its checkpoint: `vision_use_head` false) feed nothing there; the tower still holds
and computes what the checkpoint holds, as Hugging Face's `SiglipVisionModel` does.
Shapes: N images, T = G tokens (patches), D width.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ports import clip
from ports.clip import VisionConfig, VisionOutput, _join, encoder_rules, layer_norm_rules, patch_embeddings
from ports.layers import Array, DenseMLP, Dtype, EncoderLayer, LayerNorm, dot_product_attention
from ports.weights import CONV, Rule, mirrored

MODEL_TYPES = ("siglip_vision_model",)
config_from_hf = clip.config_from_hf  # one translation serves both towers


class SiglipVisionEmbeddings(nn.Module):
    """Patches (a biased Conv2d) plus learned positions."""

    config: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array) -> Array:  # [N, C, S, S] -> [N, G, D]
        c = self.config
        patches = patch_embeddings(c, pixel_values, True, self.dtype)
        positions = nn.Embed(c.grid**2, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                             name="position_embedding")
        return patches + positions.embedding[None].astype(self.dtype)


class TorchMultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention (batch_first, packed `in_proj_weight` [3D, D] and `in_proj_bias`, `out_proj`)."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query: Array, keys: Array) -> Array:  # query [N, Q, D], keys [N, T, D] -> [N, Q, D]
        d = query.shape[-1]
        head_dim = d // self.num_heads
        weight = self.param("in_proj_weight", nn.initializers.lecun_normal(), (3 * d, d), self.dtype)
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,), self.dtype)
        heads = lambda x, part: (  # noqa: E731
            x @ weight[part * d:(part + 1) * d].T + bias[part * d:(part + 1) * d]
        ).reshape(*x.shape[:2], self.num_heads, head_dim)
        q, k, v = heads(query, 0), heads(keys, 1), heads(keys, 2)
        out = dot_product_attention(q, k, v, jnp.ones((1, 1, 1, 1), bool), head_dim**-0.5)
        out = out.reshape(*query.shape[:2], d)
        return nn.Dense(d, dtype=self.dtype, param_dtype=self.dtype, name="out_proj")(out)


class SiglipPoolingHead(nn.Module):
    """HF's `SiglipMultiheadAttentionPoolingHead`: a learned probe attends over the tokens, then a residual MLP."""

    config: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [N, T, D] -> [N, D]
        c = self.config
        probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, c.hidden_size), self.dtype)
        pooled = TorchMultiheadAttention(c.num_heads, self.dtype, name="attention")(
            jnp.broadcast_to(probe, (x.shape[0], 1, c.hidden_size)), x
        )
        normed = LayerNorm(c.layer_norm_eps, self.dtype, name="layernorm")(pooled)
        pooled = pooled + DenseMLP(c.intermediate_size, c.hidden_act, True, self.dtype, name="mlp")(normed)
        return pooled[:, 0]


class SiglipVisionTower(nn.Module):
    """HF's `SiglipVisionModel`: embeddings, encoder layers, `post_layernorm`, and the head when configured."""

    config: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: Array) -> VisionOutput:  # [N, C, S, S]
        c = self.config
        x = SiglipVisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
        hidden_states = [x]
        for i in range(c.num_layers):
            x = EncoderLayer(c.num_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps, self.dtype,
                             name=f"layers_{i}")(x)
            hidden_states.append(x)
        last = LayerNorm(c.layer_norm_eps, self.dtype, name="post_layernorm")(x)
        pooled = SiglipPoolingHead(c, self.dtype, name="head")(last) if c.use_head else None
        return VisionOutput(hidden_states=tuple(hidden_states), last_hidden_state=last, pooled=pooled)


def weight_rules(hf_prefix: str, port_prefix: str) -> list[Rule]:
    """The tower's table; `hf_prefix` is where the checkpoint keeps it (e.g. 'vision_tower.vision_model')."""
    emb, port_emb = _join(hf_prefix, "embeddings"), _join(port_prefix, "embeddings", "/")
    head, port_head = _join(hf_prefix, "head"), _join(port_prefix, "head", "/")
    return [
        Rule(f"{emb}.patch_embedding.weight", f"{port_emb}/patch_embedding/kernel", CONV),
        Rule(f"{emb}.patch_embedding.bias", f"{port_emb}/patch_embedding/bias"),
        Rule(f"{emb}.position_embedding.weight", f"{port_emb}/position_embedding/embedding"),
        Rule(f"{emb}.position_ids", None),  # a buffer some old checkpoints saved; the port recomputes it
        *layer_norm_rules(hf_prefix, port_prefix, ("post_layernorm",)),
        *encoder_rules(hf_prefix, port_prefix),
        Rule(f"{head}.probe", f"{port_head}/probe"),
        Rule(f"{head}.attention.in_proj_weight", f"{port_head}/attention/in_proj_weight"),
        Rule(f"{head}.attention.in_proj_bias", f"{port_head}/attention/in_proj_bias"),
        *mirrored(head, port_head, linears=("attention.out_proj", "mlp.fc1", "mlp.fc2")),
        *layer_norm_rules(head, port_head, ("layernorm",)),
    ]
