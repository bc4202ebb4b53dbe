"""Blocks shared by every port: sites, norms, rotary embeddings, attention with a KV cache, MLPs, the decoder.

Module names mirror Hugging Face (`self_attn.q_proj`, `mlp.down_proj`, ...) so that weight tables stay short.
Activation sites are `Site` identity modules, addressed by path (see `precise_jax.sites` for canonical names).
Shapes: B batch, T new tokens, S key slots (cache size), D model width, H heads, K kv heads, E head dim, F d_ff.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ports.errors import InputError, UnsupportedArchitectureError

Array = jax.Array
Dtype = Any


class Site(nn.Module):
    """An identity at a named activation site, so `capture_intermediates` and `nn.intercept_methods` can reach it."""

    def __call__(self, x: Array) -> Array:
        return x


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"activation function {name!r} has no port; supported: {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, cast back before the scale (as Hugging Face does)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight * normed.astype(x.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm (biased variance, `weight` and `bias`), computed in float32 and cast back."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------- rotary


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention: Hugging Face's `rope_parameters` (types default, linear, dynamic, llama3)."""

    head_dim: int
    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 2048
    mrope_section: tuple[int, ...] = ()  # M-RoPE (Qwen2-VL): frequencies per (temporal, height, width) stream

    @classmethod
    def from_hf(cls, params: dict, head_dim: int, max_position_embeddings: int) -> "RopeConfig":
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", "linear", "dynamic", "llama3"):
            raise UnsupportedArchitectureError(
                f"rope type {kind!r} has no port; supported: default, linear, dynamic, llama3"
            )
        return cls(
            head_dim=head_dim,
            theta=float(params.get("rope_theta", 10000.0)),
            kind=kind,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
            max_position_embeddings=max_position_embeddings,
            mrope_section=tuple(int(n) for n in params.get("mrope_section") or ()),
        )

    def inverse_frequencies(self) -> np.ndarray:
        """[E/2] float32 inverse frequencies before any position-dependent (dynamic) rescaling."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float32) / np.float32(self.head_dim)
        inv = (1.0 / np.power(np.float32(self.theta), exponents)).astype(np.float32)
        if self.kind == "linear":
            inv = inv / np.float32(self.factor)
        elif self.kind == "llama3":
            # Llama 3.1: divide long wavelengths by `factor`, keep short ones, interpolate in between.
            low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = np.where(medium, smoothed, scaled).astype(np.float32)
        return inv

    def cos_sin(self, positions: Array) -> tuple[Array, Array]:
        """positions [B, T] (or [3, B, T] streams with `mrope_section`) -> cos, sin [B, T, E] in float32."""
        inv = jnp.asarray(self.inverse_frequencies())
        if self.kind == "dynamic":
            # Dynamic NTK: the base grows with the longest position seen in the batch (HF's dynamic_rope_update).
            dim = self.head_dim
            seq_len = jnp.maximum(jnp.max(positions) + 1, self.max_position_embeddings).astype(jnp.float32)
            base = self.theta * (
                (self.factor * seq_len / self.max_position_embeddings) - (self.factor - 1)
            ) ** (dim / (dim - 2))
            inv = 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
        freqs = positions.astype(jnp.float32)[..., None] * inv
        if positions.ndim == 3:
            if sum(self.mrope_section) != self.head_dim // 2:
                raise InputError(f"positions of shape {positions.shape} need an mrope_section summing to "
                                 f"{self.head_dim // 2}; this rotary has {self.mrope_section}")
            # M-RoPE: frequency chunk j rotates by position stream j % 3 (HF's mrope_section split).
            bounds = np.cumsum((0, *self.mrope_section))
            freqs = jnp.concatenate(
                [freqs[j % 3, ..., lo:hi] for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))], axis=-1
            )
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, H, E], cos/sin [B, T, E]: rotate the two halves of each head (HF's `rotate_half` convention)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------------------- cache


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for S slots; slot s holds the token written at step s of the batch."""

    keys: tuple[Array, ...]  # per layer [B, S, K, E]
    values: tuple[Array, ...]  # per layer [B, S, K, E]
    valid: Array  # [B, S] bool: slots that hold a real (non-pad) token
    length: Array  # [] int32: slots written so far

    @classmethod
    def empty(cls, num_layers: int, batch: int, slots: int, kv_heads: int, head_dim: int, dtype: Dtype) -> "KVCache":
        zeros = lambda: jnp.zeros((batch, slots, kv_heads, head_dim), dtype)  # noqa: E731
        return cls(
            keys=tuple(zeros() for _ in range(num_layers)),
            values=tuple(zeros() for _ in range(num_layers)),
            valid=jnp.zeros((batch, slots), bool),
            length=jnp.zeros((), jnp.int32),
        )


