"""GPU benchmark: the generalized eigen-decomposition of CARE's subspaces, JAX vs PyTorch on the same GPU.

    PYTHONPATH=. python benchmarks/gpu_eigh.py --out DIR
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_eigh.py --tiny --out /tmp/gpu-tiny     # a CPU rehearsal
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_eigh.py --report DIR --write           # DIR/eigh.json -> BENCHMARKS.md

Σ_mal u = λ Σ_ben u at d = 3584 and 4096 (`eigh.py`'s covariances, shrinkage 0.1), float32:
`precise_jax.subspace.generalized_eigh` (and its jitted core alone) vs a torch Cholesky route on the same GPU;
the float64 scipy answer on the machine's CPU for the first d gives eigenvalue error and principal angles.

Random bfloat16 weights of the presets drawn on the device, one child process per framework: see the GPU section
of `common.py`. Results go to `--out`/eigh.json as soon as the benchmark ends, and its BENCHMARKS.md section is
printed (replaced with `--write`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    GpuBenchmark, device_name, end, jax_peak, logger, run_gpu_benchmark, section_header, timed, torch_device,
    torch_peak, torch_sync,
)

log = logger("gpu_eigh")


def eigh_problems(args, work: Path) -> dict:
    """Write each d's float64 covariances; solve the first d in float64 with scipy (on this machine's CPU)."""
    import scipy.linalg

    from benchmarks.eigh import GAMMA, problem

    out = {}
    for i, d in enumerate(args.dims):
        a, b = problem(d)
        np.savez(work / f"eigh_{d}.npz", a=a, b=b)
        if i == 0:
            shrunk = (1 - GAMMA) * b + GAMMA * np.trace(b) / d * np.eye(d)
            start = time.perf_counter()
            w, v = scipy.linalg.eigh(a, shrunk)
            out = {"reference_d": d, "scipy_float64_s": time.perf_counter() - start, "cpu_cores": os.cpu_count()}
            np.savez(work / f"eigh_{d}_reference.npz", w=w[::-1][:args.k], v=v[:, ::-1][:, :args.k])
    return out


def compare_eigh(work: Path, d: int, k: int, w, v) -> dict:
    """Top-k eigenvalue error and largest principal-angle sine against the float64 scipy answer, if there is one."""
    import scipy.linalg

    path = work / f"eigh_{d}_reference.npz"
    if not path.exists():
        return {}
    ref = np.load(path)
    w, v = np.asarray(w, np.float64)[:k], np.asarray(v, np.float64)[:, :k]
    return {"eig_rel_err": float(np.max(np.abs(w - ref["w"]) / np.abs(ref["w"]))),
            "max_sine": float(np.max(np.sin(scipy.linalg.subspace_angles(v, ref["v"]))))}


def child_eigh_jax(args, work: Path) -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks.eigh import GAMMA
    from precise_jax.subspace import _whitened_eigh, generalized_eigh

    out = {"device": device_name(), "dims": {}}
    for d in args.dims:
        data = np.load(work / f"eigh_{d}.npz")
        a, b = jnp.asarray(data["a"], jnp.float32), jnp.asarray(data["b"], jnp.float32)
        core = (a, b, jnp.float32(0.0), jnp.float32(GAMMA))
        start = time.perf_counter()
        compiled = _whitened_eigh.lower(*core).compile()
        r = {"compile_s": time.perf_counter() - start}
        r["core_first_s"], r["core_s"] = timed(lambda: jax.block_until_ready(compiled(*core)), args.repeats)
        # The public call: input checks (finiteness, symmetry) on the device, the core, the positive-definite check.
        r["public_first_s"], r["public_s"] = timed(
            lambda: jax.block_until_ready(generalized_eigh(a, b, shrinkage=GAMMA)), args.repeats)
        sym = (a + a.T) / 2
        plain = jax.jit(jnp.linalg.eigh)
        jax.block_until_ready(plain(sym))
        r["eigh_only_s"] = timed(lambda: jax.block_until_ready(plain(sym)), args.repeats)[1]
        w, v = generalized_eigh(a, b, shrinkage=GAMMA)
        r.update(compare_eigh(work, d, args.k, w, v))
        out["dims"][str(d)] = r
        log(f"eigh jax d={d}: core {np.median(r['core_s']):.3f} s, public {np.median(r['public_s']):.3f} s")
    out["peak_device_bytes"] = jax_peak()
    return out


def torch_generalized_eigh(a, b, gamma: float):
    """The float32 Cholesky route in PyTorch: λ descending, v b'-orthonormal, b' = (1−γ) b + γ tr(b)/d I."""
    import torch

    d = b.shape[0]
    b = (1 - gamma) * b + gamma * torch.trace(b) / d * torch.eye(d, dtype=b.dtype, device=b.device)
    chol = torch.linalg.cholesky(b)
    c = torch.linalg.solve_triangular(chol, a, upper=False)
    c = torch.linalg.solve_triangular(chol, c.T, upper=False)
    w, u = torch.linalg.eigh((c + c.T) / 2)
    v = torch.linalg.solve_triangular(chol.T, u, upper=True)
    return w.flip(0), v.flip(1)


def child_eigh_torch(args, work: Path) -> dict:
    import torch

    from benchmarks.eigh import GAMMA

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 at full precision, as the JAX side
    device = torch_device()
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dims": {}}
    for d in args.dims:
        data = np.load(work / f"eigh_{d}.npz")
        a = torch.from_numpy(data["a"]).float().to(device)
        b = torch.from_numpy(data["b"]).float().to(device)

        def run(a=a, b=b):
            result = torch_generalized_eigh(a, b, GAMMA)
            torch_sync()
            return result

        r = {}
        r["first_s"], r["times_s"] = timed(run, args.repeats)
        sym = (a + a.T) / 2
        r["eigh_only_s"] = timed(lambda: (torch.linalg.eigh(sym), torch_sync()), args.repeats)[1]
        w, v = run()
        r.update(compare_eigh(work, d, args.k, w.cpu().numpy(), v.cpu().numpy()))
        out["dims"][str(d)] = r
        log(f"eigh torch d={d}: {np.median(r['times_s']):.3f} s")
    out["peak_device_bytes"] = torch_peak()
    return out


def eigh_markdown(result: dict) -> str:
    jx, pt, a, meta = result["runs"]["jax"], result["runs"]["torch"], result["args"], result["meta"]
    ref = result.get("reference", {})
    lines = []
    for d in a["dims"]:
        if "error" in jx or "error" in pt:
            lines.append(f"| {d} | {jx.get('error', '')} {pt.get('error', '')} |" + " |" * 7)
            continue
        j, t = jx["dims"][str(d)], pt["dims"][str(d)]
        med = lambda ts: f"{np.median(ts) * 1e3:.0f}"  # noqa: E731
        err = lambda r: (f"{r['eig_rel_err']:.1e} / {r['max_sine']:.1e}" if "eig_rel_err" in r else "–")  # noqa
        lines.append(f"| {d} | {med(j['public_s'])} | {med(j['core_s'])} (compile {j['compile_s']:.1f} s) | "
                     f"{med(j['eigh_only_s'])} | {med(t['times_s'])} | {med(t['eigh_only_s'])} | "
                     f"{np.median(t['times_s']) / np.median(j['public_s']):.2f}× | {err(j)} | {err(t)} |")
    reference = (f"- float64 reference: `scipy.linalg.eigh(A, B')` at d = {ref['reference_d']} on the machine's "
                 f"{ref['cpu_cores']} CPU cores took {ref['scipy_float64_s']:.1f} s; errors are over the top "
                 f"k = {a['k']} pairs: max relative eigenvalue error / largest sine of the principal angles"
                 if ref else "- no float64 reference")
    return section_header("GPU: generalized eigen-decomposition (CARE subspaces), float32", "gpu eigh", result) + \
        f"""- problem: `benchmarks/eigh.py`'s covariances (Σ_mal from 720, Σ_ben from 360 seeded Gaussian activations, Σ_ben singular), shrinkage γ = 0.1; full decomposition
