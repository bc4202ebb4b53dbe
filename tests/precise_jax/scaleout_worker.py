"""Scale-out checks run in a subprocess, since the CPU device count is fixed when jax starts.

    python scaleout_worker.py devices CHECKPOINT OUT.json       # 8 CPU devices in one process
    python scaleout_worker.py process CHECKPOINT OUT_DIR        # one of 2 jax.distributed processes (env)
    python scaleout_worker.py commands DEVICES MODEL OUT_DIR MESH NAME...   # `precise-jax` commands (COMMANDS)

Each writes JSON facts (errors between sharded and single-device results, bytes read, shardings, exit codes)
that test_distributed.py asserts on.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()

import jax  # noqa: E402

if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", {"devices": 8, "process": 2}.get(sys.argv[1]) or int(sys.argv[2]))

import numpy as np  # noqa: E402

from ports import load_pretrained  # noqa: E402
from ports.processing import TokenType  # noqa: E402
from ports.weights import Checkpoint, flatten  # noqa: E402
from precise_jax import distributed  # noqa: E402
from precise_jax.capture import collect  # noqa: E402

SITES = ("lm.layers.0.mlp.act", "lm.layers.1.mlp.act", "lm.layers.1.resid")
COVARIANCE = ("lm.layers.1.resid",)


def random_batch(seed: int, rows: int = 8, tokens: int = 10, vocab: int = 96) -> dict:
    """Left-padded rows of random ids: template, prompt and reply tokens, a few pads."""
    rng = np.random.default_rng(seed)
    pads = rng.integers(0, 4, rows)
    types = np.full((rows, tokens), TokenType.PROMPT, np.int32)
    types[:, -3:] = TokenType.RESPONSE
    for r, p in enumerate(pads):
        types[r, :p] = TokenType.PAD
        types[r, p:p + 2] = TokenType.TEMPLATE
    return {"input_ids": rng.integers(1, vocab, (rows, tokens)).astype(np.int32),
            "attention_mask": (types != TokenType.PAD).astype(np.int32), "token_types": types}


def moments_error(a, b) -> float:
    """Largest error of two {site: Moments}, relative to each field's scale."""
    worst = 0.0
    for site in a:
        for field in ("count", "mean", "m2", "positive", "maximum", "comoment"):
            x, y = getattr(a[site], field), getattr(b[site], field)
            if x is None:
                continue
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            worst = max(worst, float(np.max(np.abs(x - y)) / max(1.0, float(np.max(np.abs(x))))))
    return worst


def tree_error(a, b) -> float:
    fa, fb = flatten(jax.device_get(a)), flatten(jax.device_get(b))
    assert fa.keys() == fb.keys()
    return max(float(np.max(np.abs(np.asarray(fa[k], np.float64) - np.asarray(fb[k], np.float64)))) for k in fa)


def specs(tree) -> dict:
    return {k: str(v.sharding.spec) for k, v in flatten(tree).items()}


def stats_of(lm, batches, mesh=None) -> dict:
    return collect(lm, batches, SITES, covariance=COVARIANCE, progress=False, mesh=mesh).stats


# ----------------------------------------------------------------------------------------------------- devices