@flax.struct.dataclass
class AttentionMask:
    """Which key slots each new token may attend to (causally), and where the new keys go in the cache."""

    allowed: Array  # [B, 1, T, S] bool
    offset: Array | int  # slot of the first new token
    valid_keys: Array | None = None  # [B, S] bool: non-pad key slots (what `allowed` was built from)
    window: int | None = flax.struct.field(pytree_node=False, default=None)  # sliding window, keys per query

    def covers_all_slots(self, num_new: int) -> bool:
        """True when the new tokens are all the slots (no cache: offset 0, T == S), so `allowed` is exactly the
        causal (windowed) mask over `valid_keys` that a fused kernel can rebuild."""
        return (self.valid_keys is not None and isinstance(self.offset, int) and self.offset == 0
                and self.valid_keys.shape[1] == num_new)


def causal_mask(
    valid_keys: Array, offset: Array | int, num_new: int, sliding_window: int | None = None
) -> AttentionMask:
    """Causal (optionally sliding-window) mask over slots; valid_keys [B, S] marks non-pad key slots."""
    slots = valid_keys.shape[1]
    q_slot = offset + jnp.arange(num_new)[:, None]
    kv_slot = jnp.arange(slots)[None, :]
    allowed = kv_slot <= q_slot
    if sliding_window is not None:
        allowed &= kv_slot > q_slot - sliding_window
    return AttentionMask(allowed=allowed[None, None] & valid_keys[:, None, None, :], offset=offset,
                         valid_keys=valid_keys, window=sliding_window)


# ----------------------------------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions, optional q/k RMSNorm and biases; site `out`."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm_eps: float | None = None  # Qwen3 normalises q and k per head when set
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Array,  # [B, T, D]
        cos_sin: tuple[Array, Array],
        mask: AttentionMask,
        kv: tuple[Array, Array] | None = None,  # cached keys, values [B, S, K, E]
    ) -> tuple[Array, tuple[Array, Array] | None]:
        b, t, d = x.shape
        dense = lambda n, bias, name: nn.Dense(  # noqa: E731
            n, use_bias=bias, dtype=self.dtype, param_dtype=self.dtype, name=name
        )
        q = dense(self.num_heads * self.head_dim, self.qkv_bias, "q_proj")(x).reshape(b, t, -1, self.head_dim)
        k = dense(self.num_kv_heads * self.head_dim, self.qkv_bias, "k_proj")(x).reshape(b, t, -1, self.head_dim)
        v = dense(self.num_kv_heads * self.head_dim, self.qkv_bias, "v_proj")(x).reshape(b, t, -1, self.head_dim)
        if self.qk_norm_eps is not None:
            q = RMSNorm(self.qk_norm_eps, self.dtype, name="q_norm")(q)
            k = RMSNorm(self.qk_norm_eps, self.dtype, name="k_norm")(k)
        q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
        if kv is not None:
            k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), mask.offset, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), mask.offset, axis=1)
        scale = self.head_dim**-0.5
        if mask.covers_all_slots(t) and fused_attention_chosen(q.dtype, self.head_dim):
            out = cudnn_attention(q, k, v, scale, causal=True, valid_keys=mask.valid_keys, window=mask.window)
        else:
            out = dot_product_attention(q, k, v, mask.allowed, scale)
        out = dense(d, self.out_bias, "o_proj")(out.reshape(b, t, -1))
        return Site(name="out")(out), ((k, v) if kv is not None else None)