- JAX: `precise_jax.subspace.generalized_eigh(a, b, shrinkage=0.1)` (public call: input checks on the device, jitted Cholesky route at highest precision, positive-definiteness check) and its jitted core alone (AOT); PyTorch: the same Cholesky route (`cholesky`, two `solve_triangular`, `eigh`, back-solve) in float32, TF32 off; "eigh only": the symmetric `eigh` of a d × d matrix alone, where most of the time goes
{reference}
- median of {a['repeats']} timed calls after one untimed call, ms

| d | JAX `generalized_eigh`, ms | JAX jitted core, ms | JAX eigh only, ms | PyTorch route, ms | PyTorch eigh only, ms | PyTorch / JAX | JAX err vs float64 | PyTorch err vs float64 |
|---:|---:|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(lines)}

- target: ≤ 100 ms at d = 4096; meta: {meta['gpu'].get('name', 'no GPU')}
{end('gpu eigh')}
"""


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=256, help="eigenpairs compared with the float64 reference")
    p.add_argument("--dims", type=int, nargs="+", default=[3584, 4096])


BENCHMARK = GpuBenchmark("eigh", {"jax": child_eigh_jax, "torch": child_eigh_torch}, eigh_markdown, options,
                         tiny=dict(k=8, dims=[48, 64], repeats=2),
                         prepare=lambda args, work: {"reference": eigh_problems(args, work)})


if __name__ == "__main__":
    raise SystemExit(run_gpu_benchmark(BENCHMARK, __doc__, __file__))
