"""CARE's safety subspaces: generalized eigen-decomposition of malicious vs benign activation covariances.

Σ_mal u = λ Σ_ben u is solved by Cholesky whitening (jax has no eigh(a, b)) at highest matmul precision, in float32,
or in float64 inside `jax.enable_x64(True)` with float64 inputs. Two modes build a `Subspace` (basis U [d, k],
centre μ [d]) for the projection h' = h − α U Uᵀ (h − μ) of `precise_jax.interventions.projection`:

- 'orthonormal': QR of the top-k generalized eigenvectors, so U Uᵀ is an orthogonal projector (ridge / shrinkage
  regularise a singular Σ_ben);
- 'faithful': the official code (FredJDean/CARE `_build_generalized_subspace`): covariances divided by N,
  W = (Σ_ben + 1e-6 I)^-1/2, top-k eigenvectors V of W Σ_mal W, U = W V with each column scaled to unit norm (the
  columns are not mutually orthogonal), centre μ_ben.

Per-example vectors come from CARE's kernel token selection (`care_weights`, `collect_care`) or plain mean pooling.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular
from jax.typing import ArrayLike, DTypeLike
from safetensors.numpy import load_file, save_file

from ports.errors import InputError, PreciseJaxError
from ports.processing import TokenType
from precise_jax.capture import Collected, collect
from precise_jax.stats import Moments

if TYPE_CHECKING:
    from ports.pretrained import Pretrained

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST
MODES = ("orthonormal", "faithful")
FAITHFUL_EPS = 1e-6  # the official code's ridge on Σ_ben
SELECTIONS = ("kernel", "mean")
MODALITIES = ("visual", "text")


# ----------------------------------------------------------------------------------------------------- linear algebra


def _float(x) -> Array:
    """float64 when x is float64 and x64 is on (e.g. inside `jax.enable_x64(True)`), else float32."""
    x = jnp.asarray(x)
    return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


@jax.jit
def _whitened_eigh(a: Array, b: Array, ridge: Array, shrinkage: Array):
    """All solutions of a v = λ b' v, b' = (1−γ) b + (γ tr(b)/d + ridge) I; λ descending, v b'-orthonormal."""
    with jax.default_matmul_precision("highest"):
        d = b.shape[0]
        b = (1 - shrinkage) * b + (shrinkage * jnp.trace(b) / d + ridge) * jnp.eye(d, dtype=b.dtype)
        chol = jnp.linalg.cholesky(b)  # NaN when b' is not positive definite
        c = solve_triangular(chol, a, lower=True)  # L⁻¹ A
        c = solve_triangular(chol, c.T, lower=True)  # L⁻¹ A L⁻ᵀ (A symmetric)
        w, u = jnp.linalg.eigh((c + c.T) / 2)
        v = solve_triangular(chol, u, lower=True, trans="T")  # L⁻ᵀ U
        return w[::-1], v[:, ::-1], jnp.all(jnp.isfinite(chol))


@jax.jit
def _faithful_eigh(cov_b: Array, cov_m: Array, eps: Array):
    """The official route: W = (Σ_b + eps I)^-1/2, eigh(W Σ_m W), U = W V with unit columns; λ descending."""
    with jax.default_matmul_precision("highest"):
        d = cov_b.shape[0]
        # For a symmetric positive definite matrix inv(sqrtm(S)) = Q diag(s^-1/2) Qᵀ, what scipy's sqrtm + inv give.
        s, q = jnp.linalg.eigh(cov_b + eps * jnp.eye(d, dtype=cov_b.dtype))
        white = (q * jax.lax.rsqrt(jnp.maximum(s, jnp.finfo(s.dtype).tiny))) @ q.T
        a = white @ cov_m @ white
        lam, v = jnp.linalg.eigh((a + a.T) / 2)
        u = white @ v[:, ::-1]
        u = u / (jnp.linalg.norm(u, axis=0) + 1e-8)
        return lam[::-1], u, s


