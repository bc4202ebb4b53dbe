"""Streaming statistics against float64 numpy on the stacked samples, for any batch order and size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ports import InputError, PreciseJaxError
from precise_jax.stats import Moments, load_stats, merge_stats, save_stats

TOL = 1e-5
update = jax.jit(Moments.update)


def rel(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


def samples(seed, n=300, width=24):
    """Correlated samples far from zero mean, so a naive sum-of-squares formula would lose digits."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(width, width))
    return (rng.normal(size=(n, width)) @ mixing + rng.normal(5.0, 2.0, size=width)).astype(np.float32)


def stream(x, sizes, order, pad_rows=0):
    moments = Moments.zeros(x.shape[1], covariance=True)
    x = x[order]
    start = 0
    rng = np.random.default_rng(len(sizes))
    for size in sizes:
        chunk = x[start:start + size]
        start += size
        # padding rows with weight 0 (the partial last batch of a data set) must not count
        junk = rng.normal(size=(pad_rows, x.shape[1])).astype(np.float32) * 100
        batch = np.concatenate([chunk, junk])
        weight = np.concatenate([np.ones(len(chunk)), np.zeros(pad_rows)])
        moments = update(moments, jnp.asarray(batch), jnp.asarray(weight))
    assert start == len(x)
    return moments


@pytest.mark.parametrize("seed", range(4))
def test_streaming_equals_float64_reference(seed):
    x = samples(seed)
    rng = np.random.default_rng(100 + seed)
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=rng.integers(1, 12), replace=False))
    sizes = np.diff(np.concatenate([[0], cuts, [len(x)]]))
    m = stream(x, sizes, rng.permutation(len(x)), pad_rows=int(rng.integers(0, 3)))
    ref = x.astype(np.float64)
    assert int(m.count) == len(x)
    assert rel(m.mean, ref.mean(0)) <= TOL
    assert rel(m.variance(), ref.var(0, ddof=1)) <= TOL
    assert rel(m.covariance(), np.cov(ref.T)) <= TOL
    np.testing.assert_array_equal(m.maximum, x.max(0))
    np.testing.assert_array_equal(m.positive, (x > 0).sum(0))
    assert rel(m.frequency(), (x > 0).mean(0)) <= TOL


def test_batch_size_one_and_single_batch_agree():
    x = samples(7, n=50)
    a = stream(x, [1] * 50, np.arange(50))
    b = stream(x, [50], np.arange(50))
    assert rel(a.covariance(), b.covariance()) <= TOL and rel(a.mean, b.mean) <= TOL


def test_save_load_merge(tmp_path):
    x = samples(3)
    first, second = stream(x[:120], [60, 60], np.arange(120)), stream(x[120:], [90, 90], np.arange(180))
    meta = {"model": "m", "sites": ["s"], "positions": "prompt", "pool": "mean", "dtype": "float32"}
    save_stats(tmp_path / "a.safetensors", {"s": first}, {**meta, "data": "aaa"})
    save_stats(tmp_path / "b.safetensors", {"s": second}, {**meta, "data": "bbb"})
    merged, merged_meta = merge_stats(load_stats(tmp_path / "a.safetensors"), load_stats(tmp_path / "b.safetensors"))
    whole = stream(x, [300], np.arange(300))
    assert rel(merged["s"].covariance(), whole.covariance()) <= TOL
    assert merged_meta["data"] == ["aaa", "bbb"]
    with pytest.raises(InputError, match="different pool"):
        merge_stats(({"s": first}, meta), ({"s": second}, {**meta, "pool": "last"}))
    with pytest.raises(InputError, match="different model"):
        merge_stats(({"s": first}, meta), ({"s": second}, {**meta, "model": "other"}))


def test_errors(tmp_path):
    one = Moments.zeros(3).update(jnp.ones((1, 3)), jnp.ones(1))
    with pytest.raises(InputError, match="1 samples have no variance"):
        one.variance()
    with pytest.raises(InputError, match="without covariance"):
        one.covariance()
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(PreciseJaxError, match="not a precise-jax statistics file"):
        load_stats(tmp_path / "junk.safetensors")