# ----------------------------------------------------------------------------------------------------- kernels
#
# Two attention kernels: `dot_product_attention` (XLA: float32 scores and softmax, materialised; any mask; the
# reference the parity tests hold to Hugging Face) and `cudnn_attention` (cuDNN's fused flash kernel through
# `jax.nn.dot_product_attention`, bf16/fp16 on NVIDIA GPUs, for self-attention without a KV cache). Which one runs
# is a per-process choice, `set_attention_implementation`.

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
_ATTENTION = {"implementation": os.environ.get("PRECISE_JAX_ATTENTION", "auto")}


def set_attention_implementation(name: str) -> str:
    """Choose the attention kernel of every port in this process; returns the previous choice.

    - "auto" (the default, or `$PRECISE_JAX_ATTENTION`): `cudnn_attention` where it applies and can run (an NVIDIA
      GPU of compute capability 8.0 or newer, bfloat16/float16, head dimension a multiple of 8 up to 128), the XLA
      path everywhere else, so float32 and CPU/TPU runs are exactly what they were.
    - "xla": always `dot_product_attention`.
    - "cudnn": `cudnn_attention` wherever it applies; raises InputError where it cannot run.

    It applies to decoder self-attention without a KV cache (prefill, capture, training, scoring; any padding and
    sliding windows) and to the CLIP / SigLIP vision towers. Decoding with a KV cache always takes the XLA path
    (the new tokens' causal diagonal sits at a traced cache offset, and one query token gains nothing from a flash
    kernel), as do Qwen2-VL's block-diagonal vision attention and SigLIP's pooling probe. Changing the choice
    clears JAX's caches, so functions jitted before retrace with the new kernel.
    """
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise InputError(f"attention implementation {name!r} is unknown; choose one of {ATTENTION_IMPLEMENTATIONS}")
    previous = _ATTENTION["implementation"]
    if name != previous:
        _ATTENTION["implementation"] = name
        jax.clear_caches()
    return previous


def attention_implementation() -> str:
    """The current choice (see `set_attention_implementation`)."""
    name = _ATTENTION["implementation"]
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise InputError(f"PRECISE_JAX_ATTENTION={name!r} is not an attention implementation; "
                         f"set it to one of {ATTENTION_IMPLEMENTATIONS} or unset it")
    return name


@functools.cache
def _flash_capable_gpu() -> bool:
    """The default device is an NVIDIA GPU that cuDNN's flash attention supports (compute capability >= 8.0)."""
    device = jax.devices()[0]
    if device.platform != "gpu" or "cuda" not in str(getattr(device.client, "platform_version", "")).lower():
        return False
    return tuple(int(x) for x in str(getattr(device, "compute_capability", "0.0")).split(".")[:2]) >= (8, 0)


def fused_attention_chosen(dtype: Dtype, head_dim: int) -> bool:
    """Whether an attention that `cudnn_attention` can express runs through it (see `set_attention_implementation`);
    decided at trace time."""
    name = attention_implementation()
    if name == "xla":
        return False
    runnable = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
                and head_dim % 8 == 0 and head_dim <= 128 and _flash_capable_gpu())
    if name == "cudnn" and not runnable:
        raise InputError(
            f"attention implementation 'cudnn' cannot run here: it needs an NVIDIA GPU of compute capability 8.0 or "
            f"newer, bfloat16 or float16 weights and a head dimension that is a multiple of 8 up to 128 (got backend "
            f"{jax.default_backend()!r}, dtype {jnp.dtype(dtype).name}, head dim {head_dim}); use 'auto' or 'xla'"
        )
    return runnable


