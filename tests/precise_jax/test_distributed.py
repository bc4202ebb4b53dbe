"""Scale-out: meshes, logical axis rules, sharded loading, and sharded methods equal to one device.

The 8-device checks and the two-process jax.distributed run need their own interpreters (the CPU device count is
fixed when jax starts): `scaleout_worker.py` runs them, all three processes at once, and writes facts asserted here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh
from safetensors.numpy import load_file, save_file

from ports.errors import InputError
from ports.presets import PRESETS, build_abstract, load_preset, write_random_checkpoint
from ports.weights import CONV, LINEAR, Checkpoint, _slice_reader, flatten
from precise_jax import distributed

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("scaleout_worker.py")
TINY_LLAMA = {"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "tie_word_embeddings": False}


# ----------------------------------------------------------------------------------------------------- meshes


def test_mesh_shapes_from_presets_and_specs():
    assert distributed.mesh_shape("fsdp", 8) == (1, 8, 1)
    assert distributed.mesh_shape("fsdp-tensor2", 16) == (1, 8, 2)
    assert distributed.mesh_shape("data2-fsdp", 64) == (2, 32, 1)
    assert distributed.mesh_shape("data=2,fsdp=-1,tensor=2", 8) == (2, 2, 2)
    assert distributed.mesh_shape({"tensor": 4}, 4) == (1, 1, 4)
    assert distributed.mesh_shape((1, 1, 1), 1) == (1, 1, 1)


@pytest.mark.parametrize("spec, devices, words", [
    ((2, 2, 2), 4, "needs 8 devices but there are 4"),
    ("fsdp-tensor4", 6, "not a multiple of 4"),
    ("data=2,fsdp=two", 8, "'data=N,fsdp=N,tensor=N'"),
    ("pipeline=2", 2, "'data=N,fsdp=N,tensor=N'"),
    ((-1, -1, 1), 8, "at most one may be -1"),
    ((2, 2), 4, "3 sizes"),
    ({"expert": 2}, 2, "unknown"),
])
def test_bad_mesh_specs_say_what_to_do(spec, devices, words):
    with pytest.raises(InputError) as error:
        distributed.mesh_shape(spec, devices)
    assert words in str(error.value)


def test_initialize_is_a_no_op_on_one_process(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False


# ----------------------------------------------------------------------------------------------------- rules


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_large_parameter_of_the_real_presets_is_sharded(preset):
    """On a 2 x 4 x 2 mesh: each spec divides its dimension, and no matrix of a million entries is replicated."""
    mesh = AbstractMesh((2, 4, 2), distributed.AXES)
    params = flatten(build_abstract(two_layers(load_preset(preset))).params)
    replicated = []
    for path, leaf in params.items():
        spec = distributed.spec_for(distributed.logical_axes(path, leaf.ndim), leaf.shape, mesh)
        for size, axes in zip(leaf.shape, tuple(spec) + (None,) * (leaf.ndim - len(spec))):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            assert size % int(np.prod([mesh.shape[a] for a in axes])) == 0, (path, spec)
        if leaf.size >= 1 << 20 and all(a is None for a in spec):
            replicated.append(path)
    assert replicated == []
    assert sum("vision/" in p for p in params) > 0


def two_layers(config: dict) -> dict:
    """The real-size architecture with 2 layers per tower, to trace quickly: every kind of parameter is there."""
    config = json.loads(json.dumps(config))
    for part in (config, config.get("vision_config", {})):
        for key in ("num_hidden_layers", "depth"):
            if key in part:
                part[key] = 2
    if "text_config" in config:
        config["text_config"]["num_hidden_layers"] = 2
    return config


def test_logical_axes_of_each_kind_of_parameter():
    axes = distributed.logical_axes
    assert axes("lm/embed_tokens/embedding", 2) == ("vocab", "embed")
    assert axes("lm/layers_3/self_attn/q_proj/kernel", 2) == ("embed", "heads")
    assert axes("vision/layers_0/self_attn/qkv/bias", 1) == ("heads",)
    assert axes("vision/layers_0/self_attn/proj/kernel", 2) == ("heads", "embed")
    assert axes("lm/layers_3/mlp/gate_proj/kernel", 2) == ("embed", "mlp")
    assert axes("lm/layers_3/mlp/down_proj/kernel", 2) == ("mlp", "embed")
    assert axes("vision/layers_1/mlp/fc2/kernel", 2) == ("mlp", "embed")
    assert axes("lm/layers_3/input_layernorm/weight", 1) == ("norm",)
    assert axes("vision/patch_embed/proj/kernel", 5) == ("conv",) * 4 + ("embed",)
    assert axes("vision/embeddings/patch_embedding/kernel", 4) == ("conv",) * 3 + ("embed",)
    # An optimizer state's moments and masks sit under a prefix and get their parameter's axes.
    assert axes("neurons/lm/layers_0/mlp/up_proj/kernel", 2) == ("embed", "mlp")
    assert axes("image_newline", 1) == (None,)


# ----------------------------------------------------------------------------------------------------- slices


@pytest.mark.parametrize("transform, hf_shape", [(LINEAR, (12, 8)), (CONV, (6, 3, 4, 2)), (CONV, (6, 3, 2, 4, 2))])
def test_a_slice_in_the_port_layout_reads_the_matching_slice_of_the_hf_tensor(tmp_path, transform, hf_shape):
    tensor = np.random.default_rng(0).standard_normal(hf_shape).astype(np.float32)
    save_file({"w": tensor}, str(tmp_path / "model.safetensors"))
    port = transform.to_port(tensor)
    read = _slice_reader(Checkpoint(tmp_path), "w", transform, hf_shape, np.float32)
    rng = np.random.default_rng(1)
    for _ in range(6):
        index = []
        for size in port.shape:
            a = int(rng.integers(0, size))
            index.append(slice(None) if rng.random() < 0.3 else slice(a, int(rng.integers(a + 1, size + 1))))
        np.testing.assert_array_equal(read(tuple(index)), port[tuple(index)])


# ----------------------------------------------------------------------------------------------------- sharded runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(jobs: dict[str, subprocess.Popen], timeout: float) -> dict[str, str]:
    """Wait for every job (killed after `timeout` s); assert they all succeeded; their stderr by name."""
    errors, failures = {}, []
    for name, job in jobs.items():
        try:
            _, err = job.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            job.kill()
            _, err = job.communicate()
        errors[name] = err.decode()
        if job.returncode != 0:
            failures.append(f"{name} exited {job.returncode}:\n{errors[name][-3000:]}")
    assert not failures, "\n".join(failures)
    return errors


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the 8-device run and the two-process run together; wait for both; return their facts."""
    work = tmp_path_factory.mktemp("scaleout")
    checkpoint = write_random_checkpoint(TINY_LLAMA, work / "tiny-llama", dtype="float32", seed=3)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    port = _free_port()
    jobs = {"devices": subprocess.Popen([sys.executable, str(WORKER), "devices", str(checkpoint),
                                         str(work / "devices.json")], env=env, stderr=subprocess.PIPE)}
    for i in range(2):
        cluster = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
        jobs[f"process{i}"] = subprocess.Popen([sys.executable, str(WORKER), "process", str(checkpoint), str(work)],
                                               env={**env, **cluster}, stderr=subprocess.PIPE)
    finish(jobs, timeout=400)
    return {"devices": json.loads((work / "devices.json").read_text()),
            "processes": [json.loads((work / f"process{i}.json").read_text()) for i in range(2)]}