def on_devices(checkpoint: str, out: str) -> None:
    from precise_jax.neurons import select_safety_neurons
    from precise_jax.subspace import build_subspace, generalized_eigh
    from precise_jax.train import TrainConfig, make_plan, make_step

    mesh = distributed.make_mesh((2, 2, 2))
    single = load_pretrained(checkpoint)
    sharded = load_pretrained(checkpoint, mesh=mesh)
    facts = {"devices": jax.device_count(), "load_error": tree_error(single.params, sharded.params),
             "param_specs": specs(sharded.params)}

    # Statistics: the same rows, whole on one device vs split over data x fsdp with tensor-sharded weights.
    harmful, benign = [random_batch(1), random_batch(2)], [random_batch(3), random_batch(4)]
    ref = {"harmful": stats_of(single, harmful), "benign": stats_of(single, benign)}
    got = {name: stats_of(sharded, [distributed.host_batch(mesh, b) for b in batches], mesh)
           for name, batches in (("harmful", harmful), ("benign", benign))}
    facts["stats_error"] = max(moments_error(ref[n], got[n]) for n in ref)
    facts["examples"] = int(got["harmful"][SITES[0]].count)

    # NeuronSets from either: the same neurons.
    pick = dict(score="plnd", ratio=0.1, metadata={"model": str(single.source)})
    neurons_ref = select_safety_neurons(single.params, ref["harmful"], ref["benign"], **pick)
    neurons_got = select_safety_neurons(sharded.params, got["harmful"], got["benign"], **pick)
    facts["neurons_equal"] = neurons_ref.pairs() == neurons_got.pairs()
    facts["neurons"] = len(neurons_ref)

    # One masked AdamW step: FSDP x tensor parameters, optimizer state (masks included) sharded like them.
    config = TrainConfig(mode="masked", steps=1, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.5)
    batch = random_batch(5)
    results = {}
    for name, lm in (("single", single), ("sharded", sharded)):
        plan = make_plan(lm, neurons_ref, config, total_steps=1)
        state = plan.optimizer.init(plan.trained)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        types = batch["token_types"]
        if name == "sharded":
            state = jax.device_put(state, distributed.param_shardings(state, mesh))
            placed = distributed.host_batch(mesh, batch)
            inputs, types = {k: placed[k] for k in inputs}, placed["token_types"]
            facts["state_specs"] = {"/".join(map(str, p)): str(leaf.sharding.spec) for p, leaf in
                                    jax.tree_util.tree_leaves_with_path(state) if np.ndim(leaf) == 2}
        trained, _, loss = make_step(lm.model, plan)(plan.trained, state, plan.frozen, inputs, types)
        results[name] = (trained, float(loss))
    facts["step_error"] = tree_error(results["single"][0], results["sharded"][0])
    facts["loss_error"] = abs(results["single"][1] - results["sharded"][1])
    facts["step_changed"] = tree_error(results["single"][0], single.params)
    facts["trained_specs"] = specs(results["sharded"][0])

    # A fitted subspace from sharded statistics, and the generalized eigenproblem on sharded covariances.
    site = COVARIANCE[0]
    sub_ref = build_subspace(ref["benign"][site], ref["harmful"][site], k=3, shrinkage=0.1)
    sub_got = build_subspace(got["benign"][site], got["harmful"][site], k=3, shrinkage=0.1)
    facts["projector_error"] = float(np.max(np.abs(sub_ref.basis @ sub_ref.basis.T - sub_got.basis @ sub_got.basis.T)))
    facts["eigenvalue_error"] = float(np.max(np.abs(sub_ref.eigenvalues - sub_got.eigenvalues)
                                             / np.maximum(1.0, np.abs(sub_ref.eigenvalues))))
    cov_b, cov_m = (got[n][site].covariance() for n in ("benign", "harmful"))
    on_mesh = distributed.NamedSharding(mesh, distributed.P("fsdp", "tensor"))
    w_ref, _ = generalized_eigh(np.asarray(cov_m), np.asarray(cov_b), k=3, shrinkage=0.1)
    w_got, _ = generalized_eigh(jax.device_put(cov_m, on_mesh), jax.device_put(cov_b, on_mesh), k=3, shrinkage=0.1)
    facts["sharded_eigh_error"] = float(np.max(np.abs(np.asarray(w_ref) - np.asarray(w_got))
                                               / np.maximum(1.0, np.abs(np.asarray(w_ref)))))
    Path(out).write_text(json.dumps(facts, indent=1))


# ----------------------------------------------------------------------------------------------------- processes


class CountingCheckpoint(Checkpoint):
    """Counts the bytes and the whole-tensor reads a process makes."""

    bytes_read = 0
    whole_reads = 0

    def read(self, key, index):
        part = super().read(key, index)
        CountingCheckpoint.bytes_read += part.nbytes
        return part

    def get(self, key):
        CountingCheckpoint.whole_reads += 1
        return super().get(key)