def cudnn_attention(
    q: Array, k: Array, v: Array, scale: float, *, causal: bool, valid_keys: Array | None = None,
    window: int | None = None, implementation: str = "cudnn",
) -> Array:
    """Self-attention of T tokens over themselves with cuDNN's fused flash kernel: q [B, T, H, E], k/v [B, T, K, E]
    (grouped heads) -> [B, T, H, E] in q's dtype.

    causal: each token sees itself and earlier tokens (with `window`: only the last `window` of them, itself
    included). valid_keys [B, T] bool masks padded keys in any pattern (left padding too, which the kernel's
    sequence lengths cannot express) through an additive mask of -2^41, so rows of padding stay finite; their
    outputs differ from the XLA path's (nothing reads them). Boolean masks get no bias gradient from jax >= 0.11.
    `implementation="xla"` runs jax's reference of the same arguments (how the tests check them without a GPU).
    """
    b, t = q.shape[:2]
    if t % 2:
        # cuDNN's kernel under differentiation takes only even lengths (a CLIP tower's 577 tokens fail): one more
        # key slot, masked (after every query, so causal attention would not see it anyway), and one more query
        # row, dropped.
        grow = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))  # noqa: E731
        valid = jnp.ones((b, t), bool) if valid_keys is None else valid_keys.astype(bool)
        return cudnn_attention(grow(q), grow(k), grow(v), scale, causal=causal,
                               valid_keys=jnp.pad(valid, ((0, 0), (0, 1))), window=window,
                               implementation=implementation)[:, :t]
    mask = None if valid_keys is None else jnp.broadcast_to(valid_keys[:, None, None, :].astype(bool), (b, 1, t, t))
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=causal,
        local_window_size=None if window is None else (window - 1, 0), implementation=implementation,
    )


def dot_product_attention(q: Array, k: Array, v: Array, allowed: Array, scale: float) -> Array:
    """The XLA path: q [B, T, H, E], k/v [B, S, K, E], allowed [B, 1, T, S] -> [B, T, H, E]; scores and softmax in
    float32.

    Two layouts of the same products. In float32, when the queries are at least a quarter of the key slots
    (prefill, capture, training, vision towers), grouped key/value heads are repeated to one per query head and all
    of q, k, v are transposed to [B, H, tokens, E] first, so both products are plain batched matrix products with
    the scores' key axis last; on CPU this runs the attention about twice as fast as the grouped einsum below,
    whose layouts XLA resolves with strided copies, and gives the same float32 results. Decoding (few queries over
    a long cache) keeps the grouped form, which avoids copying the cache H / K times; so do bf16/fp16, whose CPU
    products in the per-head layout round differently (SmolLM2's bf16 top-1 agreement with float32 drops from
    over 99 % to 98.8 %)."""
    b, t, h, e = q.shape
    groups = h // k.shape[2]
    if q.dtype == jnp.float32 and 4 * t >= k.shape[1]:
        if groups > 1:
            k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        scores = jnp.einsum("bhte,bhse->bhts", qh, kh, preferred_element_type=jnp.float32) * scale
        probs = _masked_softmax(scores, allowed, v.dtype)
        out = jnp.einsum("bhts,bhse->bhte", probs, vh, preferred_element_type=jnp.float32)
        return out.transpose(0, 2, 1, 3).astype(q.dtype)
    q = q.reshape(b, t, k.shape[2], groups, e)
    scores = jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    probs = _masked_softmax(scores, allowed[:, :, None], v.dtype)
    out = jnp.einsum("bkgts,bske->btkge", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, e).astype(q.dtype)


def _masked_softmax(scores: Array, allowed: Array, dtype: Dtype) -> Array:
    """Softmax over the last (key) axis of float32 scores where `allowed`, cast to `dtype`. A finite fill (not
    -inf) keeps fully masked rows (left padding) finite, as Hugging Face's eager path does."""
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