def shrink(b: ArrayLike, gamma: float) -> Array:
    """Ledoit-Wolf-style shrinkage toward the scaled identity: (1−γ) b + γ (tr b / d) I."""
    b = _float(b)
    return (1 - gamma) * b + gamma * jnp.trace(b) / b.shape[0] * jnp.eye(b.shape[0], dtype=b.dtype)


def generalized_eigh(a: ArrayLike, b: ArrayLike, *, k: int | None = None, ridge: float = 0.0, shrinkage: float = 0.0
                     ) -> tuple[Array, Array]:
    """Top-k (default all) solutions of a v = λ b' v, λ descending: (λ [k], v [d, k]) with vᵀ b' v = I.

    b' = (1 − shrinkage) b + (shrinkage · tr(b)/d + ridge) I; a and b must be symmetric, b' positive definite."""
    a, b = _check_pair(a, b, "generalized_eigh")
    _check_regularisers(ridge, shrinkage, "generalized_eigh")
    k = _check_k(k, a.shape[0], "generalized_eigh")
    w, v, ok = _whitened_eigh(a, b, jnp.asarray(ridge, b.dtype), jnp.asarray(shrinkage, b.dtype))
    if not bool(ok):
        raise InputError(_not_pd_message(ridge, shrinkage, "generalized_eigh"))
    return w[:k], v[:, :k]


def faithful_eigh(cov_benign: ArrayLike, cov_malicious: ArrayLike, *, k: int, eps: float = FAITHFUL_EPS,
                  ) -> tuple[Array, Array]:
    """The official CARE basis from two covariances: (λ [k], U [d, k]) with unit-norm, non-orthogonal columns."""
    b, a = _check_pair(cov_benign, cov_malicious, "faithful_eigh", names=("benign", "malicious"))
    d = a.shape[0]
    k = _check_k(k, d, "faithful_eigh")
    lam, u, s = _faithful_eigh(b, a, jnp.asarray(eps, b.dtype))
    s = np.asarray(s, np.float64)
    # The whitening divides by sqrt(s): below the dtype's resolution the basis is rounding noise, not the official one.
    floor = float(np.max(np.abs(s))) * d * float(jnp.finfo(b.dtype).eps)
    if s[0] <= floor:
        raise InputError(
            f"faithful_eigh: Σ_benign + {eps:g}·I is singular in {b.dtype} (smallest eigenvalue {s[0]:.3g}, "
            f"resolution {floor:.3g}); the official code runs in float64 numpy: pass float64 covariances inside "
            "`with jax.enable_x64(True):`, or use mode='orthonormal' with shrinkage (e.g. 0.1)"
        )
    return lam[:k], u[:, :k]


@jax.jit
def _finite_scale_asymmetry(a: Array, b: Array) -> Array:
    """[2, 3]: per matrix, all entries finite (1/0), max |m| and max |m − mᵀ|."""
    return jnp.stack([jnp.stack([jnp.all(jnp.isfinite(m)).astype(m.dtype), jnp.max(jnp.abs(m)),
                                 jnp.max(jnp.abs(m - m.T))]) for m in (a, b)])


def _check_pair(a, b, where: str, names=("a", "b")) -> tuple[Array, Array]:
    """Both matrices as one float dtype on device, after host-side checks of shape, finiteness and symmetry."""
    a, b = _float(a), _float(b)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or b.shape != a.shape:
        raise InputError(f"{where}: {names[0]} {a.shape} and {names[1]} {b.shape} must be square matrices of the "
                         "same size [d, d]")
    # On the device, read back as six numbers: copying both matrices to the host took 5x the solve on a GPU.
    checks = np.asarray(_finite_scale_asymmetry(a, b), np.float64)
    for name, (finite, scale, asymmetry) in zip(names, checks):
        if not finite:
            raise InputError(f"{where}: the {name} matrix has NaN or Inf entries; check the activations and "
                             "statistics it came from (a diverged forward, or an overflow in float16)")
        if asymmetry > 1e-5 * max(scale, np.finfo(np.float32).tiny):
            raise InputError(f"{where}: the {name} matrix is not symmetric; pass a covariance matrix "
                             "(e.g. Moments.covariance()), not raw activations")
    dtype = jnp.promote_types(a.dtype, b.dtype)
    return a.astype(dtype), b.astype(dtype)