def in_process(checkpoint: str, out_dir: str) -> None:
    import dataclasses

    import ports.pretrained
    from ports.weights import load_params

    imported = time.perf_counter() - STARTED
    assert distributed.initialize()  # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    me = jax.process_index()
    clock = [time.perf_counter()]
    laps = {"import": round(imported, 2), "initialize": round(clock[0] - STARTED - imported, 2)}

    def lap():
        clock.append(time.perf_counter())
        return round(clock[-1] - clock[-2], 2)

    mesh = distributed.make_mesh("fsdp")  # 4 devices, 2 in each process: every matrix split across processes
    ports.pretrained.Checkpoint = CountingCheckpoint
    lm = load_pretrained(checkpoint, mesh=mesh)
    ports.pretrained.Checkpoint = Checkpoint
    read, whole_reads = CountingCheckpoint.bytes_read, CountingCheckpoint.whole_reads
    laps["load"] = lap()
    # What this process's devices hold, each distinct part counted once: all it should have read.
    needed = sum(len({str(s.index) for s in leaf.addressable_shards}) * leaf.addressable_shards[0].data.nbytes
                 for leaf in jax.tree_util.tree_leaves(lm.params))

    # Every shard this process holds equals the same part of the whole tensor, read here without jax.
    whole = Checkpoint(checkpoint)
    total = sum(whole.get(k).nbytes for k in whole.keys())
    family = lm.family
    expected = {p: v.shape for p, v in flatten(lm.params).items()}
    reference = load_params(whole, family.weight_rules(lm.config), expected, lambda _, a: np.asarray(a, np.float32))
    full = dataclasses.replace(lm, params=reference)  # numpy leaves: jit places them on one device
    shard_error = 0.0
    for path, leaf in flatten(lm.params).items():
        whole_leaf = flatten(reference)[path]
        for shard in leaf.addressable_shards:
            shard_error = max(shard_error, float(np.max(np.abs(np.asarray(shard.data) - whole_leaf[shard.index]))))

    # Statistics: each process feeds its own 4 rows of each global batch of 8; compare with all 8 rows on one device.
    batches = [random_batch(11), random_batch(12)]
    mine = [{k: v[4 * me:4 * me + 4] for k, v in b.items()} for b in batches]
    got = stats_of(lm, mine, mesh)
    ref = stats_of(full, batches)
    laps["stats"] = lap()

    # Orbax: every process writes its shards, then restores them into the same layout.
    target = Path(out_dir) / "orbax"
    distributed.save_params(target, lm.params)
    restored = distributed.restore_params(target, lm.params, mesh)
    restore_error = max(float(np.max(np.abs(np.asarray(a.data) - np.asarray(b.data))))
                        for x, y in zip(jax.tree_util.tree_leaves(lm.params), jax.tree_util.tree_leaves(restored))
                        for a, b in zip(x.addressable_shards, y.addressable_shards))
    laps["orbax"] = lap()
    same_layout = all(x.sharding == y.sharding for x, y in
                      zip(jax.tree_util.tree_leaves(lm.params), jax.tree_util.tree_leaves(restored)))
    facts = {"process": me, "processes": jax.process_count(), "devices": jax.device_count(),
             "local_devices": jax.local_device_count(), "bytes_read": read, "bytes_needed": needed,
             "whole_reads": whole_reads,
             "checkpoint_bytes": total, "shard_error": shard_error, "stats_error": moments_error(ref, got),
             "examples": int(got[SITES[0]].count), "restore_error": restore_error, "same_layout": same_layout,
             "seconds": laps}
    (Path(out_dir) / f"process{me}.json").write_text(json.dumps(facts))
    jax.distributed.shutdown()


# ----------------------------------------------------------------------------------------------------- commands

# Each command's options besides --model, --limit, --max-tokens and --out OUT_DIR/NAME (a space as -); in order,
# as later ones read what earlier ones wrote ({out}: OUT_DIR).
COMMANDS = {
    "locate": ["locate", "--ratio", "0.1"],
    "ablate": ["ablate", "--neurons", "{out}/locate/neurons.json", "--random-seeds", "2", "--max-new-tokens", "4"],
    "align": ["align", "--neurons", "{out}/locate/neurons.json", "--epochs", "1", "--learning-rate", "1e-2"],
    "care diagnose": ["care", "diagnose", "--components", "block", "--window", "1", "--span", "1"],
    "care fit": ["care", "fit", "--layers", "1", "--k", "2"],
    "care generate": ["care", "generate", "--subspaces", "{out}/care-fit/subspaces.safetensors", "--alpha", "4",
                      "--max-new-tokens", "4"],
}


def run_commands(devices: str, model: str, out: str, mesh: str, *names: str) -> None:
    """The commands on this process's devices, on `mesh` ("none": no --mesh): exit codes to OUT_DIR/codes-{process}."""
    from precise_jax.cli import main

    distributed.initialize()  # from the environment, when it describes two processes
    codes = {}
    for name in names:
        argv = [a.format(out=out) for a in COMMANDS[name]] + [
            "--model", model, "--limit", "8", "--max-tokens", "256", "--out", f"{out}/{name.replace(' ', '-')}"]
        codes[name] = main(argv + ([] if mesh == "none" else ["--mesh", mesh]))
    assert jax.device_count() == int(devices) * jax.process_count()
    (Path(out) / f"codes-{jax.process_index()}.json").write_text(json.dumps(codes))


if __name__ == "__main__":
    {"devices": on_devices, "process": in_process, "commands": run_commands}[sys.argv[1]](*sys.argv[2:])
