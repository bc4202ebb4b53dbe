"""Scaling on paper: LLaVA-OneVision-72B on a TPU v5p-128 slice (issue 14, item 4). Nothing here runs on a TPU.

    PYTHONPATH=. .venv/bin/python benchmarks/scaling.py            # print the section
    PYTHONPATH=. .venv/bin/python benchmarks/scaling.py --write    # replace it in BENCHMARKS.md

From the `llava-onevision-qwen2-72b-ov-hf` preset (config.json only), the mesh tpu/presets.sh gives a 72B model on
that slice, `precise_jax.memory`'s per-device plans, FLOPs by `common.flop_parts`, and the utilisation our H100
runs measured (benchmarks/results/h100/*.json), it projects per-device memory and step times for capture and
masked SFT (lean and masked modes), and lists the meshes whose plan does not fit. Every published figure is quoted
from its specification, every assumption is printed with the section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    ROOT, begin, end, flop_parts, llava_config, logger, replace_section, text_config, utc_now,
)

KEY = "scaling: LLaVA-OneVision-72B on a TPU v5p-128 slice"
PRESET = "llava-onevision-qwen2-72b-ov-hf"
SLICE, MODEL_SIZE = "v5p-128", "72b"
# Google Cloud TPU v5p documentation (cloud.google.com/tpu/docs/v5p), quoted, not measured: per chip.
V5P = {"bf16_flops": 459e12, "hbm_bytes": 95e9, "hbm_bandwidth": 2765e9, "ici_bits": 4800e9, "tensorcores": 2}
# NVIDIA H100 SXM5 datasheet, quoted: dense bf16 tensor-core peak (1,979 TFLOP/s is the 2:4-sparse figure).
H100_PEAK = 989e12
H100_RESULTS = ROOT / "benchmarks" / "results" / "h100"
TOKENS = 1024  # every row: one 384 x 384 tile (729 image features) + 295 text tokens
CAPTURE_BATCH, TRAIN_BATCH = 128, 32  # global rows
REPLY_FRACTION = 0.5  # of each training row, as in the H100 train benchmark (the loss's LM head runs on these)
RATIO = 0.01  # shield's default per-layer neuron ratio: floor(0.01 * 29568) = 295 neurons per layer
OTHER_MESHES = [(64, 1, 1), (8, 8, 1), (4, 16, 1), (1, 64, 1), (4, 4, 4), (2, 8, 4), (1, 8, 8), (1, 4, 16)]

log = logger("scaling")


# ----------------------------------------------------------------------------------------------------- inputs


def slice_and_mesh() -> tuple[int, int, str, tuple[int, int, int]]:
    """(chips, hosts, mesh spec, mesh shape) of SLICE and MODEL_SIZE, read from tpu/presets.sh."""
    from precise_jax.distributed import mesh_shape

    text = (ROOT / "tpu" / "presets.sh").read_text()
    row = re.search(rf"^\s*{re.escape(SLICE)}\)\s*(.*?);;", text, re.M)
    mesh = re.search(rf"^\s*{MODEL_SIZE}\)\s*MESH=\"([^\"]+)\"", text, re.M)
    if row is None or mesh is None:
        raise SystemExit(f"tpu/presets.sh has no {SLICE} slice or {MODEL_SIZE} mesh preset")
    fields = dict(re.findall(r"(\w+)=([^;\s]+)", row.group(1)))
    chips, hosts = int(fields["CHIPS"]), int(fields["WORKERS"])
    return chips, hosts, mesh.group(1), mesh_shape(mesh.group(1), chips)


def train_flops(parts: dict, mlp_fraction: float, mode: str) -> float:
    """FLOPs of one training step from a forward's parts: the forward (LM head on reply positions only), the
    gradient of every activation down to the first trained weight (decoder layers x1, attention x2, head x1), and
    the weight gradients the mode needs (masked: the MLP matrices, x1 of their forward; full: everything)."""
    head = parts["head"] * REPLY_FRACTION
    vision = parts.get("vision", 0.0) + parts.get("projector", 0.0)
    forward = parts["lm"] + parts["attention"] + head + vision
    backward = parts["lm"] + 2 * parts["attention"] + head
    if mode == "masked":
        backward += mlp_fraction * parts["lm"]
    elif mode == "full":
        backward += parts["lm"] + head + 2 * vision
    return forward + backward


def mlp_share(params) -> float:
    """The MLPs' share of the decoder layers' parameters (what masked mode's weight gradients cover)."""
    from ports.presets import num_params

    layers = {k: v for k, v in params["lm"].items() if k.startswith("layers_")}
    return num_params({k: v["mlp"] for k, v in layers.items()}) / num_params(layers)


def h100_utilisation() -> dict:
    """Achieved fractions of the H100's published bf16 peak in our measured runs (BENCHMARKS.md's GPU sections)."""
    from ports.presets import build_abstract

    capture = json.loads((H100_RESULTS / "capture.json").read_text())
    trained = json.loads((H100_RESULTS / "train.json").read_text())
    run, batches = capture["runs"]["jax"], capture["args"]["capture_batches"]
    out = {"capture": run["flops_capture"] / (run["capture"]["median_s"] / batches) / H100_PEAK,
           "plain_xla": run["flops_plain"] / run["plain_xla"]["median_s"] / H100_PEAK,
           "capture_tokens_s": capture["args"]["capture_batch"] * capture["args"]["capture_tokens"]
           / (run["capture"]["median_s"] / batches)}
    rows, tokens = trained["args"]["train_batch"], trained["args"]["train_tokens"]
    text = build_abstract(text_config(llava_config(False)))
    parts = flop_parts(text.params, text.config, rows, tokens)
    for mode in ("lean", "full"):
        seconds = trained["runs"][f"jax-{mode}"]["median_s"]
        out[mode] = train_flops(parts, mlp_share(text.params), mode) / seconds / H100_PEAK
        out[f"{mode}_ms"] = seconds * 1e3
    out["train_shape"] = (rows, tokens)
    out["lean_peak"] = trained["runs"]["jax-lean"]["peak_device_bytes"]
    out["full_peak"] = trained["runs"]["jax-full"]["peak_device_bytes"]
    return out


# ----------------------------------------------------------------------------------------------------- projection


def communication(plan, task: str, d_model: int, layers: int) -> dict:
    """Bytes one device moves over ICI in a step: FSDP all-gathers of its fsdp group's weight shards (once per
    forward; training gathers again for the backward), the reduce-scatter of the gradients it computes, their
    all-reduce over `data`, and the tensor-parallel all-reduces of the [rows, tokens, d] layer outputs (attention
    and MLP: twice per layer forward, twice more backward); ring algorithms, (n - 1) / n of the data each way."""
    data, fsdp, tensor = plan.mesh
    passes = 1 if task == "capture" else 2
    gather = passes * plan.parameters * (fsdp - 1)
    scatter = plan.gradients * (fsdp - 1) + 2 * plan.gradients * (data - 1) / data
    activation = plan.rows * plan.tokens * d_model * 2  # bf16
    tp = 2 * passes * layers * 2 * (tensor - 1) / tensor * activation
    return {"all-gather": gather, "reduce-scatter": scatter, "tensor all-reduce": tp}


def project(plan, flops: float, utilisation: float, chips: int, d_model: int, layers: int) -> dict:
    comm = communication(plan, plan.task, d_model, layers)
    compute_s = flops / (chips * V5P["bf16_flops"] * utilisation)
    comm_s = sum(comm.values()) / (V5P["ici_bits"] / 8)
    step = max(compute_s, comm_s)
    return {"flops": flops, "compute_s": compute_s, "comm": comm, "comm_s": comm_s, "step_s": step,
            "serial_s": compute_s + comm_s, "tokens_s": plan.batch_size * plan.tokens / step,
            "peak_s": flops / (chips * V5P["bf16_flops"])}


def largest_fitting_batch(plan_at, step: int, limit: int = 512) -> int | None:
    best = None
    for batch in range(step, limit + 1, step):
        if plan_at(batch).total > V5P["hbm_bytes"]:
            break
        best = batch
    return best


# ----------------------------------------------------------------------------------------------------- report


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def mesh_name(mesh) -> str:
    return "data={},fsdp={},tensor={}".format(*mesh)


def markdown(r: dict) -> str:
    u, chips, hosts = r["utilisation"], r["chips"], r["hosts"]
    limit = V5P["hbm_bytes"]
    lines = [begin(KEY), "## Scaling on paper: LLaVA-OneVision-72B on a TPU v5p-128 slice", "",
             f"**A projection, not a measurement**: nothing here ran on a TPU. Written by `benchmarks/scaling.py` "
             f"({r['date']}) from the `{PRESET}` preset's config.json ({r['params']:,} parameters, bf16), "
             "`precise_jax.memory`'s per-device plans, and the utilisation our H100 runs achieved.", "",
             "### The slice (Google Cloud TPU v5p documentation, quoted from the published spec, not measured)", "",
             f"- v5p-128: slices are named by TensorCores; {V5P['tensorcores']} TensorCores per chip, so "
             f"{chips} chips (jax devices: one per chip, megacore) on {hosts} hosts (tpu/presets.sh: "
             f"WORKERS={hosts}, CHIPS={chips}); topology 4x4x4, one cube",
             f"- per chip: {V5P['bf16_flops'] / 1e12:.0f} TFLOP/s bf16 peak, {V5P['hbm_bytes'] / 1e9:.0f} GB HBM2e "
             f"({V5P['hbm_bandwidth'] / 1e9:,.0f} GB/s), inter-chip interconnect (ICI) {V5P['ici_bits'] / 1e9:,.0f} "
             f"Gbps = {V5P['ici_bits'] / 8e9:.0f} GB/s (a later revision of the page lists 95 GiB and 1,200 GB/s "
             "bidirectional; the smaller figures are used)",
             f"- mesh: tpu/presets.sh's `{MODEL_SIZE}` preset `{r['mesh_spec']}` on {chips} devices = "
             f"**{mesh_name(r['mesh'])}** (what `tpu/pod.sh run --slice {SLICE} --model-size {MODEL_SIZE}` sets as "
             "PRECISE_JAX_MESH)", "",
             "### Per-device memory on that mesh (`precise_jax.memory`, GiB; limit 95 GB = "
             f"{gib(limit)} GiB)", "",
             "| run | global batch × tokens | rows / device | parameters | trained copy / deltas | gradients | "
             "optimizer | activations | total | fits |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, plan in r["plans"].items():
        lines.append(f"| {name} | {plan.batch_size} × {plan.tokens} | {plan.rows} | {gib(plan.parameters)} | "
                     f"{gib(plan.trained)} | {gib(plan.gradients)} | {gib(plan.optimizer)} | "
                     f"{gib(plan.activations)} | **{gib(plan.total)}** | {'yes' if plan.total <= limit else 'NO'} |")
    lean_saved = r["plans"]["lean SFT"].parts["saved"]
    lines += ["", f"- largest global batch of {TOKENS}-token rows that fits (multiples of data × fsdp = "
              f"{r['mesh'][0] * r['mesh'][1]}): lean {r['largest']['lean']}, masked {r['largest']['masked']}; "
              f"capture {r['largest']['capture']} (searched up to 512)",
              f"- training activations are mostly the XLA attention path's saved scores (13 bytes per score per layer: "
              f"{gib(r['scores'])} of the lean run's {gib(lean_saved)} GiB saved): TPUs run the ports' XLA kernel "
              "(cuDNN's fused kernel is NVIDIA-only), so a fused TPU attention (a Pallas flash kernel) is what would "
              "raise the batch", "",
              "### Step time (projection)", "",
              "| run | model FLOPs / step | utilisation applied | compute s | ICI GB / device (all-gather, "
              "reduce-scatter, tensor all-reduce) | ICI s | **step s** = max | no-overlap s | at 100 % peak s | "
              "tokens/s, slice |",
              "|---|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, p in r["steps"].items():
        comm = ", ".join(f"{v / 1e9:.1f}" for v in p["comm"].values())
        lines.append(f"| {name} | {p['flops'] / 1e15:.1f} PFLOP | {p['utilisation_label']} | {p['compute_s']:.2f} | "
                     f"{comm} | {p['comm_s']:.3f} | **{p['step_s']:.2f}** | {p['serial_s']:.2f} | "
                     f"{p['peak_s']:.2f} | {p['tokens_s']:,.0f} |")
    cap = r["steps"]["capture"]
    lines += ["", f"- headline: capture of {CAPTURE_BATCH} × {TOKENS} tokens in **{cap['step_s']:.2f} s** per batch "
              f"(**{cap['tokens_s']:,.0f} tokens/s** on the slice, {cap['tokens_s'] / chips:,.0f} per chip); lean "
              f"SFT {TRAIN_BATCH} × {TOKENS} in **{r['steps']['lean SFT']['step_s']:.2f} s** per step, masked "
              f"**{r['steps']['masked SFT']['step_s']:.2f} s**: compute-bound, ICI time "
              f"{max(p['comm_s'] / p['compute_s'] for p in r['steps'].values()):.0%} of compute at most",
              f"- sensitivity: at the H100 XLA-attention forward's utilisation ({u['plain_xla']:.1%}) instead of "
              f"`collect`'s, capture takes {cap['flops'] / (chips * V5P['bf16_flops'] * u['plain_xla']):.2f} s", "",
              "### Other meshes on the 64 chips: which plans fit (the same runs, `precise_jax.memory`)", "",
              "| mesh | capture total GiB | lean SFT total GiB | masked SFT total GiB | fits |",
              "|---|---:|---:|---:|---|"]
    for mesh, plans in r["others"].items():
        fits = [p.total <= limit for p in plans]
        verdict = "all three" if all(fits) else "none" if not any(fits) else "capture only" if fits == [
            True, False, False] else ", ".join(n for n, f in zip(("capture", "lean", "masked"), fits) if f)
        lines.append(f"| {mesh_name(mesh)} | " + " | ".join(
            f"{gib(p.total)}" + ("" if f else " (no)") for p, f in zip(plans, fits)) + f" | {verdict} |")
    none = [mesh_name(m) for m, plans in r["others"].items() if all(p.total > limit for p in plans)]
    some = [mesh_name(m) for m, plans in r["others"].items()
            if any(p.total > limit for p in plans) and any(p.total <= limit for p in plans)]
    dp = r["others"][(chips, 1, 1)][0]
    fsdp = r["others"][(1, chips, 1)][1]
    lines += ["", f"- nothing fits on {', '.join(none)}: pure data parallelism keeps all {gib(dp.parameters)} GiB of "
              f"bf16 weights on every chip; only some runs fit on {', '.join(some)}",
              f"- tensor parallelism is what lets training fit: it splits the attention heads, whose saved scores "
              f"dominate the activations, and the MLP width; FSDP alone (fsdp={chips}) leaves every device all "
              f"{r['heads']} heads of its row, and lean SFT then needs {gib(fsdp.total)} GiB for one row per device",
              "",
              "### Utilisation measured on the H100 (BENCHMARKS.md's GPU sections, `benchmarks/results/h100/`)", "",
              f"- capture (`collect`, LLaVA-1.5-7B, 8 × 1024, cuDNN attention): {u['capture_tokens_s']:,.0f} tokens/s "
              f"= **{u['capture']:.1%}** of the H100's published {H100_PEAK / 1e12:.0f} TFLOP/s dense bf16 peak "
              f"(NVIDIA H100 SXM5 datasheet; the GPU sections' MFU is against a measured 796 TFLOP/s matrix "
              f"product instead); the plain forward on the XLA attention path: {u['plain_xla']:.1%}",
              f"- lean SFT step (Llama-2-7B shape, {u['train_shape'][0]} × {u['train_shape'][1]}, XLA attention): "
              f"{u['lean_ms']:.0f} ms = **{u['lean']:.1%}**; full-mode step {u['full_ms']:.0f} ms = "
              f"**{u['full']:.1%}** (applied to masked mode, which also computes weight gradients)",
              f"- the plan against those runs' measured peaks (1 H100): lean {gib(r['check']['lean'])} GiB planned "
              f"vs {gib(u['lean_peak'])} measured; full {gib(r['check']['full'])} GiB planned (one copy of the "
              f"weights: the benchmark frees the caller's) vs {gib(u['full_peak'])} measured", "",
              "### Assumptions", "",
              "1. The TPU figures are the published spec (quoted above), not measured; 95 GB is taken as all a chip "
              "can hold (XLA keeps a little for itself).",
              "2. Utilisation: the fraction of the published peak our JAX code reached on one H100 is taken to carry "
              "over to a v5p chip, per kind of work (capture: `collect`'s; lean: the lean step's; masked: the full "
              "step's). Different chip, compiler backend and attention kernel: the largest uncertainty here.",
              "3. Model FLOPs (`common.flop_parts`): 2 × parameters × tokens per matrix product, causal attention "
              "T²/2, vision tower per patch; training adds the activation gradients (decoder x1, attention x2) and "
              "the mode's weight gradients (masked: the MLPs, "
              f"{r['mlp_share']:.1%} of the decoder's weights); the LM head runs on the reply half of each row; "
              "capture needs no LM head.",
              f"4. Rows: {TOKENS} tokens, one 384 × 384 tile (729 features) per row, no padding; capture keeps no "
              "per-token site values (`collect` pools inside the step); SFT with neurons at shield's default ratio "
              f"({RATIO}: {r['neurons']:,} neurons), AdamW with moments in the trained tree's dtype.",
              "5. ICI: FSDP all-gathers each weight shard once per forward (training: again for the backward), "
              "reduce-scatters the computed gradients; tensor parallelism all-reduces each layer's attention and "
              "MLP outputs; ring algorithms at the chip's 600 GB/s, no latency. A collective confined to one torus "
              "axis gets less bandwidth; at these sizes ICI time stays well below compute either way.",
              "6. Step time = max(compute, ICI), i.e. full overlap (XLA's async collectives); the no-overlap column "
              "adds them. Host input, the optimizer's elementwise update and HBM-bound work are not modelled.",
              "7. Memory: `precise_jax.memory` with the XLA attention path (what a TPU runs); its activation "
              "estimate errs high by 1.1-2x against XLA on CPU (tests/precise_jax/test_memory.py).",
              end(KEY)]
    return "\n".join(lines) + "\n"


def run() -> dict:
    from ports.presets import build_abstract, load_preset, num_params
    from precise_jax import memory

    chips, hosts, spec, mesh = slice_and_mesh()
    config = load_preset(PRESET)
    lm = build_abstract(config)
    text = lm.decoder
    neurons = int(RATIO * text.intermediate_size) * text.num_layers
    log(f"{PRESET}: {num_params(lm.params):,} parameters; mesh {mesh_name(mesh)} on {chips} chips")

    def plan(kind: str, batch: int, on=mesh):
        task, mode = ("capture", None) if kind == "capture" else ("train", kind)
        made = memory.plan_memory(lm, on, task=task, mode=mode, neurons=neurons, batch_size=batch, tokens=TOKENS,
                                  images=1, attention="xla", limit=int(V5P["hbm_bytes"]))
        return dataclasses.replace(made, model=PRESET)

    plans = {"capture": plan("capture", CAPTURE_BATCH), "lean SFT": plan("lean", TRAIN_BATCH),
             "masked SFT": plan("masked", TRAIN_BATCH)}
    step = mesh[0] * mesh[1]
    largest = {kind: largest_fitting_batch(lambda b, kind=kind: plan(kind, b), step)
               for kind in ("capture", "lean", "masked")}
    others = {m: [plan("capture", CAPTURE_BATCH, m), plan("lean", TRAIN_BATCH, m), plan("masked", TRAIN_BATCH, m)]
              for m in [mesh] + [m for m in OTHER_MESHES if m != mesh]}
    utilisation = h100_utilisation()
    share = mlp_share(lm.params)
    steps = {}
    for name, p in plans.items():
        parts = flop_parts(lm.params, lm.config, p.batch_size, p.tokens)
        if p.task == "capture":
            flops, used, label = sum(v for k, v in parts.items() if k != "head"), utilisation["capture"], "capture"
        else:
            kind = "lean" if p.mode == "lean" else "full"
            flops, used, label = train_flops(parts, share, p.mode), utilisation[kind], f"{kind} step"
        steps[name] = project(p, flops, used, chips, text.hidden_size, text.num_layers)
        steps[name]["utilisation_label"] = f"{used:.1%} (H100 {label})"
    small = build_abstract(text_config(llava_config(False)))
    rows, tokens = utilisation["train_shape"]
    check = {mode: memory.plan_memory(small, (1, 1, 1), task="train", mode=mode, neurons=10 * small.decoder.num_layers,
                                      batch_size=rows, tokens=tokens, attention="xla", limit=None).total
             for mode in ("lean", "full")}
    check["full"] -= memory.shard_bytes(small.params)
    lean = plans["lean SFT"]
    heads = text.num_heads // mesh[2]
    scores = (text.num_layers - 1) * lean.rows * heads * TOKENS * TOKENS * 13
    return {"date": utc_now(), "chips": chips, "hosts": hosts, "mesh_spec": spec, "mesh": mesh,
            "params": num_params(lm.params), "plans": plans, "largest": largest, "others": others, "steps": steps,
            "utilisation": utilisation, "check": check, "mlp_share": share, "neurons": neurons, "scores": scores,
            "heads": text.num_heads}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="replace this script's section of BENCHMARKS.md")
    args = p.parse_args(argv)
    section = markdown(run())
    print(section)
    if args.write:
        replace_section(KEY, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