def _check_regularisers(ridge: float, shrinkage: float, where: str) -> None:
    if not ridge >= 0:
        raise InputError(f"{where}: ridge must be >= 0, got {ridge}")
    if not 0 <= shrinkage <= 1:
        raise InputError(f"{where}: shrinkage must be in [0, 1], got {shrinkage}")


def _check_k(k: int | None, d: int, where: str) -> int:
    if k is None:
        return d
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= d:
        raise InputError(f"{where}: k must be an integer in [1, d={d}], got {k!r}")
    return int(k)


def _not_pd_message(ridge: float, shrinkage: float, where: str) -> str:
    if ridge == 0 and shrinkage == 0:
        return (f"{where}: the benign covariance is not positive definite (singular: fewer examples than "
                "dimensions, or not PSD); regularise it with shrinkage=0.1 (toward the scaled identity) or ridge=")
    return (f"{where}: the benign covariance is not positive definite even with ridge={ridge}, shrinkage="
            f"{shrinkage}; it is not a covariance (negative eigenvalues): check it, or raise the regularisation")


# ----------------------------------------------------------------------------------------------------- subspaces


@dataclasses.dataclass(frozen=True)
class Subspace:
    """A safety subspace of one site: basis U [d, k], centre μ [d], eigenvalues [k] (descending), provenance."""

    basis: np.ndarray  # [d, k] float32
    center: np.ndarray  # [d] float32
    eigenvalues: np.ndarray  # [k]
    site: str = ""  # where the activations were captured, e.g. lm.layers.12.resid
    modality: str = ""  # 'visual', 'text', or free
    mode: str = "orthonormal"
    provenance: dict = dataclasses.field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.basis.shape[0]

    @property
    def k(self) -> int:
        return self.basis.shape[1]

    @property
    def name(self) -> str:
        return f"{self.modality or 'subspace'}/{self.site}"


