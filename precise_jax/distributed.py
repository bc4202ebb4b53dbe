"""Meshes, logical axis rules, multi-host start-up and per-host data feeding: JAX's own SPMD, nothing home-made.

A mesh has three axes: `data` (batch split, parameters replicated), `fsdp` (batch split and parameters sharded
along their model width) and `tensor` (parameters sharded along heads, MLP neurons and vocabulary). Every port
parameter gets logical axes from `PARAM_RULES` (a regex table over the port's '/'-separated paths); `LOGICAL_RULES`
maps logical axes to mesh axes (both live in `ports.sharding`, which `load_pretrained` uses too). jit propagates
the parameters' and the batch's shardings through the existing methods (capture, statistics, masked training,
subspaces), so they run sharded unchanged.

    initialize()                                  # jax.distributed on a pod / cluster; nothing on one process
    mesh = make_mesh("fsdp")                      # or "data=2,fsdp=2,tensor=2", (2, 2, 2); None: $PRECISE_JAX_MESH
    lm = load_pretrained(folder, mesh=mesh)       # each host reads only the slices its devices hold
    batch = host_batch(mesh, local_batch)         # this host's rows -> global arrays split over data x fsdp
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from numpy.typing import DTypeLike

from ports.errors import InputError
from ports.sharding import (  # noqa: F401  (the rules, also importable from here)
    AXES, BATCH_AXES, LOGICAL_RULES, PARAM_RULES, logical_axes, param_sharding, spec_for,
)

# -1: the remaining devices. Per model size: small models replicate (data), 7B-13B shard (fsdp), larger ones add
# tensor parallelism inside a host so that its collectives stay on the fast interconnect.
MESH_PRESETS: dict[str, tuple[int, int, int]] = {
    "data": (-1, 1, 1),
    "fsdp": (1, -1, 1),
    "tensor": (1, 1, -1),
    "fsdp-tensor2": (1, -1, 2),
    "fsdp-tensor4": (1, -1, 4),
    "data2-fsdp": (2, -1, 1),
}

# ----------------------------------------------------------------------------------------------------- start-up


def initialize(**kwargs: Any) -> bool:
    """`jax.distributed.initialize` when this is one of several processes; returns whether it ran.

    With no arguments it runs when the environment describes a cluster (TPU pod workers, Slurm, Open MPI, or
    JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID); on one process it does nothing. Call it first.
    """
    if jax.distributed.is_initialized():
        return False
    if not kwargs:
        env = os.environ
        if "JAX_COORDINATOR_ADDRESS" in env:
            kwargs = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
                      "num_processes": int(env["JAX_NUM_PROCESSES"]), "process_id": int(env["JAX_PROCESS_ID"])}
        elif not _cluster_environment(env):
            return False
    jax.distributed.initialize(**kwargs)
    return True


def _cluster_environment(env: Mapping[str, str]) -> bool:
    """Whether jax can find its peers by itself (a multi-worker TPU VM, Slurm, Open MPI)."""
    workers = env.get("TPU_WORKER_HOSTNAMES", "")
    return ("," in workers or int(env.get("SLURM_NTASKS", "1")) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


# ----------------------------------------------------------------------------------------------------- meshes


def mesh_shape(spec: str | Sequence[int] | Mapping[str, int], device_count: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) from a preset name, 'data=2,fsdp=2,tensor=2', a 3-sequence or a dict; -1 fills."""
    if isinstance(spec, str) and spec in MESH_PRESETS:
        sizes = list(MESH_PRESETS[spec])
    elif isinstance(spec, str):
        sizes = [1, 1, 1]
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, value = part.partition("=")
            if name.strip() not in AXES or not _is_int(value):
                raise InputError(f"mesh {spec!r}: expected a preset ({', '.join(MESH_PRESETS)}) or "
                                 "'data=N,fsdp=N,tensor=N' (N an integer, -1 for the remaining devices)")
            sizes[AXES.index(name.strip())] = int(value)
    elif isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(AXES))
        if unknown:
            raise InputError(f"mesh axes {unknown} are unknown; the axes are {AXES}")
        sizes = [int(spec.get(a, 1)) for a in AXES]
    else:
        sizes = [int(s) for s in spec]
        if len(sizes) != 3:
            raise InputError(f"a mesh shape has 3 sizes (data, fsdp, tensor), got {tuple(spec)}")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise InputError(f"mesh sizes {tuple(sizes)}: each must be >= 1, and at most one may be -1 (the rest)")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        if device_count % known:
            raise InputError(f"mesh {_describe(sizes)} cannot fill {device_count} devices: {device_count} is not "
                             f"a multiple of {known}; choose sizes whose product divides the device count")
        sizes[sizes.index(-1)] = device_count // known
    if int(np.prod(sizes)) != device_count:
        raise InputError(f"mesh {_describe(sizes)} needs {int(np.prod(sizes))} devices but there are "
                         f"{device_count}; make data x fsdp x tensor = {device_count} (or use -1 for one axis)")
    data, fsdp, tensor = sizes
    return data, fsdp, tensor


