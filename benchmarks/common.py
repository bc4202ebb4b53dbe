"""What every benchmark script shares: child processes, memory and timing summaries, the machine's description,
and replacing one script's section of BENCHMARKS.md.

A measured framework runs in a child process of its own, so its peak memory is its own. Two protocols:
`Child` (the child says "ready", then runs one timed repetition per "run" line, so the parent can alternate
frameworks under the same load on a shared CPU) and `run_child` (the child runs to the end on its own, as on a
dedicated GPU, where at most one model must be in device memory at a time). Either way the child writes its
results as JSON to `work/<name>.json`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nMeasured with the scripts in `benchmarks/` (see `benchmarks/README.md`). "
          "Each section is replaced when its script is rerun with `--write`.\n\n")


def logger(name: str) -> Callable[[str], None]:
    """A progress printer to stderr, prefixed with the script's name and the time."""

    def log(message: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return log


# ----------------------------------------------------------------------------------------------------- measuring


def rss_kib() -> int:
    """Current resident set size of this process in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def stats(times: list[float]) -> dict:
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return {"times_s": list(times), "median_s": float(median), "q1_s": float(q1), "q3_s": float(q3)}


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """(first call s, [timed repeats s]); `fn` must wait for its own result (block_until_ready, synchronize)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, times


# ----------------------------------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_detail() -> str:
    """family/model numbers: the model name of a virtual CPU is often just the vendor's family."""
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if ":" in line:
            key, value = (s.strip() for s in line.split(":", 1))
            fields.setdefault(key, value)
    flags = set(fields.get("flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"family {fields.get('cpu family')} model {fields.get('model')}, {' '.join(isa)}"


def versions(names: Iterable[str] = ("jax", "jaxlib", "flax", "torch", "transformers")) -> dict:
    """{"python": ..., name: installed version or "missing"} without importing the packages."""
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001 - a label for the report
            out[name] = "missing"
    return out


def pin_cpus(threads: int | None) -> list[int]:
    """Pin this process to the first `threads` of the CPUs it may use (all when None) and return them: children
    inherit the affinity, and XLA sizes its thread pool from it."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads is not None:
        if not 1 <= threads <= len(cpus):
            raise SystemExit(f"--threads must be between 1 and {len(cpus)}")
        cpus = cpus[:threads]
        os.sched_setaffinity(0, cpus)
    return cpus


def model_folder(model: str | None) -> str:
    """`--model`, or the cached real SmolLM2-135M-Instruct folder when it is not given."""
    if model is not None:
        return model
    from precise_jax.assets import smollm2_135m_instruct

    return str(smollm2_135m_instruct())


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def gpu_description() -> dict:
    """Name, memory, driver and CUDA version of GPU 0 from nvidia-smi (empty when there is none)."""
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    if query.returncode != 0 or not query.stdout.strip():
        return {}
    name, memory, driver = (s.strip() for s in query.stdout.splitlines()[0].split(","))
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return {"name": name, "memory": memory, "driver": driver, "cuda": cuda.group(1) if cuda else "unknown"}


# ----------------------------------------------------------------------------------------------------- children


def child_env(extra: dict | None = None) -> dict:
    """This environment, with the repository on PYTHONPATH and `extra` set."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def protocol_stream():
    """In a child: a line-buffered stream on the real stdout for the protocol; anything a library prints to
    stdout afterwards goes to stderr."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return stream


def serve_runs(protocol, step: Callable[[], object], name: str, log: Callable[[str], None],
               note: Callable[[object], str] = lambda out: "") -> tuple[list[float], list[float], object]:
    """In a child, once warmed up: say "ready", then run `step` once per "run" line on stdin and answer each with
    its wall seconds, until any other line. Returns (wall seconds, CPU seconds, the last step's output)."""
    print("ready", file=protocol)
    wall, cpu, out = [], [], None
    for line in sys.stdin:
        if line.strip() != "run":
            break
        c0, t0 = time.process_time(), time.perf_counter()
        out = step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        log(f"{name}: {wall[-1]:.3f} s ({cpu[-1]:.2f} CPU s){note(out)}")
        print(wall[-1], file=protocol)
    return wall, cpu, out


class Child:
    """A child process speaking the ready / run / finish protocol (see the module docstring)."""

    def __init__(self, name: str, command: list[str], work: Path, env: dict | None = None):
        self.name, self.work = name, work
        self.process = subprocess.Popen(command, env=child_env(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        self.expect("ready")

    def expect(self, word: str) -> str:
        line = self.process.stdout.readline().strip()
        if not line or (word and line != word):
            self.process.kill()
            raise SystemExit(f"the {self.name} child failed (said {line!r}); see its stderr above")
        return line

    def run(self) -> str:
        """One timed repetition; returns what the child answered (its wall seconds)."""
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self.expect("")

    def finish(self) -> dict:
        self.process.stdin.close()
        if self.process.wait() != 0:
            raise SystemExit(f"the {self.name} child exited with {self.process.returncode}")
        return json.loads((self.work / f"{self.name}.json").read_text())


def run_child(name: str, command: list[str], work: Path, env: dict | None = None, timeout: float | None = None
              ) -> dict:
    """Run a child to its end and return its JSON results, or {"error": ...} when it failed or outran `timeout`
    seconds (an out-of-memory variant is a result to report, not a reason to lose the others)."""
    try:
        done = subprocess.run(command, env=child_env(env), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"gave up after {timeout} s"}
    path = work / f"{name}.json"
    if done.returncode != 0 or not path.exists():
        return {"error": f"exited with status {done.returncode}" + ("" if path.exists() else ", wrote no results")}
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------- BENCHMARKS.md


def begin(key: str) -> str:
    return f"<!-- begin: {key} -->"


def end(key: str) -> str:
    return f"<!-- end: {key} -->"


def replace_section(key: str, section: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section between `begin(key)` and `end(key)`, leaving every other section alone.
    `section` must start with begin(key) and end with end(key)."""
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(begin(key)) + r".*?" + re.escape(end(key)) + r"\n?", re.S)
    section = section.rstrip("\n") + "\n"
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    print(f"wrote {path}", file=sys.stderr, flush=True)