def build_subspace(
    benign: Moments | np.ndarray,
    malicious: Moments | np.ndarray,
    k: int,
    *,
    mode: str = "orthonormal",
    ridge: float | None = None,
    shrinkage: float = 0.0,
    center: ArrayLike | None = None,
    counts: tuple[int, int] | None = None,
    dtype: DTypeLike = jnp.float32,
    site: str = "",
    modality: str = "",
    provenance: Mapping | None = None,
) -> Subspace:
    """The top-k subspace of Σ_mal u = λ Σ_ben u from two `Moments` (with covariance) or two covariances [d, d].

    Raw covariances need `center` (μ_ben) and may give `counts` (N_ben, N_mal). ridge defaults to 0 ('orthonormal')
    or 1e-6 ('faithful', the official eps); 'faithful' divides by N, 'orthonormal' by N − 1. dtype=float64 (as the
    official numpy code) needs `with jax.enable_x64(True):`."""
    if mode not in MODES:
        raise InputError(f"build_subspace: unknown mode {mode!r}; choose one of {MODES}")
    faithful = mode == "faithful"
    if faithful and shrinkage:
        raise InputError("build_subspace: mode='faithful' reproduces the official eps ridge and takes no shrinkage; "
                         "use mode='orthonormal' to shrink")
    ridge = (FAITHFUL_EPS if faithful else 0.0) if ridge is None else ridge
    _check_regularisers(ridge, shrinkage, "build_subspace")
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise InputError("build_subspace: dtype=float64 needs 64-bit jax; call it inside `with jax.enable_x64(True):`")
    ddof = 0 if faithful else 1
    cov_b, mean_b, n_b = _covariance(benign, ddof, "benign", dtype)
    cov_m, _, n_m = _covariance(malicious, ddof, "malicious", dtype)
    if counts is not None:
        n_b, n_m = counts
    if center is not None:
        mean_b = center
    elif mean_b is None:
        raise InputError("build_subspace: raw covariance matrices carry no mean; pass center= (the benign mean "
                         "μ_ben [d]), or pass the benign Moments")
    mean_b = np.asarray(mean_b, np.float32)
    d = cov_b.shape[0]
    if mean_b.shape != (d,):
        raise InputError(f"build_subspace: the centre has shape {mean_b.shape}, the covariances are [{d}, {d}]")
    for name, n in (("benign", n_b), ("malicious", n_m)):
        if n is not None and n < 2:
            raise InputError(f"build_subspace: the {name} statistics hold {n} example(s); a covariance needs >= 2")
    k = _check_k(k, d, "build_subspace")
    if n_m is not None and k > n_m - 1:
        raise InputError(f"build_subspace: k={k} exceeds the rank of the malicious covariance (at most N−1 = "
                         f"{n_m - 1} from {n_m} examples): the extra directions would be arbitrary; choose k <= "
                         f"{n_m - 1} or collect more malicious examples")
    if not faithful and n_b is not None and n_b - 1 < d and ridge == 0 and shrinkage == 0:
        raise InputError(f"build_subspace: the benign covariance of {n_b} examples is singular in d={d} dimensions; "
                         "pass shrinkage=0.1 (toward the scaled identity) or a ridge")

    if faithful:
        lam, basis = faithful_eigh(cov_b, cov_m, k=k, eps=ridge)
    else:
        lam, vecs = generalized_eigh(cov_m, cov_b, k=k, ridge=ridge, shrinkage=shrinkage)
        basis, _ = np.linalg.qr(np.asarray(vecs, np.float64))  # an orthonormal basis of the same span ([d, k]: cheap)
    lam = np.asarray(lam, np.float64)
    if n_m is None:
        # Without counts, the numerical rank of the malicious side decides which directions carry signal.
        rank = int(np.sum(lam > lam[0] * d * float(jnp.finfo(cov_b.dtype).eps))) if lam[0] > 0 else 0
        if k > rank:
            raise InputError(f"build_subspace: k={k} exceeds the numerical rank ({rank}) of the malicious "
                             f"covariance relative to the benign one; choose k <= {rank}")
    record = {"k": k, "mode": mode, "ridge": ridge, "shrinkage": shrinkage, "ddof": ddof,
              "benign_examples": n_b, "malicious_examples": n_m, "dtype": np.dtype(cov_b.dtype).name,
              **dict(provenance or {})}
    return Subspace(basis=np.asarray(basis, np.float32), center=mean_b, eigenvalues=lam.astype(np.float32),
                    site=site, modality=modality, mode=mode, provenance=record)


def _covariance(stats, ddof: int, name: str, dtype):
    """(covariance [d, d] in dtype, mean [d] or None, count or None) of Moments or of a raw covariance matrix."""
    if isinstance(stats, Moments):
        if stats.comoment is None:
            raise InputError(f"build_subspace: the {name} statistics have no covariance; collect them with "
                             "covariance=[site] (or with collect_care)")
        n = int(stats.count)
        if n < 2:
            raise InputError(f"build_subspace: the {name} statistics hold {n} example(s); a covariance needs >= 2")
        return jnp.asarray(np.asarray(stats.comoment, dtype) / (n - ddof)), np.asarray(stats.mean), n
    return jnp.asarray(np.asarray(stats, dtype)), None, None