def test_eight_devices_equal_one_device(runs):
    facts = runs["devices"]
    assert facts["devices"] == 8
    assert facts["load_error"] == 0.0
    specs = facts["param_specs"]
    assert specs["lm/layers_0/mlp/gate_proj/kernel"] == "P('fsdp', 'tensor')"
    assert specs["lm/layers_0/self_attn/o_proj/kernel"] == "P('tensor', 'fsdp')"
    # Capture statistics reduced over data x fsdp, NeuronSets, a masked AdamW step and a fitted subspace.
    assert facts["examples"] == 16
    assert facts["stats_error"] < 1e-5
    assert facts["neurons_equal"] and facts["neurons"] > 0
    assert facts["step_changed"] > 1e-3  # the step moved the neuron weights ...
    assert facts["step_error"] < 1e-5 and facts["loss_error"] < 1e-5  # ... identically on 8 devices
    assert facts["trained_specs"]["lm/layers_1/mlp/down_proj/kernel"] == "P('tensor', 'fsdp')"
    assert facts["projector_error"] < 1e-5 and facts["eigenvalue_error"] < 1e-5
    assert facts["sharded_eigh_error"] < 1e-5


def test_optimizer_state_and_neuron_masks_are_sharded_like_their_parameters(runs):
    specs = runs["devices"]["state_specs"]
    moments = {p: s for p, s in specs.items() if ".mu/" in p}
    assert moments and all(s == ("P('tensor', 'fsdp')" if "down_proj" in p else "P('fsdp', 'tensor')")
                           for p, s in moments.items())
    masks = {p: s for p, s in specs.items() if ".mu/" not in p and ".nu/" not in p}
    assert masks, "the masked optimizer keeps its neuron masks in its state"
    # A mask broadcasts along the parameter's other axis: sharded on the neuron axis like its kernel.
    assert all(s == ("P('tensor', None)" if "down_proj" in p else "P(None, 'tensor')") for p, s in masks.items())


