"""Streaming statistics of activation vectors, accumulated on device in float32 at highest matmul precision.

Each batch contributes samples x [N, W] with 0/1 weights; batches merge by Chan et al.'s parallel update, so the
result does not depend on batch order or size, and nothing per-token is kept. Saved as safetensors with metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from ports.errors import InputError, PreciseJaxError

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST


@flax.struct.dataclass
class Moments:
    """Running statistics of W-wide samples: count, mean, squared deviations, positives, max, co-moment."""

    count: Array  # [] int32: samples seen
    mean: Array  # [W]
    m2: Array  # [W]: sum of squared deviations from the mean
    positive: Array  # [W] int32: samples with a positive value
    maximum: Array  # [W]
    comoment: Array | None = None  # [W, W]: sum of outer products of deviations, when asked for

    @classmethod
    def zeros(cls, width: int, covariance: bool = False) -> "Moments":
        return cls(
            count=jnp.zeros((), jnp.int32),
            mean=jnp.zeros((width,), jnp.float32),
            m2=jnp.zeros((width,), jnp.float32),
            positive=jnp.zeros((width,), jnp.int32),
            maximum=jnp.full((width,), -jnp.inf, jnp.float32),
            comoment=jnp.zeros((width, width), jnp.float32) if covariance else None,
        )

    def update(self, x: Array, weight: Array) -> "Moments":
        """Add the samples x [N, W] whose weight [N] is 1 (rows with weight 0 are ignored)."""
        return self.merge(batch_moments(x, weight, self.comoment is not None))

    def merge(self, other: "Moments") -> "Moments":
        n_a, n_b = self.count.astype(jnp.float32), other.count.astype(jnp.float32)
        n = jnp.maximum(n_a + n_b, 1.0)
        delta = other.mean - self.mean
        comoment = None
        if self.comoment is not None:
            comoment = self.comoment + other.comoment + jnp.outer(delta, delta) * (n_a * n_b / n)
        return Moments(
            count=self.count + other.count,
            mean=self.mean + delta * (n_b / n),
            m2=self.m2 + other.m2 + delta * delta * (n_a * n_b / n),
            positive=self.positive + other.positive,
            maximum=jnp.maximum(self.maximum, other.maximum),
            comoment=comoment,
        )

    # ------------------------------------------------------------------------------------------ derived

    def variance(self, ddof: int = 1) -> Array:
        return self.m2 / self._dof(ddof)

    def covariance(self, ddof: int = 1) -> Array:
        if self.comoment is None:
            raise InputError("these statistics were collected without covariance; pass covariance=[site] to collect")
        return self.comoment / self._dof(ddof)

    def frequency(self) -> Array:
        """Fraction of samples in which each unit was positive (activation frequency)."""
        return self.positive / jnp.maximum(self.count, 1)

    def _dof(self, ddof: int) -> Array:
        if int(self.count) <= ddof:
            raise InputError(f"statistics of {int(self.count)} samples have no variance with ddof={ddof}; "
                             "collect more examples")
        return (self.count - ddof).astype(jnp.float32)


def batch_moments(x: Array, weight: Array, covariance: bool) -> Moments:
    """The moments of one batch of samples x [N, W] with 0/1 weights [N]."""
    x = x.astype(jnp.float32)
    w = weight.astype(jnp.float32)[:, None]
    n = jnp.sum(w)
    mean = jnp.sum(w * x, axis=0) / jnp.maximum(n, 1.0)
    dev = (x - mean) * w
    return Moments(
        count=n.astype(jnp.int32),
        mean=mean,
        m2=jnp.sum(dev * dev, axis=0),
        positive=jnp.sum((x > 0) & (w > 0), axis=0, dtype=jnp.int32),
        maximum=jnp.max(jnp.where(w > 0, x, -jnp.inf), axis=0),
        comoment=jnp.matmul(dev.T, dev, precision=HIGHEST) if covariance else None,
    )


# ----------------------------------------------------------------------------------------------------- storage

_FIELDS = ("count", "mean", "m2", "positive", "maximum", "comoment")


def save_stats(path: str | Path, stats: Mapping[str, Moments], metadata: Mapping[str, object]) -> Path:
    """Write {site: Moments} and JSON-able metadata (model, pooling, data fingerprint...) to one safetensors file."""
    path = Path(path)
    tensors = {
        f"{site}/{field}": np.asarray(getattr(m, field))
        for site, m in stats.items() for field in _FIELDS if getattr(m, field) is not None
    }
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp), metadata={"precise_jax": json.dumps(dict(metadata), sort_keys=True)})
    tmp.replace(path)
    return path


def load_stats(path: str | Path) -> tuple[dict[str, Moments], dict]:
    """Read what save_stats wrote: ({site: Moments}, metadata)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = json.loads((f.metadata() or {})["precise_jax"])
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any failure to read means the same thing to the user
        raise PreciseJaxError(f"{path} is not a precise-jax statistics file ({e})") from e
    sites: dict[str, dict] = {}
    for key, value in tensors.items():
        site, field = key.rsplit("/", 1)
        sites.setdefault(site, {})[field] = jnp.asarray(value)
    return {site: Moments(**{"comoment": None, **fields}) for site, fields in sites.items()}, metadata


def merge_stats(
    a: tuple[Mapping[str, Moments], Mapping], b: tuple[Mapping[str, Moments], Mapping]
) -> tuple[dict[str, Moments], dict]:
    """Merge two (stats, metadata) pairs of the same model, sites and pooling (e.g. two shards of a data set)."""
    (stats_a, meta_a), (stats_b, meta_b) = a, b
    for key in ("model", "sites", "positions", "pool", "dtype"):
        if meta_a.get(key) != meta_b.get(key):
            raise InputError(f"cannot merge statistics with different {key}: {meta_a.get(key)!r} vs "
                             f"{meta_b.get(key)!r}; collect them with the same settings")
    merged = {site: stats_a[site].merge(stats_b[site]) for site in stats_a}
    fingerprints = sorted({*_as_list(meta_a.get("data")), *_as_list(meta_b.get("data"))})
    return merged, {**meta_a, "data": fingerprints}


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