class GatedMLP(nn.Module):
    """SwiGLU-style MLP: down(act(gate(x)) * up(x)); sites `act` (the neurons, input of down_proj) and `out`."""

    intermediate_size: int
    hidden_act: str = "silu"
    bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n, use_bias=self.bias, dtype=self.dtype, param_dtype=self.dtype, name=name
        )
        gate = dense(self.intermediate_size, "gate_proj")(x)
        up = dense(self.intermediate_size, "up_proj")(x)
        act = Site(name="act")(activation(self.hidden_act)(gate) * up)
        return Site(name="out")(dense(x.shape[-1], "down_proj")(act))


class DenseMLP(nn.Module):
    """Two-layer MLP of vision towers: fc2(act(fc1(x))); sites `act` (the neurons, input of fc2) and `out`."""

    intermediate_size: int
    hidden_act: str = "gelu"
    bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n, use_bias=self.bias, dtype=self.dtype, param_dtype=self.dtype, name=name
        )
        act = Site(name="act")(activation(self.hidden_act)(dense(self.intermediate_size, "fc1")(x)))
        return Site(name="out")(dense(x.shape[-1], "fc2")(act))


# ----------------------------------------------------------------------------------------------------- decoder


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A pre-norm rotary decoder with gated MLP: Llama, Mistral, Qwen2 and Qwen3 differ only in these fields."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # per layer; empty means full attention everywhere

    def sliding_window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None


class DecoderLayer(nn.Module):
    config: DecoderConfig
    layer: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cos_sin: tuple[Array, Array], mask: AttentionMask,
                 kv: tuple[Array, Array] | None = None) -> tuple[Array, tuple[Array, Array] | None]:
        c = self.config
        attn_out, kv = Attention(
            c.num_heads, c.num_kv_heads, c.head_dim, c.qkv_bias, c.out_bias,
            c.rms_norm_eps if c.qk_norm else None, self.dtype, name="self_attn",
        )(RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x), cos_sin, mask, kv)
        x = x + attn_out
        mlp = GatedMLP(c.intermediate_size, c.hidden_act, c.mlp_bias, self.dtype, name="mlp")
        x = x + mlp(RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x))
        return Site(name="resid")(x), kv


@flax.struct.dataclass
class CausalLMOutput:
    logits: Array | None  # [B, T, V] float32 (or [B, logits_to_keep, V]); None when stopped early
    cache: KVCache | None = None


def default_positions(attention_mask: Array, cache: KVCache | None) -> Array:
    """Positions count real tokens only, so left padding does not shift them; pads get 0 (HF generate's rule)."""
    before = 0 if cache is None else jnp.sum(cache.valid, axis=1, keepdims=True)
    positions = before + jnp.cumsum(attention_mask, axis=1) - 1
    return jnp.where(attention_mask.astype(bool), positions, 0)


