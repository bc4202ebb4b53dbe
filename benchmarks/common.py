"""What every benchmark script shares: child processes, memory and timing summaries, the machine's description,
and replacing one script's section of BENCHMARKS.md.

A measured framework runs in a child process of its own, so its peak memory is its own. Two protocols:
`Child` (the child says "ready", then runs one timed repetition per "run" line, so the parent can alternate
frameworks under the same load on a shared CPU) and `run_child` (the child runs to the end on its own, as on a
dedicated GPU, where at most one model must be in device memory at a time). Either way the child writes its
results as JSON to `work/<name>.json`. The GPU benchmarks (gpu_*.py) share their random 7B models, inputs and
main (`run_gpu_benchmark`) here too.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

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


def parent_setup(args: argparse.Namespace) -> list[int]:
    """The parent process's start: pin to `--threads` CPUs (`args.threads` becomes their count), resolve `--model`
    (`model_folder`); returns the CPUs."""
    cpus = pin_cpus(args.threads)
    args.threads = len(cpus)
    args.model = model_folder(args.model)
    return cpus


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


# ----------------------------------------------------------------------------------------------------- GPU benchmarks
# The gpu_*.py scripts measure JAX against the Hugging Face PyTorch baseline at the real 7B scale on one GPU
# (issues #8 and #6). Weights are random bfloat16 of the presets' real architectures (`ports/presets`), drawn
# directly on the device (JAX: normal, std 0.02, norm weights around 1, as `write_random_checkpoint`; PyTorch:
# transformers' own initialisation), so no checkpoint is read or written: the two frameworks hold different random
# weights and their outputs are not compared there (the parity tests and the CPU benchmarks do that on shared
# weights). Every (benchmark, framework) runs in a child process of its own (`run_child`), one after another, so each
# peak of device memory is its own: JAX `memory_stats()["peak_bytes_in_use"]` with preallocation off, PyTorch
# `torch.cuda.max_memory_allocated()`. `--tiny` shrinks the preset and the sizes so that every code path runs on a
# CPU first.

PRESET = "llava-1.5-7b-hf"
# A small LLaVA of the same structure for --tiny: 2-layer Llama and CLIP, 28-pixel images (4 features each).
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                   patch_size=14, projection_dim=32)


def llava_config(tiny: bool) -> dict:
    """The LLaVA-1.5-7B preset's config.json contents, or its --tiny version."""
    from ports.presets import load_preset

    config = load_preset(PRESET)
    if tiny:
        config = dict(config, image_token_index=500, pad_token_id=501, vocab_size=512,
                      text_config=dict(config["text_config"], **TINY_TEXT),
                      vision_config=dict(config["vision_config"], **TINY_VISION))
    return config

def text_config(llava: dict) -> dict:
    """The config.json contents of the composition's language model alone (Llama-2-7B for LLaVA-1.5-7B)."""
    from ports.presets import hf_config

    return hf_config(llava).text_config.to_dict()