def save_subspaces(path: str | Path, subspaces: Mapping[str, Subspace] | Iterable[Subspace],
                   metadata: Mapping | None = None) -> Path:
    """Write subspaces (keyed by name, default `modality/site`) and their provenance to one safetensors file."""
    items = dict(subspaces) if isinstance(subspaces, Mapping) else {s.name: s for s in subspaces}
    if not items:
        raise InputError("save_subspaces: nothing to save")
    tensors, info = {}, {}
    for name, s in items.items():
        tensors[f"{name}/basis"] = np.ascontiguousarray(s.basis, np.float32)
        tensors[f"{name}/center"] = np.ascontiguousarray(s.center, np.float32)
        tensors[f"{name}/eigenvalues"] = np.ascontiguousarray(s.eigenvalues, np.float32)
        info[name] = {"site": s.site, "modality": s.modality, "mode": s.mode, "provenance": s.provenance}
    try:
        header = {"precise_jax.subspaces": json.dumps(info, sort_keys=True),
                  "precise_jax": json.dumps(dict(metadata or {}), sort_keys=True)}
    except TypeError as e:
        raise InputError(f"save_subspaces: provenance and metadata must be JSON-serialisable ({e})") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def load_subspaces(path: str | Path) -> tuple[dict[str, Subspace], dict]:
    """Read what save_subspaces wrote: ({name: Subspace}, metadata)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
            info = json.loads(header["precise_jax.subspaces"])
            metadata = json.loads(header.get("precise_jax", "{}"))
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any failure to read means the same thing to the user
        raise PreciseJaxError(f"{path} is not a precise-jax subspace file ({e})") from e
    return {name: Subspace(basis=tensors[f"{name}/basis"], center=tensors[f"{name}/center"],
                           eigenvalues=tensors[f"{name}/eigenvalues"], **fields)
            for name, fields in info.items()}, metadata


# ----------------------------------------------------------------------------------------------------- token selection


def modality_masks(batch: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """CARE's token groups [B, T] bool: visual = image tokens; text = real tokens after the last image token
    (all real tokens of a row without an image)."""
    visual, text = _groups(jnp.asarray(_real_tokens(batch)), jnp.asarray(batch["token_types"]))
    return np.asarray(visual), np.asarray(text)


def _real_tokens(batch: Mapping) -> np.ndarray:
    """[B, T] bool: the non-pad tokens (by token type and attention mask)."""
    if "token_types" not in batch:
        raise InputError("CARE token selection needs the batch's token_types; build batches with precise_jax.data")
    real = np.asarray(batch["token_types"]) != TokenType.PAD
    if batch.get("attention_mask") is not None:
        real &= np.asarray(batch["attention_mask"]).astype(bool)
    return real


def _groups(real: Array, types: Array) -> tuple[Array, Array]:
    """(visual, text) [B, T] bool of the real tokens (see modality_masks); traceable."""
    # The official scripts slice [<|vision_start|>, <|vision_end|>), one marker token more than the image tokens.
    visual = real & (types == TokenType.IMAGE)
    t = types.shape[1]
    last = jnp.where(visual.any(1), t - 1 - jnp.argmax(visual[:, ::-1], axis=1), -1)  # [B]
    text = real & (jnp.arange(t)[None, :] > last[:, None])
    return visual, text


def _sq_distances(x: Array, y: Array) -> Array:
    """x [B, T, D], y [B, S, D] -> squared distances [B, T, S] (float32, highest precision)."""
    xx = jnp.sum(x * x, axis=-1)[:, :, None]
    yy = jnp.sum(y * y, axis=-1)[:, None, :]
    return jnp.maximum(xx + yy - 2 * jnp.einsum("btd,bsd->bts", x, y, precision=HIGHEST), 0.0)


def _rbf(d2: Array, pairs: Array, max_sq: float) -> tuple[Array, Array]:
    """The official RBF kernel: d² clipped to [0, max_sq], σ² = 0.5 median(nonzero d²) + 1e-8,
    K = exp(−d² / (2σ² + 1e-8)); returns (K, clipped d²)."""
    # The official clip (1e6) saturates the distances of large activations; max_sq_dist=inf turns it off.
    d2 = jnp.minimum(d2, max_sq)
    nonzero = pairs & (d2 > 0)
    median = jnp.nanmedian(jnp.where(nonzero, d2, jnp.nan).reshape(d2.shape[0], -1), axis=1)  # [B]
    sigma2 = jnp.where(jnp.any(nonzero, axis=(1, 2)), 0.5 * median + 1e-8, 1.0)  # no distances: σ = 1
    return jnp.exp(-d2 / (2 * sigma2[:, None, None] + 1e-8)), d2


def _masked_mean(x: Array, mask: Array, axis: int) -> Array:
    return jnp.sum(jnp.where(mask, x, 0.0), axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1)


def _minmax(s: Array, mask: Array, guard: bool) -> Array:
    lo = jnp.min(jnp.where(mask, s, jnp.inf), axis=1, keepdims=True)
    hi = jnp.max(jnp.where(mask, s, -jnp.inf), axis=1, keepdims=True)
    scaled = (s - lo) / (hi - lo + 1e-8)
    # The text scorer normalises only when scores differ; the visual one always does (constant scores -> 0).
    return jnp.where(mask, jnp.where(hi > lo, scaled, s) if guard else scaled, 0.0)


@functools.partial(jax.jit, static_argnames=("max_sq_dist",))
def visual_token_scores(acts: Array, visual: Array, text: Array, *, max_sq_dist: float = 1e6) -> Array:
    """[B, T] min-max scores of the visual tokens: Σ_j (K H_t)²_ij of the visual × text RBF kernel (0 elsewhere)."""
    x = _centred(acts, visual | text)
    pairs = visual[:, :, None] & text[:, None, :]
    k, _ = _rbf(_sq_distances(x, x), pairs, max_sq_dist)
    k = jnp.where(pairs, k - _masked_mean(k, pairs, axis=2)[:, :, None], 0.0)  # K H_t: centre over text tokens
    return _minmax(jnp.sum(k * k, axis=2), visual, guard=False)


@functools.partial(jax.jit, static_argnames=("max_sq_dist",))
def text_token_scores(acts: Array, text: Array, *, max_sq_dist: float = 1e6) -> Array:
    """[B, T] min-max scores of the text tokens: 0.7 mean_k d²_jk + 0.3 |(H K H)_jj| of the text RBF kernel."""
    x = _centred(acts, text)
    pairs = text[:, :, None] & text[:, None, :]
    t = acts.shape[1]
    d2 = jnp.where(jnp.eye(t, dtype=bool), 0.0, _sq_distances(x, x))  # exact zeros on the diagonal
    k, d2 = _rbf(d2, pairs, max_sq_dist)
    row = _masked_mean(k, pairs, axis=2)  # [B, T]
    grand = _masked_mean(row, text, axis=1)[:, None]
    centred_diag = jnp.diagonal(k, axis1=1, axis2=2) - 2 * row + grand  # (H K H)_jj, K symmetric
    scores = 0.7 * _masked_mean(d2, pairs, axis=2) + 0.3 * jnp.abs(centred_diag)
    return _minmax(scores, text, guard=True)


def _centred(acts: Array, mask: Array) -> Array:
    # Distances do not change under a shift; centring first keeps |x|² + |y|² − 2x·y from cancelling in float32.
    x = acts.astype(jnp.float32)
    return x - _masked_mean(x, mask[..., None], axis=1)[:, None, :]


def _top(scores: Array, mask: Array, k: Array, all_when_zero: bool) -> Array:
    """[B, T] bool: the k[b] best-scoring tokens of each row with a score above 1e-6 (ties: earlier token first)."""
    order = jnp.argsort(jnp.where(mask, -scores, jnp.inf), axis=1, stable=True)
    rank = jnp.argsort(order, axis=1)
    chosen = mask & (rank < k[:, None]) & (scores > 1e-6)
    if all_when_zero:
        # The official visual selection slices argsort(...)[-k:], which for k = 0 keeps every token.
        chosen = jnp.where((k == 0)[:, None], mask & (scores > 1e-6), chosen)
    return chosen


@functools.partial(jax.jit, static_argnames=("modality", "selection", "max_sq_dist"))
def care_weights(acts: Array, visual: Array, text: Array, real: Array, *, modality: str, selection: str = "kernel",
                 visual_fraction: float = 0.125, text_fraction: float = 0.2, max_sq_dist: float = 1e6) -> Array:
    """[B, T] pooling weights (rows sum to 1) of CARE's per-example vector for `modality` at one site.

    kernel: visual keeps ⌊n_v·visual_fraction⌋ top tokens, text max(1, ⌊n_t·text_fraction⌋), as the official
    code; mean: every token of the modality. Rows without the modality (or, for visual, without text) use all
    real tokens, and rows whose selection is empty use every token of the modality, as the official code does."""
    acts = acts.astype(jnp.float32)
    mine = visual if modality == "visual" else text
    if selection == "mean":
        chosen = mine
    elif modality == "visual":
        n = jnp.sum(visual, axis=1)
        k = jnp.floor(n * visual_fraction).astype(jnp.int32)
        chosen = _top(visual_token_scores(acts, visual, text, max_sq_dist=max_sq_dist), visual, k, True)
    else:
        n = jnp.sum(text, axis=1)
        k = jnp.maximum(1, jnp.floor(n * text_fraction).astype(jnp.int32))
        chosen = _top(text_token_scores(acts, text, max_sq_dist=max_sq_dist), text, k, False)
    chosen = jnp.where(jnp.any(chosen, axis=1, keepdims=True), chosen, mine)
    usable = jnp.any(mine, axis=1) & (jnp.any(text, axis=1) if modality == "visual" else True)
    chosen = jnp.where(usable[:, None], chosen, real)
    w = chosen.astype(jnp.float32)
    return w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)


@jax.jit
def _pool(acts: Array, weights: Array) -> Array:
    return jnp.einsum("btd,bt->bd", acts.astype(jnp.float32), weights, precision=HIGHEST)


@dataclasses.dataclass(frozen=True)
class CarePool:
    """CARE's per-example vector of `modality` as a `capture.collect` pooling: (acts [B, T, D], real [B, T],
    token_types [B, T]) -> (vectors [B, D], weights [B]); token scores come from the same site's activations."""

    modality: str
    selection: str = "kernel"
    visual_fraction: float = 0.125
    text_fraction: float = 0.2
    max_sq_dist: float = 1e6

    def __post_init__(self):
        _check_choice(self.modality, MODALITIES, "modality")
        _check_choice(self.selection, SELECTIONS, "selection")

    def __call__(self, acts: Array, real: Array, token_types: Array) -> tuple[Array, Array]:
        visual, text = _groups(real, token_types)
        w = care_weights(acts, visual, text, real, modality=self.modality, selection=self.selection,
                         visual_fraction=self.visual_fraction, text_fraction=self.text_fraction,
                         max_sq_dist=self.max_sq_dist)
        return _pool(acts, w), jnp.any(real, axis=1).astype(jnp.float32)


def care_vectors(acts: Array, batch: Mapping, modality: str, *, selection: str = "kernel", **options: float) -> Array:
    """acts [B, T, D] of one site -> CARE's per-example vectors [B, D] (kernel-selected or mean-pooled tokens)."""
    pool = CarePool(modality, selection, **options)
    real = _real_tokens(batch)
    return pool(acts, jnp.asarray(real), jnp.asarray(batch["token_types"]))[0]


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise InputError(f"unknown {what} {value!r}; choose one of {choices}")


def collect_care(
    lm: Pretrained,
    batches: Iterable[Mapping],
    sites: Iterable[str],
    modality: str,
    *,
    selection: str = "kernel",
    covariance: bool = True,
    vectors: bool = False,
    total: int | None = None,
    progress: bool = True,
    **options: float,
) -> Collected:
    """CARE's per-example vectors of `modality` at each site (scores from that site's own activations), as
    streaming Moments (with covariance, for build_subspace) and/or kept vectors [examples, width]."""
    sites = tuple(sites)
    return collect(lm, batches, sites, positions="all", pool=CarePool(modality, selection, **options),
                   covariance=sites if covariance else (), vectors=vectors, total=total, progress=progress)
