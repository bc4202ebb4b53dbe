"""Generalized eigen-decomposition Σ_mal u = λ Σ_ben u at CARE's widths, on CPU, three ways in one run:

- JAX float32 Cholesky route (`precise_jax.subspace.generalized_eigh`: chol, two triangular solves, eigh, back-solve)
- scipy.linalg.eigh(A, B) in float64 (LAPACK sygvd)
- the official CARE route (FredJDean/CARE `_build_generalized_subspace`), float64 numpy/scipy:
  W = inv(sqrtm(Σ_ben + 1e-6 I)), eigh(W Σ_mal W), U = W V with unit columns

    PYTHONPATH=. .venv/bin/python benchmarks/eigh.py [--dims 3584 4096] [--repeats 2] [--k 256] [--write]

The covariances come from seeded Gaussian activations with unequal scales: N_ben = 360 benign (CARE's COCO set)
and N_mal = 720 malicious examples, so Σ_ben is singular; the JAX and scipy routes solve the same shrunk problem
(γ = 0.1), the official route its own 1e-6 ridge. Each route runs `--repeats` times after one untimed call
(JAX: the compilation, timed separately). The top-k JAX solution is compared with scipy's (eigenvalues, principal
angles), so both sides compute the same thing. `--write` replaces this script's section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import begin, cpu_model, end, loadavg, logger, replace_section, timed, utc_now  # noqa: E402

KEY = "eigh: generalized eigen-decomposition on CPU"
N_BENIGN, N_MALICIOUS, GAMMA = 360, 720, 0.1


log = logger("eigh")


def problem(d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(Σ_mal, Σ_ben) [d, d] float64 from seeded Gaussian activations with per-direction scales."""
    rng = np.random.default_rng(seed)
    ben = rng.normal(size=(N_BENIGN, d)) * np.exp(rng.uniform(-1, 1, d))
    mal = rng.normal(size=(N_MALICIOUS, d)) * np.exp(rng.uniform(-1, 1, d)) + rng.normal(size=d)
    cov = lambda x: (x - x.mean(0)).T @ (x - x.mean(0)) / len(x)  # noqa: E731
    return cov(mal), cov(ben)


def official(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    import scipy.linalg

    white = np.linalg.inv(scipy.linalg.sqrtm(b + 1e-6 * np.eye(len(b))))
    eigvals, eigvecs = np.linalg.eigh(white @ a @ white)
    u = (white @ eigvecs[:, np.argsort(eigvals)[::-1][:k]]).astype(np.float32)
    return u / (np.linalg.norm(u, axis=0) + 1e-8)


def run_dim(d: int, k: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import scipy.linalg

    from precise_jax.subspace import _whitened_eigh

    log(f"d={d}: building the covariances")
    a, b = problem(d)
    shrunk = (1 - GAMMA) * b + GAMMA * np.trace(b) / d * np.eye(d)
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    out: dict = {"d": d}

    log(f"d={d}: JAX float32 Cholesky route")
    args = (a32, b32, jnp.float32(0.0), jnp.float32(GAMMA))
    start = time.perf_counter()
    compiled = _whitened_eigh.lower(*args).compile()
    out["jax_compile_s"] = time.perf_counter() - start
    out["jax_first_s"], out["jax_s"] = timed(lambda: jax.block_until_ready(compiled(*args)), repeats)
    w, v, ok = compiled(*args)  # what generalized_eigh(a, b, shrinkage=γ) runs after its input checks
    assert bool(ok), "the shrunk benign covariance should be positive definite"
    w, v = w[:k], v[:, :k]

    log(f"d={d}: scipy.linalg.eigh(A, B) float64")
    ref = {}

    def scipy_run():
        ref["w"], ref["v"] = scipy.linalg.eigh(a, shrunk)

    out["scipy_first_s"], out["scipy_s"] = timed(scipy_run, repeats)
    ref_w, ref_v = ref["w"][::-1][:k], ref["v"][:, ::-1][:, :k]
    out["eig_rel_err"] = float(np.max(np.abs(np.asarray(w, np.float64) - ref_w) / np.abs(ref_w)))
    angles = scipy.linalg.subspace_angles(np.asarray(v, np.float64), ref_v)
    out["max_sine"] = float(np.max(np.sin(angles)))

    log(f"d={d}: official route (sqrtm, inv, eigh) float64")
    out["official_first_s"], out["official_s"] = timed(lambda: official(a, b, k), repeats)
    log(f"d={d}: jax {np.median(out['jax_s']):.2f} s, scipy {np.median(out['scipy_s']):.2f} s, "
        f"official {np.median(out['official_s']):.2f} s")
    return out


def versions() -> str:
    import platform
    from importlib.metadata import version

    names = ("jax", "jaxlib", "numpy", "scipy")
    return f"python {platform.python_version()}, " + ", ".join(f"{n} {version(n)}" for n in names)


def blas() -> str:
    import numpy

    try:
        info = numpy.show_config(mode="dicts")["Build Dependencies"]["lapack"]
        return f"{info.get('name')} {info.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - only a label for the report
        return "unknown"


def markdown(results: list[dict], args, meta: dict) -> str:
    fmt = lambda ts: f"{np.median(ts):.2f}"  # noqa: E731
    rows = "\n".join(
        f"| {r['d']} | {fmt(r['jax_s'])} (compile {r['jax_compile_s']:.2f}) | {fmt(r['scipy_s'])} | "
        f"{fmt(r['official_s'])} | {np.median(r['scipy_s']) / np.median(r['jax_s']):.1f}× | "
        f"{np.median(r['official_s']) / np.median(r['jax_s']):.1f}× | {r['eig_rel_err']:.1e} | {r['max_sine']:.1e} |"
        for r in results
    )
    return f"""{begin(KEY)}
## Generalized eigen-decomposition (CARE subspaces), CPU

- date: {meta['date']}
- device: {meta['cpu']}, {meta['cores']} cores (shared with other jobs: load average {meta['load_before']} before,
  {meta['load_after']} after); numpy/scipy LAPACK: {meta['blas']}
- versions: {meta['versions']}
- command: `{meta['command']}`
- problem: Σ_mal from {N_MALICIOUS} and Σ_ben from {N_BENIGN} seeded Gaussian activations (Σ_ben singular);
  JAX and scipy solve the shrunk problem (γ = {GAMMA}), the official route uses its 1e-6 ridge; full
  decomposition, top k = {args.k} compared
- median of {args.repeats} timed runs after one untimed run (JAX: compiled ahead, compile time in brackets)

| d | JAX float32 Cholesky route, s | scipy eigh(A, B) float64, s | official sqrtm/inv/eigh float64, s | scipy / JAX | official / JAX | top-k eigenvalue rel. err vs scipy | max sin(principal angle), top k |
|---:|---|---:|---:|---:|---:|---:|---:|
{rows}
{end(KEY)}
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[3584, 4096])
    p.add_argument("--k", type=int, default=256, help="leading pairs compared with scipy (CARE's n_components)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--write", action="store_true", help="replace this script's section of BENCHMARKS.md")
    args = p.parse_args(argv)
    meta = {"load_before": loadavg(), "cpu": cpu_model(), "cores": os.cpu_count(), "versions": versions(),
            "blas": blas(), "date": utc_now(),
            "command": "PYTHONPATH=. .venv/bin/python benchmarks/eigh.py " + shlex.join(sys.argv[1:] if argv is None
                                                                                      else list(argv))}
    results = [run_dim(d, args.k, args.repeats) for d in args.dims]
    meta["load_after"] = loadavg()
    section = markdown(results, args, meta)
    print(section)
    if args.write:
        replace_section(KEY, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
