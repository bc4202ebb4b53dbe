"""Masked-SFT step time and peak memory: the JAX trainer's masked, lean and full modes vs a PyTorch masked-SFT
baseline, on CPU.

    PYTHONPATH=. .venv/bin/python benchmarks/train_step.py [--batch 2] [--tokens 128] [--per-layer 10]
        [--repeats 10] [--warmup 2] [--model HF_FOLDER] [--threads N] [--only NAME ...] [--write]

Every variant runs in its own child process (so its peak RSS is its own), pinned to the same CPUs with the same
thread count: load the model in float32, build the step, warm up, then time `--repeats` steps on the same batch
of real chat text (AlpacaEval instruction + reference answer through the chat template, cut to `--tokens`; the
loss is on the answer's tokens). One step = forward, backward, clipping (global norm 1), AdamW (lr 1e-5, decoupled
weight decay 0.01 on the trained entries only). The neuron set is `--per-layer` random neurons in every layer:
the indices do not change the work, only the count does. The PyTorch baseline stays alive and alternates steps
with each JAX variant in turn, so each pair is timed under the same load from other processes. `--write`
replaces this configuration's section of BENCHMARKS.md (one section per thread count).

Variants: jax-masked (`train` mode masked: full tree, `masking.neuron_masked`), jax-lean (mode lean: neuron
deltas only), jax-full (every parameter), torch-masked (HF model, only the MLP matrices require grad, gradients
masked by `register_hook`, masked decoupled decay, `torch.optim.AdamW`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import (  # noqa: E402
    Child, begin as _begin, cpu_detail, cpu_model, end as _end, loadavg, logger, parent_setup, peak_rss_kib,
    protocol_stream, replace_section, rss_kib, serve_runs, stats, versions,
)

VARIANTS = ("jax-masked", "jax-lean", "jax-full", "torch-masked")
LR, WEIGHT_DECAY, MAX_NORM = 1e-5, 0.01, 1.0


log = logger("train_step")


# ----------------------------------------------------------------------------------------------------- inputs


def chat_batch(tokenizer, batch: int, tokens: int) -> dict:
    """[batch, tokens] ids and token types: the first AlpacaEval pairs whose chat encoding has >= `tokens` tokens
    and whose answer starts within the first half, cut to `tokens` (no padding)."""
    from ports.processing import TokenType, encode_chat
    from precise_jax.data import sources

    rows, names = [], []
    for example in sources.alpaca_eval():
        ids, types = encode_chat(tokenizer, example.prompt, example.response)
        reply = np.flatnonzero(types == TokenType.RESPONSE)
        if len(ids) >= tokens and len(reply) and reply[0] < tokens // 2:
            rows.append((ids[:tokens], types[:tokens]))
            names.append(example.id)
        if len(rows) == batch:
            break
    if len(rows) < batch:
        raise SystemExit(f"only {len(rows)} AlpacaEval examples have >= {tokens} tokens with the reply starting in "
                         "the first half; raise --tokens")
    return {"input_ids": np.stack([r[0] for r in rows]).astype(np.int32),
            "token_types": np.stack([r[1] for r in rows]).astype(np.int8), "ids": names}


def random_neurons(num_layers: int, width: int, per_layer: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {layer: np.sort(rng.choice(width, per_layer, replace=False)) for layer in range(num_layers)}


# ----------------------------------------------------------------------------------------------------- children
# A child builds its model and step, warms up, says "ready", then runs one timed step per "run" line from the
# parent and answers with its wall seconds.


def jax_train_step(lm, neurons: dict, mode: str, input_ids: np.ndarray, token_types: np.ndarray, total_steps: int,
                   release: bool = False):
    """(info, step) for the JAX trainer in `mode` on any backend: `step()` runs one donated, AOT-compiled step and
    returns its loss (waiting for it). `release=True` frees `lm.params` when the mode trains a copy of the whole
    tree (full, masked), so only one copy of the weights stays in device memory."""
    import jax
    import jax.numpy as jnp

    from precise_jax.neurons import NeuronSet
    from precise_jax.train import TrainConfig, make_plan, make_step

    c = lm.config
    neuron_set = NeuronSet(neurons, c.intermediate_size, c.num_layers,
                           {"model": lm.model_id})
    config = TrainConfig(mode=mode, learning_rate=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_NORM)
    info = {"total_params": sum(x.size for x in jax.tree_util.tree_leaves(lm.params))}
    plan = make_plan(lm, neuron_set, config, total_steps=total_steps)
    if release and plan.frozen is None:
        for leaf in jax.tree_util.tree_leaves(lm.params):
            leaf.delete()
        lm.params = None
    state = {"trained": plan.trained, "opt": plan.optimizer.init(plan.trained)}
    info["trainable"] = plan.count
    ids = jnp.asarray(input_ids)
    inputs = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    types = jnp.asarray(token_types)
    t0 = time.perf_counter()
    lowered = make_step(lm.model, plan).lower(state["trained"], state["opt"], plan.frozen, inputs, types)
    info["lower_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    info["compile_s"] = time.perf_counter() - t0
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")

    def step() -> float:
        state["trained"], state["opt"], loss = compiled(state["trained"], state["opt"], plan.frozen, inputs, types)
        return float(loss)  # waits for the step

    return info, step


def torch_train_step(model, neurons: dict, input_ids: np.ndarray, token_types: np.ndarray, mode: str = "masked"):
    """(info, step) for the PyTorch baseline on the model's device. masked: only the MLP matrices require grad,
    their gradients are masked to the neurons' rows (gate/up) and columns (down) by `register_hook`, decoupled
    decay is applied by hand to those entries, `torch.optim.AdamW`; full: every parameter, AdamW's own decay on
    matrices only (as the JAX trainer). `step()` returns the loss (waiting for it)."""
    import torch

    from ports.processing import TokenType

    device = next(model.parameters()).device
    model.train()  # the benchmarked models have no dropout: train() only matters for what hooks and autograd see
    info = {"attn_implementation": model.config._attn_implementation, "total_params":
            sum(p.numel() for p in model.parameters())}
    masked = []  # (weight, mask broadcastable to it: a column [out, 1] or a row [1, in])
    if mode == "masked":
        for p in model.parameters():
            p.requires_grad_(False)
        for layer, block in enumerate(model.model.layers):
            idx, mlp = torch.from_numpy(neurons[layer]).to(device), block.mlp
            for name in ("gate_proj", "up_proj", "down_proj"):
                weight = getattr(mlp, name).weight  # HF (out, in): neuron i is row i of gate/up, column i of down
                shape = (1, weight.shape[1]) if name == "down_proj" else (weight.shape[0], 1)
                mask = torch.zeros(shape, dtype=weight.dtype, device=device)
                mask.view(-1)[idx] = 1.0
                weight.requires_grad_(True)
                weight.register_hook(lambda grad, m=mask: grad * m)
                masked.append((weight, mask))
        trained = [w for w, _ in masked]
        # Decay is applied by hand on the neurons' entries: AdamW's own would move every entry of the matrices.
        optimizer = torch.optim.AdamW(trained, lr=LR, weight_decay=0.0)
        info["trainable"] = int(sum(m.sum().item() * w.numel() / m.numel() for w, m in masked))
    elif mode == "full":
        trained = [p for p in model.parameters()]
        groups = [{"params": [p for p in trained if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
                  {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=LR)
        info["trainable"] = info["total_params"]
    else:
        raise ValueError(f"torch_train_step: mode {mode!r} is neither 'masked' nor 'full'")
    ids = torch.from_numpy(input_ids.astype(np.int64)).to(device)
    attention = torch.ones_like(ids)
    reply = torch.from_numpy(token_types[:, 1:] == TokenType.RESPONSE).to(device)  # [B, T-1] targets that count

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][reply].float(), ids[:, 1:][reply])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, MAX_NORM)
        with torch.no_grad():
            for weight, mask in masked:
                weight.addcmul_(weight, mask, value=-LR * WEIGHT_DECAY)
        optimizer.step()
        return loss.detach().item()

    return info, step


def setup_jax(args, data: dict, neurons: dict):
    import jax
    import jax.numpy as jnp

    from ports import load_pretrained

    t0 = time.perf_counter()
    lm = load_pretrained(args.model, jnp.float32)
    jax.block_until_ready(lm.params)
    info = {"load_s": time.perf_counter() - t0, "rss_after_load_kib": rss_kib()}
    more, step = jax_train_step(lm, neurons, args.child.split("-")[1], data["input_ids"], data["token_types"],
                                total_steps=args.warmup + args.repeats + 1)
    info.update(more, rss_after_compile_kib=rss_kib())
    return info, step


def setup_torch(args, data: dict, neurons: dict):
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    info = {"load_s": time.perf_counter() - t0, "rss_after_load_kib": rss_kib(),
            "torch_num_threads": torch.get_num_threads()}
    more, step = torch_train_step(model, neurons, data["input_ids"], data["token_types"])
    info.update(more)
    return info, step


def child(args) -> None:
    work = Path(args.work)
    protocol = protocol_stream()
    data = dict(np.load(work / "batch.npz"))
    neurons = {int(k): v for k, v in np.load(work / "neurons.npz").items()}
    log(f"{args.child}: loading and building the step")
    info, step = (setup_torch if args.child.startswith("torch") else setup_jax)(args, data, neurons)
    t0 = time.perf_counter()
    losses = [step()]
    info["first_step_s"] = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        losses.append(step())
    wall, cpu, _ = serve_runs(protocol, lambda: losses.append(step()) or losses[-1], args.child, log,
                              note=lambda loss: f", loss {loss:.5f}")
    info.update(stats(wall), peak_rss_kib=peak_rss_kib(), cpu_s=cpu, median_cpu_s=float(np.median(cpu)),
                losses=losses)
    (work / f"{args.child}.json").write_text(json.dumps(info))


def start(variant: str, args, work: Path) -> Child:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--work", str(work),
               "--model", str(args.model), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
               "--threads", str(args.threads)]
    return Child(variant, command, work)


def measure(variants: list[str], args, work: Path) -> tuple[dict, dict]:
    """The PyTorch baseline stays alive while each JAX variant is started in turn (alone, so at most two models
    are in memory) and alternates its timed steps with the baseline's: each pair is measured under the same load.

    Returns (per-variant results, {JAX variant: the baseline's step times while paired with it}).
    """
    baseline = start("torch-masked", args, work) if "torch-masked" in variants else None
    paired = {}
    runs = {}
    for variant in (v for v in variants if v != "torch-masked"):
        log(f"starting {variant}")
        child_ = start(variant, args, work)
        paired[variant] = []
        for r in range(args.repeats):
            log(f"{variant}: repetition {r + 1}/{args.repeats}")
            for c in ([child_, baseline] if r % 2 == 0 else [baseline, child_]):
                if c is baseline and c is not None:
                    paired[variant].append(float(c.run()))
                elif c is not None:
                    c.run()
        runs[variant] = child_.finish()
    if baseline is not None:
        if not paired:  # the baseline alone
            for _ in range(args.repeats):
                baseline.run()
        runs["torch-masked"] = baseline.finish()
    return runs, paired


# ----------------------------------------------------------------------------------------------------- report


def table(result: dict) -> str:
    n = result["batch"] * result["tokens"]
    mib = lambda kib: f"{kib / 1024:,.0f}"  # noqa: E731
    lines = ["| variant | s / step: median [IQR] | tokens/s | CPU s / step | peak RSS MiB | RSS after load MiB "
             "| trainable params | compile s | loss: first → last |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name in result["variants"]:
        r = result["runs"][name]
        compile_s = f"{r['lower_s'] + r['compile_s']:.1f}" if "compile_s" in r else "–"
        lines.append(
            f"| {name} | {r['median_s']:.3f} [{r['q1_s']:.3f}, {r['q3_s']:.3f}] | {n / r['median_s']:,.0f} | "
            f"{r['median_cpu_s']:.2f} | {mib(r['peak_rss_kib'])} | {mib(r['rss_after_load_kib'])} | "
            f"{r['trainable']:,} ({r['trainable'] / r['total_params']:.4%}) | {compile_s} | "
            f"{r['losses'][0]:.5f} → {r['losses'][-1]:.5f} |")
    return "\n".join(lines)


def ratios(result: dict) -> list[str]:
    """Per JAX variant: speed against the baseline's steps taken while paired with it, and peak-RSS ratio."""
    runs = result["runs"]
    if "torch-masked" not in runs:
        return []
    torch_rss = runs["torch-masked"]["peak_rss_kib"]
    lines = []
    for name, times in result["paired"].items():
        torch_s, jax_s = float(np.median(times)), runs[name]["median_s"]
        lines.append(f"{name}: {torch_s / jax_s:.2f}× the PyTorch masked step's speed ({jax_s:.3f} s vs "
                     f"{torch_s:.3f} s, PyTorch timed alternately with it), peak RSS "
                     f"{runs[name]['peak_rss_kib'] / torch_rss:.2f}× PyTorch's")
    return lines


def markdown(result: dict) -> str:
    v, key = result["versions"], section_key(result)
    torch_threads = result["runs"].get("torch-masked", {}).get("torch_num_threads", "–")
    lines = "\n".join(f"- **{line}**" for line in ratios(result))
    return f"""{_begin(key)}
## Masked-SFT train step, float32, batch {result['batch']} × {result['tokens']} tokens, {result['model_name']}, {len(result['cpus'].split(','))} thread(s)

- date: {result['date']}
- device: {result['cpu']} ({result['cpu_detail']}), {result['cores']} cores
- versions: python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, optax {v['optax']}, torch {v['torch']}, transformers {v['transformers']}
- command: `{result['command']}`
- input: {result['batch']} AlpacaEval (instruction, reference answer) pairs ({', '.join(result['examples'])}) through the chat template, cut to {result['tokens']} tokens, no padding; loss on the answer tokens
- neurons: {result['per_layer']} random neurons in each of the {result['layers']} layers ({result['neurons']} in all); trained entries: gate/up rows and down columns
- step: forward + backward + clip by global norm {MAX_NORM} + AdamW (lr {LR}, decoupled weight decay {WEIGHT_DECAY} on trained matrix entries only); JAX: one jitted, donated step (`precise_jax.train.make_step`, AOT-compiled); PyTorch: eager, `sdpa`, MLP matrices `requires_grad`, gradients masked by `register_hook`, decay masked by hand, `torch.optim.AdamW`
- threads: every child pinned to CPUs {result['cpus']}; torch.set_num_threads({torch_threads}); XLA CPU: its default pool over those CPUs
- {result['repeats']} timed steps per JAX variant after {result['warmup']} warm-up step(s); the PyTorch child stays alive and alternates steps with each JAX child in turn (at most two models in memory), so each ratio below compares steps taken under the same load; load average {result['loadavg']} before, {result['loadavg_after']} after

{table(result)}

{lines}
- the first loss is the same model on the same batch in every variant (a check that all compute the same thing); later losses differ by mode (full trains every parameter)
{_end(key)}
"""


def section_key(result: dict) -> str:
    return (f"train_step {result['model_name']} b{result['batch']} t{result['tokens']} n{result['per_layer']} "
            f"threads{len(result['cpus'].split(','))}")


def write_results(result: dict) -> None:
    """Replace (or append) this configuration's section of BENCHMARKS.md, leaving every other section alone."""
    replace_section(section_key(result), markdown(result))


# ----------------------------------------------------------------------------------------------------- main


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--per-layer", type=int, default=10, help="random neurons per layer")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (JAX: after compiling)")
    p.add_argument("--model", help="a Hugging Face folder (default: the real SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, help="CPUs to pin every child to (default: all this process may use)")
    p.add_argument("--only", nargs="+", choices=VARIANTS, help="run these variants only")
    p.add_argument("--write", action="store_true", help="replace this configuration's section of BENCHMARKS.md")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        child(args)
        return 0
    cpus = parent_setup(args)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    config = json.loads((Path(args.model) / "config.json").read_text())
    data = chat_batch(tokenizer, args.batch, args.tokens)
    neurons = random_neurons(config["num_hidden_layers"], config["intermediate_size"], args.per_layer)
    log(f"input: {data['ids']}; row 0 begins {tokenizer.decode(data['input_ids'][0, :24])!r}")
    load_before = loadavg()
    variants = list(args.only or VARIANTS)
    with tempfile.TemporaryDirectory(prefix="train-step-bench-") as tmp:
        work = Path(tmp)
        np.savez(work / "batch.npz", input_ids=data["input_ids"], token_types=data["token_types"])
        np.savez(work / "neurons.npz", **{str(k): v for k, v in neurons.items()})
        runs, paired = measure(variants, args, work)
    argv_shown = sys.argv[1:] if argv is None else list(argv)
    result = {
        "runs": runs, "paired": paired, "variants": variants, "batch": args.batch, "tokens": args.tokens,
        "repeats": args.repeats,
        "warmup": args.warmup, "per_layer": args.per_layer, "layers": len(neurons),
        "neurons": sum(len(v) for v in neurons.values()), "examples": data["ids"], "model": args.model,
        "model_name": Path(args.model).name,
        "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        "cpu": cpu_model(), "cpu_detail": cpu_detail(), "cores": os.cpu_count(), "cpus": ",".join(map(str, cpus)),
        "loadavg": load_before, "loadavg_after": loadavg(),
        "versions": versions(("jax", "jaxlib", "flax", "optax", "torch", "transformers")),
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/train_step.py " + shlex.join(argv_shown),
    }
    print(table(result))
    for line in ratios(result):
        print(line)
    if args.write:
        write_results(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