def _is_int(text: str) -> bool:
    return re.fullmatch(r"\s*-?\d+\s*", text) is not None


def _describe(sizes) -> str:
    return ",".join(f"{a}={s}" for a, s in zip(AXES, sizes))


def make_mesh(spec: str | Sequence[int] | Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process), in the classic
    GSPMD style (AxisType.Auto) that logical sharding constraints need. `spec` defaults to the environment's
    PRECISE_JAX_MESH (which tpu/pod.sh sets from a model-size preset), else "fsdp"."""
    spec = os.environ.get("PRECISE_JAX_MESH", "fsdp") if spec is None else spec
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(spec, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


# ----------------------------------------------------------------------------------------------------- rules


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """A tree of NamedShardings matching `params` (arrays or ShapeDtypeStructs), from the logical rules.

    Any tree whose leaves sit at parameter paths works: an optimizer state's moments and neuron masks (a [1, d_ff]
    mask of a [d, d_ff] kernel) are then sharded like their parameters; scalars are replicated."""
    return jax.tree_util.tree_map_with_path(lambda kp, leaf: param_sharding(_path(kp), leaf.shape, mesh), params)


def abstract_sharded(params: Any, mesh: Mesh, dtype: DTypeLike | None = None) -> Any:
    """ShapeDtypeStructs carrying the rules' shardings: what sharded loading and Orbax restore fill."""
    shardings = param_shardings(params, mesh)
    return jax.tree_util.tree_map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, dtype or leaf.dtype, sharding=s), params, shardings)


def shard_params(params: Any, mesh: Mesh) -> Any:
    """Place an existing (single-host) parameter tree on the mesh by the rules."""
    return jax.device_put(params, param_shardings(params, mesh))


def _path(key_path) -> str:
    return "/".join(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def gather(tree: Any, mesh: Mesh) -> Any:
    """Every leaf replicated on every device, so each process can read it whole (e.g. statistics to save)."""
    return jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)


# ----------------------------------------------------------------------------------------------------- checkpoints


def save_params(directory: str | os.PathLike, params: Any) -> None:
    """Write sharded parameters with Orbax: every process writes the shards it holds (call it on all processes)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(directory), params)
        checkpointer.wait_until_finished()


def restore_params(directory: str | os.PathLike, like: Any, mesh: Mesh) -> Any:
    """Read what `save_params` wrote into the rules' shardings on `mesh`; `like` gives shapes and dtypes (arrays
    or ShapeDtypeStructs). Each process reads only the shards its devices hold."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.abspath(directory), abstract_sharded(like, mesh))