class Decoder(nn.Module):
    """Embeddings, decoder layers and final norm; `num_layers` may stop early (capture needs no more)."""

    config: DecoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: Array | None,  # [B, T] int
        attention_mask: Array,  # [B, T]
        position_ids: Array,  # [B, T], or [3, B, T] for multimodal rotary (RopeConfig.mrope_section)
        inputs_embeds: Array | None = None,  # [B, T, D], replaces input_ids (vision-language compositions)
        cache: KVCache | None = None,
        num_layers: int | None = None,
    ) -> tuple[Array, KVCache | None]:
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype, name="embed_tokens")
        x = embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        t = x.shape[1]
        new_valid = attention_mask.astype(bool)
        if cache is None:
            valid, offset = new_valid, 0
        else:
            offset = cache.length
            valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, new_valid, offset, axis=1)
        masks = {w: causal_mask(valid, offset, t, w) for w in set(c.sliding_windows or (None,))}
        cos_sin = c.rope.cos_sin(position_ids)
        new_kv = []
        for i in range(c.num_layers if num_layers is None else num_layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, kv = DecoderLayer(c, i, self.dtype, name=f"layers_{i}")(x, cos_sin, masks[c.sliding_window(i)], kv)
            new_kv.append(kv)
        if num_layers is not None and num_layers < c.num_layers:
            return x, None
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(x)
        if cache is not None:
            keys, values = zip(*new_kv)
            # replace() keeps the fields of caches that extend KVCache (a VLM's rope offsets, say).
            cache = cache.replace(keys=tuple(keys), values=tuple(values), valid=valid, length=cache.length + t)
        return x, cache


class CausalLM(nn.Module):
    """A decoder with its language-model head. Call with Hugging Face batch keys; returns `CausalLMOutput`."""

    config: DecoderConfig
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.lm = Decoder(self.config, self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Dense(
                self.config.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.dtype
            )

    def __call__(
        self,
        input_ids: Array | None = None,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
        *,
        inputs_embeds: Array | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        token_types: Array | None = None,  # carried by every batch; ports do not need it
        num_layers: int | None = None,  # run only the first layers and return no logits (capture needs no more)
    ) -> CausalLMOutput:
        del token_types
        shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        attention_mask = jnp.ones(shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
        if position_ids is None:
            position_ids = default_positions(attention_mask, cache)
        x, cache = self.lm(input_ids, attention_mask, position_ids, inputs_embeds, cache, num_layers)
        if num_layers is not None and num_layers < self.config.num_layers:
            return CausalLMOutput(logits=None, cache=None)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return CausalLMOutput(logits=self.head(x), cache=cache)

    @nn.nowrap
    def check_batch(self, batch: Mapping[str, Any]) -> None:
        """Raise InputError for a batch this model cannot run; a text decoder accepts any (VLMs check images)."""

    @nn.nowrap
    def init_cache(self, batch: int, slots: int) -> KVCache:
        """An empty KV cache for `batch` rows and `slots` tokens (prompt + generated)."""
        c = self.config
        return KVCache.empty(c.num_layers, batch, slots, c.num_kv_heads, c.head_dim, self.dtype)

    def head(self, x: Array) -> Array:
        """[B, T, D] final hidden states -> [B, T, V] float32 logits."""
        if self.config.tie_word_embeddings:
            table = self.lm.variables["params"]["embed_tokens"]["embedding"]
            return jnp.einsum("btd,vd->btv", x, table.astype(x.dtype), preferred_element_type=jnp.float32)
        return self.lm_head(x).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------- encoders


class EncoderAttention(nn.Module):
    """Bidirectional multi-head self-attention of ViT towers (CLIP, SigLIP): biased q/k/v/out_proj; site `out`."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [B, T, D] -> [B, T, D]
        b, t, d = x.shape
        head_dim = d // self.num_heads
        dense = lambda name: nn.Dense(d, dtype=self.dtype, param_dtype=self.dtype, name=name)  # noqa: E731
        q, k, v = (dense(name)(x).reshape(b, t, self.num_heads, head_dim) for name in ("q_proj", "k_proj", "v_proj"))
        # No padding inside an image: every token sees every token.
        if fused_attention_chosen(q.dtype, head_dim):
            out = cudnn_attention(q, k, v, head_dim**-0.5, causal=False)
        else:
            out = dot_product_attention(q, k, v, jnp.ones((1, 1, 1, 1), bool), head_dim**-0.5)
        return Site(name="out")(dense("out_proj")(out.reshape(b, t, d)))


class EncoderLayer(nn.Module):
    """Pre-norm ViT layer (CLIP, SigLIP): x + attn(layer_norm1(x)), then + mlp(layer_norm2(x)); site `resid`."""

    num_heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [B, T, D]
        norm = lambda name: LayerNorm(self.eps, self.dtype, name=name)  # noqa: E731
        x = x + EncoderAttention(self.num_heads, self.dtype, name="self_attn")(norm("layer_norm1")(x))
        x = x + DenseMLP(self.intermediate_size, self.hidden_act, True, self.dtype, name="mlp")(norm("layer_norm2")(x))
        return Site(name="resid")(x)