def test_two_processes_read_only_their_slices_and_reduce_statistics(runs):
    for facts in runs["processes"]:
        assert (facts["processes"], facts["devices"], facts["local_devices"]) == (2, 4, 2)
        assert facts["whole_reads"] == 0
        assert facts["bytes_read"] == facts["bytes_needed"] < 0.6 * facts["checkpoint_bytes"]
        assert facts["shard_error"] == 0.0
        assert facts["examples"] == 16  # 8 rows per batch fed as 4 by each process, 2 batches
        assert facts["stats_error"] < 1e-5
        assert facts["restore_error"] == 0.0 and facts["same_layout"]


# ----------------------------------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def command_runs(tmp_path_factory, tiny_chat_llama):
    """The `precise-jax` commands on a tiny chat Llama, all at once: on one device; on 8 devices over a
    data x fsdp x tensor mesh; and on 2 jax.distributed processes of 2 devices each (what runs there so far)."""
    from tests.precise_jax.scaleout_worker import COMMANDS

    work = tmp_path_factory.mktemp("commands")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "PRECISE_JAX_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    every, port = list(COMMANDS), _free_port()
    runs = {"one": ("1", "none", every, [{}]), "eight": ("8", "data=2,fsdp=2,tensor=2", every, [{}]),
            "two": ("2", "fsdp", ["locate", "care fit", "ablate"], [
                {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
                for i in range(2)])}
    jobs = {}
    for name, (devices, mesh, names, clusters) in runs.items():
        (work / name).mkdir()
        for i, cluster in enumerate(clusters):
            jobs[f"{name}{i}"] = subprocess.Popen(
                [sys.executable, str(WORKER), "commands", devices, str(tiny_chat_llama), str(work / name), mesh,
                 *names], env={**env, **cluster}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return work, finish(jobs, timeout=600)


def _same_results(a: object, b: object, where: str = "") -> list[str]:
    """Where two result.json trees differ: numbers by more than 1e-5 (relative), anything else at all."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return [d for k in a if k not in ("seconds", "out") for d in _same_results(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same_results(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return [] if abs(a - b) <= 1e-5 * max(1.0, abs(a)) else [f"{where}: {a} vs {b}"]
    return [] if a == b else [f"{where}: {str(a)[:80]} vs {str(b)[:80]}"]


def _same_tensors(a: Path, b: Path) -> None:
    """Two safetensors files hold the same tensors within 1e-5; subspace bases as the projectors they span (an
    eigenbasis may turn within a near-degenerate eigenspace)."""
    one, other = load_file(str(a)), load_file(str(b))
    assert one.keys() == other.keys()
    for key in one:
        x, y = (t @ t.T if key.endswith("/basis") else t for t in (one[key], other[key]))
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5, err_msg=f"{a.name}: {key}")


def _result(folder: Path) -> dict:
    """A command's result.json, its own run folder's path written as {out}."""
    return json.loads((folder / "result.json").read_text().replace(str(folder.parent), "{out}"))


def test_every_command_on_eight_devices_gives_the_one_device_results(command_runs):
    from tests.precise_jax.scaleout_worker import COMMANDS

    work, _ = command_runs
    for name in COMMANDS:
        folder = name.replace(" ", "-")
        one, eight = _result(work / "one" / folder), _result(work / "eight" / folder)
        assert _same_results(one, eight) == [], name
    # Discrete outputs identical: the neuron set; numeric ones within 1e-5: the aligned weights, the subspaces.
    assert (work / "one/locate/neurons.json").read_text() == (work / "eight/locate/neurons.json").read_text()
    for file in ("align/model/model.safetensors", "care-fit/subspaces.safetensors"):
        _same_tensors(work / "one" / file, work / "eight" / file)
    aligned = load_file(str(work / "one/align/model/model.safetensors"))
    assert any(np.any(aligned[k] != v) for k, v in load_file(str(next(
        Path(_result(work / "one/locate")["model"]).glob("*.safetensors")))).items() if k in aligned)


def test_locate_and_care_fit_on_two_processes_give_the_one_device_results(command_runs):
    work, errors = command_runs
    for name in ("locate", "care-fit"):
        assert _same_results(_result(work / "one" / name), _result(work / "two" / name)) == [], name
    assert (work / "one/locate/neurons.json").read_text() == (work / "two/locate/neurons.json").read_text()
    _same_tensors(work / "one/care-fit/subspaces.safetensors", work / "two/care-fit/subspaces.safetensors")
    # Process 0 alone wrote the folders; a command that runs on one process only says so on both.
    assert sorted(p.name for p in (work / "two").iterdir()) == ["care-fit", "codes-0.json", "codes-1.json", "locate"]
    for i in range(2):
        assert json.loads((work / f"two/codes-{i}.json").read_text()) == {"locate": 0, "care fit": 0, "ablate": 2}
        assert "ablate runs on one process so far" in errors[f"two{i}"]


# ----------------------------------------------------------------------------------------------------- tpu/


TPU = ROOT / "tpu"
SCRIPTS = sorted(TPU.glob("*.sh"))


def pod(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": "/usr/bin:/bin", "TMPDIR": "/tmp"}  # no gcloud on PATH: a dry run never calls it
    return subprocess.run(["bash", str(TPU / "pod.sh"), *args], capture_output=True, text=True, env=env, timeout=30)


def test_tpu_scripts_parse_and_pass_shellcheck():
    assert {p.name for p in SCRIPTS} == {"pod.sh", "presets.sh"}
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = Path(sys.executable).with_name("shellcheck")
    result = subprocess.run([str(shellcheck), "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout


def commands(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("slice_, accelerator, runtime, workers", [
    ("v4-8", "v4-8", "tpu-ubuntu2204-base", 1), ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite", 4),
    ("v5e-64", "v5litepod-64", "v2-alpha-tpuv5-lite", 16), ("v5p-128", "v5p-128", "v2-alpha-tpuv5", 16),
])
def test_dry_run_prints_every_command_of_each_slice(slice_, accelerator, runtime, workers):
    where = ["--name", "pj", "--zone", "us-west4-a", "--slice", slice_, "--dry-run"]
    assert commands(pod("create", *where, "--project", "lab", "--spot")) == [
        f"gcloud compute tpus tpu-vm create pj --zone us-west4-a --project lab --accelerator-type {accelerator} "
        f"--version {runtime} --spot"]
    tar, copy, install = commands(pod("install", *where))
    assert tar.startswith("tar -czf /tmp/precise-jax-pj.tar.gz -C ") and "--exclude=.venv" in tar
    assert copy == "gcloud compute tpus tpu-vm scp /tmp/precise-jax-pj.tar.gz pj:precise-jax.tar.gz --zone " \
                   "us-west4-a --worker=all"
    assert install.startswith("gcloud compute tpus tpu-vm ssh pj --zone us-west4-a --worker=all --command ")
    assert "pip\\ install\\ \\'jax\\[tpu\\]\\'\\ -e\\ ./precise-jax" in install
    collected = commands(pod("collect", *where, "--remote", "runs/locate", "--local", "out"))
    copies = [c for c in collected if " scp " in c]
    assert len(copies) == workers
    assert copies[-1] == ("gcloud compute tpus tpu-vm scp --recurse pj:precise-jax/runs/locate "
                          f"out/worker-{workers - 1}/ --zone us-west4-a --worker={workers - 1}")


def test_dry_run_of_a_command_on_all_workers_carries_the_model_size_mesh():
    (run,) = commands(pod("run", "--name", "pj", "--zone", "z", "--slice", "v5e-16", "--model-size", "72b",
                          "--dry-run", "--", "precise-jax", "locate", "--limit", "96", "--out", "runs/locate"))
    assert run.startswith("gcloud compute tpus tpu-vm ssh pj --zone z --worker=all --command ")
    assert "PRECISE_JAX_MESH=\\'data=1\\,fsdp=-1\\,tensor=4\\'" in run
    assert run.endswith("precise-jax\\ locate\\ --limit\\ 96\\ --out\\ runs/locate")
    # The 72b preset's mesh is a valid spec: 4-way tensor parallelism inside each host of 4 chips.
    assert distributed.mesh_shape("data=1,fsdp=-1,tensor=4", 16) == (1, 4, 4)


@pytest.mark.parametrize("args, words", [
    (["create", "--zone", "z", "--slice", "v4-8"], "--name is required"),
    (["create", "--name", "pj", "--zone", "z", "--slice", "v6-8"], "unknown slice v6-8"),
    (["run", "--name", "pj", "--zone", "z", "--slice", "v4-8", "--dry-run"], "run needs a command"),
    (["run", "--name", "pj", "--zone", "z", "--slice", "v4-8", "--model-size", "1t", "--", "x"], "unknown model size"),
    (["launch", "--name", "pj", "--zone", "z", "--slice", "v4-8"], "unknown action launch"),
])
def test_bad_pod_arguments_are_refused_before_any_command(args, words):
    result = pod(*args)
    assert result.returncode == 2 and words in result.stderr and "+ " not in result.stdout