# ----------------------------------------------------------------------------------------------------- data


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows split over data x fsdp (the logical `batch` axis), every other dimension whole."""
    return NamedSharding(mesh, spec_for(("batch",) + ("length",) * (ndim - 1), (0,) * ndim, mesh))


def host_batch(mesh: Mesh, batch: Mapping, keys: Iterable[str] | None = None) -> dict:
    """This process's rows of a batch -> global arrays whose rows are split over data x fsdp.

    Every process calls it with its own rows (the same count on each); the global batch is the processes' rows
    in process order. Arrays whose first dimension is not the row count (Qwen-VL patches) cannot be split by row:
    they are refused on several processes and replicated on one.
    """
    keys = list(batch if keys is None else keys)
    rows = np.shape(batch["input_ids"])[0] if "input_ids" in batch else np.shape(batch[keys[0]])[0]
    out = {}
    for key in keys:
        local = np.asarray(batch[key])
        if local.ndim and local.shape[0] == rows:
            out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local)
        elif jax.process_count() == 1:
            out[key] = jax.device_put(local, replicated(mesh))
        else:
            raise InputError(f"batch key {key!r} has shape {local.shape}, whose first dimension is not the "
                             f"{rows} rows; on several processes each must feed row-major arrays only")
    return out


def place_batch(mesh: Mesh | None, batch: Mapping) -> dict:
    """A batch's arrays on device: on the default device without a mesh; with one, this process's rows as its
    part of global arrays split over data x fsdp (`host_batch`)."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    return host_batch(mesh, batch)


def process_share(batches: Iterable[Mapping], mesh: Mesh | None) -> Iterator[Mapping]:
    """This process's rows of each global batch (every process builds the same batches from the same examples):
    a contiguous 1/process_count of the rows, with their `ids` and `row_valid`; the batches unchanged without a
    mesh or on one process. What `collect` on a mesh takes, so that statistics count every example once."""
    count, me = jax.process_count(), jax.process_index()
    for batch in batches:
        if mesh is None or count == 1:
            yield batch
            continue
        rows = np.shape(batch["input_ids"])[0]
        if rows % count:
            raise InputError(f"a batch of {rows} rows cannot be shared by {count} processes; make the batch size a "
                             f"multiple of {count}")
        mine = slice(me * rows // count, (me + 1) * rows // count)
        share: dict[str, Any] = {}
        for key in batch:
            value = np.asarray(batch[key])
            if value.ndim == 0 or value.shape[0] != rows:
                raise InputError(f"batch key {key!r} has shape {value.shape}, not one row per example; several "
                                 "processes can share text batches only (run image batches on one process)")
            share[key] = value[mine]
        valid, ids = getattr(batch, "row_valid", None), getattr(batch, "ids", None)
        share["row_valid"] = np.ones(rows, bool)[mine] if valid is None else np.asarray(valid, bool)[mine]
        if ids is not None:
            share["ids"] = list(ids)[mine]
        yield share


def is_main_process() -> bool:
    """Whether this process writes a run's outputs (process 0; the only one without jax.distributed)."""
    return jax.process_index() == 0


def host_rows(mesh: Mesh, array: jax.Array) -> np.ndarray:
    """This process's rows of a global row-split array: the inverse of `host_batch` for one array."""
    if jax.process_count() == 1:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    spec = batch_sharding(mesh, array.ndim).spec
    return np.asarray(multihost_utils.global_array_to_host_local_array(array, mesh, spec))


def fetch(array: Any) -> np.ndarray:
    """An array's whole value on this host: gathered from every process when their devices hold parts of it."""
    if not isinstance(array, jax.Array) or array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def all_rows(local: np.ndarray) -> np.ndarray:
    """Every process's rows of an array, concatenated in process order (every process must call it; the shapes
    must agree); the array itself on one process."""
    if jax.process_count() == 1:
        return np.asarray(local)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def process_sum(value: int) -> int:
    """The sum of an integer over all processes (every process must call it)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.asarray(value, np.int64))))