def random_lm(config: dict, seed: int = 0):
    """The port of `config` in bfloat16 with random weights drawn on the default device, one leaf at a time."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict

    from ports.presets import build_abstract

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def draw(key, shape, dtype, norm: bool):
        x = jax.random.normal(key, shape, jnp.float32) * 0.02
        return (x + 1.0 if norm else x).astype(dtype)

    lm = build_abstract(config, jnp.bfloat16)
    key = jax.random.key(seed)
    flat = flatten_dict(lm.params)
    params = {path: draw(jax.random.fold_in(key, i), leaf.shape, leaf.dtype, "norm" in "/".join(path)
                         and path[-1] == "weight") for i, (path, leaf) in enumerate(sorted(flat.items()))}
    lm.params = jax.block_until_ready(unflatten_dict(params))
    return lm

def torch_model(config: dict):
    """transformers' model of `config` in bfloat16 with sdpa attention and its own random initialisation, built on
    the GPU when there is one."""
    import torch
    import transformers

    from ports.presets import hf_config

    hf = hf_config(config)
    cls = {"llava": transformers.LlavaForConditionalGeneration, "llama": transformers.LlamaForCausalLM}[hf.model_type]
    torch.manual_seed(0)
    with torch.device(torch_device()):
        model = cls._from_config(hf, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()

def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"

def torch_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()

def torch_peak(reset: bool = False) -> int | None:
    """Peak bytes PyTorch allocated on the GPU since the last reset (None without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated()
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return int(peak)

def jax_peak() -> int | None:
    """Peak bytes in use on JAX's first device since the process started (None where the backend keeps none)."""
    import jax

    memory = jax.devices()[0].memory_stats()
    return None if not memory else int(memory.get("peak_bytes_in_use", 0))

def device_name() -> str:
    import jax

    return str(jax.devices()[0].device_kind)

def flop_parts(params, config, rows: int, tokens: int, images: int = 1) -> dict[str, float]:
    """Model FLOPs of one forward by part, 2 × parameters used × tokens for every matrix product: `lm` the decoder
    layers per token, `attention` the decoder's causal score and value products (the T²/2 scores a causal kernel
    computes), `head` the LM head per token; with a vision tower and `images` images per row, `vision` the tower per
    patch (full attention) and `projector` per image feature."""
    from ports import clip
    from ports.presets import num_params

    text = getattr(config, "text", config)
    parts = {"lm": 2.0 * num_params({k: v for k, v in params["lm"].items() if k.startswith("layers_")}) * rows * tokens,
             "attention": 2.0 * text.num_layers * text.hidden_size * tokens**2 * rows,
             "head": 2.0 * num_params(params.get("lm_head", params["lm"]["embed_tokens"])) * rows * tokens}
    if "vision" in params and images:
        v = config.vision
        patches = v.grid**2 + (v.model_type in clip.MODEL_TYPES)  # CLIP's class token
        parts["vision"] = rows * images * (2.0 * num_params(params["vision"]) * patches
                                           + 4.0 * v.num_layers * v.hidden_size * patches**2)
        parts["projector"] = rows * images * 2.0 * num_params(params["projector"]) * config.features_per_image
    return parts

def vlm_batch(llava: dict, rows: int, tokens: int, seed: int = 0) -> dict:
    """Rows of [BOS, one image's tokens, random text], real-sized random pixel_values [rows, 3, S, S] float32 and
    token types (image / prompt), as numpy."""
    from ports.processing import TokenType

    vision = llava["vision_config"]
    features = (vision["image_size"] // vision["patch_size"]) ** 2  # 'default' selection drops CLIP's class token
    image = llava["image_token_index"]
    if tokens < features + 2:
        raise SystemExit(f"--capture-tokens must be at least {features + 2} (one image's {features} tokens + text)")
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, image, (rows, tokens), dtype=np.int32)
    ids[:, 0] = 1
    ids[:, 1:1 + features] = image
    types = np.where(ids == image, TokenType.IMAGE, TokenType.PROMPT).astype(np.int8)
    pixels = rng.standard_normal((rows, 3, vision["image_size"], vision["image_size"]), dtype=np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": pixels, "token_types": types}

def text_batch(vocab: int, rows: int, tokens: int, seed: int = 0) -> dict:
    """Random token ids [rows, tokens]; the first half is the prompt, the second half the reply (the loss)."""
    from ports.processing import TokenType

    ids = np.random.default_rng(seed).integers(3, vocab, (rows, tokens), dtype=np.int32)
    types = np.full(ids.shape, TokenType.PROMPT, np.int8)
    types[:, tokens // 2:] = TokenType.RESPONSE
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_types": types}


def gib(n) -> str:
    return "–" if n is None else f"{n / 2**30:.1f}"

def share(a, b) -> str:
    """a / b as a ratio, "–" where either is unknown (no GPU memory counter on CPU)."""
    return "–" if a is None or b is None else f"{a / b:.2f}"

def section_header(title: str, key: str, result: dict) -> str:
    meta, v = result["meta"], result["meta"]["versions"]
    gpu = meta["gpu"]
    device = (f"{gpu['name']} ({gpu['memory']}), driver {gpu['driver']}, CUDA {gpu['cuda']}" if gpu
              else f"no GPU ({meta['cpu_cores']} CPU cores): a --tiny rehearsal, not a measurement")
    names = ", ".join(f"{n} {v[n]}" for n in v if n != "python")
    return f"""{begin(key)}
## {title}

- date: {meta['date']}
- device: {device}; {meta['cpu_cores']} CPU cores
- versions: python {v['python']}, {names}
- command: `{meta['command']}`
- weights: random bfloat16 of the `{PRESET}` preset's architecture{' (--tiny: shrunk)' if meta['tiny'] else ''}, drawn on the device; each framework in its own process, one after another
"""


@dataclasses.dataclass(frozen=True)
class GpuBenchmark:
    """One gpu_*.py script: results go to OUT/`part`.json and to the "gpu `part`" section of BENCHMARKS.md; each
    variant (a framework, or a framework's mode) runs `children[variant](args, work)` in a child process."""

    part: str
    children: Mapping[str, Callable[[argparse.Namespace, Path], dict]]
    markdown: Callable[[dict], str]
    options: Callable[[argparse.ArgumentParser], None]  # adds the script's own options to the shared ones
    tiny: Mapping[str, Any]  # --tiny's values for options left at their defaults
    prepare: Callable[[argparse.Namespace, Path], dict] | None = None  # in the parent, first: more result keys
    chosen: Callable[[argparse.Namespace], Sequence[str]] | None = None  # the variants to run (default: all)


def gpu_parse(bench: GpuBenchmark, doc: str | None, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help=f"folder for the {bench.part}.json results (default: a temporary folder)")
    p.add_argument("--tiny", action="store_true", help="shrunk presets and sizes: a quick CPU rehearsal")
    p.add_argument("--repeats", type=int, default=5)
    bench.options(p)
    p.add_argument("--child-timeout", type=int, default=420, help="seconds before a child is given up")
    p.add_argument("--report", help=f"render the BENCHMARKS.md section from {bench.part}.json in this folder")
    p.add_argument("--write", action="store_true", help="replace the section of BENCHMARKS.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        defaults = {k: p.get_default(k) for k in bench.tiny}
        for key, value in bench.tiny.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    return args


def gpu_report(bench: GpuBenchmark, folder: Path, write: bool) -> None:
    path = folder / f"{bench.part}.json"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run the benchmark with --out {folder} first")
    section = bench.markdown(json.loads(path.read_text()))
    print(section)
    if write:
        replace_section(f"gpu {bench.part}", section)


def run_gpu_benchmark(bench: GpuBenchmark, doc: str | None, script: str, argv=None) -> int:
    """A gpu_*.py script's main: in the parent, each chosen variant in a child process, then OUT/PART.json and its
    BENCHMARKS.md section (printed; replaced with --write); with --report, the section of earlier results."""
    args = gpu_parse(bench, doc, argv)
    log = logger(Path(script).stem)
    if args.child:
        work = Path(args.work)
        for key, value in json.loads((work / "args.json").read_text()).items():
            setattr(args, key, value)
        log(f"{bench.part}/{args.child}: start")
        start = time.perf_counter()
        out = bench.children[args.child](args, work)
        out["child_s"] = time.perf_counter() - start
        (work / f"{bench.part}-{args.child}.json").write_text(json.dumps(out))
        return 0
    if args.report:
        gpu_report(bench, Path(args.report), args.write)
        return 0
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    shown = sys.argv[1:] if argv is None else list(argv)
    meta = {"date": utc_now(), "gpu": gpu_description(), "cpu_cores": os.cpu_count(), "tiny": args.tiny,
            "versions": versions(("jax", "jaxlib", "flax", "optax", "torch", "transformers", "scipy")),
            "command": f"PYTHONPATH=. python benchmarks/{Path(script).name} " + shlex.join(shown)}
    # JAX takes device memory as it needs it (so its peak is its own) and may use nearly all of it.
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95",
           "TOKENIZERS_PARALLELISM": "false"}
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "work", "report", "write", "out")}
    part = bench.part
    with tempfile.TemporaryDirectory(prefix="gpu-bench-work-") as tmp:
        work = Path(tmp)
        (work / "args.json").write_text(json.dumps(settings))
        log(f"part {part}")
        result = {"meta": meta, "args": settings, "runs": {}}
        if bench.prepare is not None:
            result.update(bench.prepare(args, work))
        for variant in (bench.chosen(args) if bench.chosen else bench.children):
            command = [sys.executable, str(Path(script).resolve()), "--child", variant, "--work", str(work)]
            result["runs"][variant] = run_child(f"{part}-{variant}", command, work, env, timeout=args.child_timeout)
            if "error" in result["runs"][variant]:
                log(f"{part}/{variant} failed: {result['runs'][variant]['error']}")
        for variant in bench.children:
            result["runs"].setdefault(variant, {"error": "not run"})
        (out / f"{part}.json").write_text(json.dumps(result, indent=1))
        print(bench.markdown(result), flush=True)
    if args.write:
        gpu_report(bench, out, True)
    log(f"results in {out}")
    return 0
