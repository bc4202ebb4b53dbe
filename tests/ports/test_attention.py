"""Attention kernels: the fused path's arguments mean what the XLA path's masks mean, and the choice is guarded.

cuDNN itself needs an NVIDIA GPU (`benchmarks/attention_check.py` compares it with the XLA path there); here jax's own
XLA reference of `jax.nn.dot_product_attention` takes the very arguments `cudnn_attention` gives the kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ports.errors import InputError
from ports.layers import (
    ATTENTION_IMPLEMENTATIONS, Attention, attention_implementation, causal_mask, cudnn_attention, dot_product_attention,
    set_attention_implementation,
)


def qkv(seed, batch=3, tokens=12, heads=4, kv_heads=2, head_dim=16):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, tokens, heads, head_dim), np.float32)
    k, v = (rng.standard_normal((batch, tokens, kv_heads, head_dim), np.float32) for _ in range(2))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


@pytest.mark.parametrize("window, tokens", [(None, 12), (4, 12), (None, 11)])  # 11: odd, grown by one slot
def test_fused_arguments_match_the_causal_mask_with_left_padding(window, tokens):
    q, k, v = qkv(0, tokens=tokens)
    valid = np.ones((3, tokens), bool)
    valid[1, :5] = False  # left padding
    valid[2, :-1] = False  # one real token
    scale = 16**-0.5
    mask = causal_mask(jnp.asarray(valid), 0, tokens, window)
    assert mask.covers_all_slots(tokens) and not mask.covers_all_slots(tokens - 1)
    expected = dot_product_attention(q, k, v, mask.allowed, scale)
    got = cudnn_attention(q, k, v, scale, causal=True, valid_keys=mask.valid_keys, window=window,
                          implementation="xla")
    assert got.shape == q.shape
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(expected)[valid], rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(got)).all()  # rows of padding too


def test_fused_arguments_match_full_attention():
    q, k, v = qkv(1, heads=2, kv_heads=2)
    expected = dot_product_attention(q, k, v, jnp.ones((1, 1, 1, 1), bool), 0.3)
    got = cudnn_attention(q, k, v, 0.3, causal=False, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_a_cache_offset_keeps_the_xla_path():
    valid = jnp.ones((2, 8), bool)
    assert not causal_mask(valid, jnp.int32(0), 8).covers_all_slots(8)  # a traced offset (KV cache)
    assert not causal_mask(valid, 3, 5).covers_all_slots(5)


def test_choice_is_checked_and_restored():
    assert attention_implementation() in ATTENTION_IMPLEMENTATIONS
    with pytest.raises(InputError, match="flash"):
        set_attention_implementation("flash")
    attention = Attention(num_heads=4, num_kv_heads=2, head_dim=16, dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((3, 12, 32)), jnp.bfloat16)
    cos_sin = (jnp.ones((3, 12, 16)), jnp.zeros((3, 12, 16)))
    mask = causal_mask(jnp.ones((3, 12), bool), 0, 12)
    previous = set_attention_implementation("cudnn")
    try:
        assert attention_implementation() == "cudnn"
        with pytest.raises(InputError, match="cannot run here"):
            attention.init(jax.random.key(0), x, cos_sin, mask)
    finally:
        set_attention_implementation(previous)
    assert attention_implementation() == previous
    attention.init(jax.random.key(0), x, cos_sin, mask)  # "auto" or "xla": the XLA path here
