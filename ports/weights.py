"""Safetensors I/O and the declarative Hugging Face key <-> port parameter tables, with strict loading and export.

A family's table is a list of `Rule`s such as
    Rule("model.layers.{i}.mlp.down_proj.weight", "lm/layers_{i}/mlp/down_proj/kernel", LINEAR)
read in both directions: HF key -> port path when loading, port path -> HF key when saving.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from numpy.typing import DTypeLike
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ports.errors import CheckpointError

# ----------------------------------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class Transform:
    """How an HF tensor becomes a port parameter (`to_port`) and back (`to_hf`)."""

    name: str
    to_port: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
LINEAR = Transform("linear", lambda a: a.T, lambda a: a.T)  # torch Linear (out, in) <-> flax Dense (in, out)
CONV = Transform(  # torch Conv (O, I, *k) <-> flax Conv (*k, I, O)
    "conv",
    lambda a: np.transpose(a, (*range(2, a.ndim), 1, 0)),
    lambda a: np.transpose(a, (a.ndim - 1, a.ndim - 2, *range(a.ndim - 2))),
)

_FIELD = re.compile(r"\{(\w+)\}")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF key template <-> one port path template ('/'-separated); `port=None` drops the tensor on load."""

    hf: str
    port: str | None
    transform: Transform = IDENTITY

    def match_hf(self, key: str) -> str | None:
        m = _template_regex(self.hf).fullmatch(key)
        return None if m is None or self.port is None else self.port.format(**m.groupdict())

    def match_port(self, path: str) -> str | None:
        if self.port is None:
            return None
        m = _template_regex(self.port).fullmatch(path)
        return None if m is None else self.hf.format(**m.groupdict())


@functools.lru_cache(maxsize=None)
def _template_regex(template: str) -> re.Pattern:
    parts = _FIELD.split(template)  # literal, field, literal, field, ...
    pattern = "".join(re.escape(p) if i % 2 == 0 else rf"(?P<{p}>\d+)" for i, p in enumerate(parts))
    return re.compile(pattern)


def mirrored(hf_prefix: str, port_prefix: str, linears: Iterable[str] = (), norms: Iterable[str] = (),
             ) -> list[Rule]:
    """Rules for submodules named as in Hugging Face: linear layers (weight, optional bias) and norms (weight)."""
    rules = []
    for name in linears:
        hf, port = f"{hf_prefix}.{name}", f"{port_prefix}/{name.replace('.', '/')}"
        rules += [Rule(f"{hf}.weight", f"{port}/kernel", LINEAR), Rule(f"{hf}.bias", f"{port}/bias")]
    for name in norms:
        rules.append(Rule(f"{hf_prefix}.{name}.weight", f"{port_prefix}/{name.replace('.', '/')}/weight"))
    return rules


def with_prefix(rules: Iterable[Rule], hf_prefix: str, port_prefix: str) -> list[Rule]:
    """The same rules under other prefixes (a decoder inside a vision-language model, say)."""
    out = []
    for r in rules:
        hf = r.hf if not hf_prefix else f"{hf_prefix}.{r.hf}"
        port = r.port if r.port is None or not port_prefix else f"{port_prefix}/{r.port}"
        out.append(Rule(hf, port, r.transform))
    return out


# ----------------------------------------------------------------------------------------------------- reading


class Checkpoint:
    """The safetensors tensors of a Hugging Face model folder (single file or sharded index), read lazily."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-save the checkpoint") from e
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files = [single.name]
            weight_map = None
        else:
            raise CheckpointError(_no_safetensors_message(self.folder))
        self._file_of: dict[str, str] = {}
        for name in files:
            path = self.folder / name
            if not path.exists():
                raise CheckpointError(f"{path} is listed in the index but missing; download the checkpoint again")
            for key in self._keys(path):
                self._file_of[key] = name
        if weight_map is not None:
            absent = sorted(k for k in weight_map if k not in self._file_of)
            if absent:
                raise CheckpointError(f"{len(absent)} tensors listed in {index} are in no shard, e.g. {absent[:5]}")

    @staticmethod
    def _keys(path: Path) -> list[str]:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path} is empty; download or save the checkpoint again")
        try:
            with safe_open(str(path), framework="np") as f:
                return list(f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated: "
                                  "download or save the checkpoint again") from e

    def keys(self) -> list[str]:
        return list(self._file_of)

    def get(self, key: str) -> np.ndarray:
        path = self.folder / self._file_of[key]
        try:
            with safe_open(str(path), framework="np") as f:
                return f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {path} ({e}); the file may be truncated") from e

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """The part `index` (one slice per dimension) of a tensor: only those bytes are read."""
        path = self.folder / self._file_of[key]
        try:
            with safe_open(str(path), framework="np") as f:
                part = f.get_slice(key)
                return part[index] if index else f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {index} of tensor {key!r} from {path} ({e}); the file may be "
                                  "truncated") from e

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(str(self.folder / self._file_of[key]), framework="np") as f:
            return tuple(f.get_slice(key).get_shape())


def _no_safetensors_message(folder: Path) -> str:
    if not folder.is_dir():
        return f"model folder {folder} does not exist"
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles:
        return (
            f"{folder} holds only pickle checkpoints ({', '.join(pickles[:3])}), which precise-jax does not load "
            "(unpickling runs arbitrary code). Convert once with transformers: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder, safe_serialization=True)"
        )
    return f"{folder} has no model.safetensors or model.safetensors.index.json"


# ----------------------------------------------------------------------------------------------------- loading


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested dict -> {'a/b/c': leaf}."""
    flat = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            flat.update(flatten(v, path))
        else:
            flat[path] = v
    return flat


def unflatten(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def load_params(
    checkpoint: Checkpoint,
    rules: Iterable[Rule],
    expected: Mapping[str, tuple[int, ...]],
    convert: Callable[[str, np.ndarray], object],
) -> dict:
    """Fill every port parameter in `expected` (path -> shape) from the checkpoint, strictly.

    Every checkpoint tensor must be consumed by a rule and every expected parameter filled with the right shape,
    else one CheckpointError lists what is missing, unexpected and mis-shaped. `convert(path, array)` places a leaf.
    """
    plan = plan_params(checkpoint, rules, expected)
    return unflatten({path: convert(path, t.to_port(checkpoint.get(key))) for path, (key, t) in plan.items()})


def load_sharded_params(
    checkpoint: Checkpoint,
    rules: Iterable[Rule],
    expected: Mapping[str, tuple[int, ...]],
    sharding: Callable[[str, tuple[int, ...]], object],
    dtype: DTypeLike,
) -> dict:
    """As `load_params`, but each leaf is a global jax.Array laid out by `sharding(path, shape)`, built from the
    slices its addressable devices hold: a process reads only those bytes of the checkpoint, never whole tensors
    it does not need (a transposed tensor is read as the transposed slice)."""
    import jax

    dtype = np.dtype(dtype)
    out = {}
    for path, (key, transform) in plan_params(checkpoint, rules, expected).items():
        shape = tuple(expected[path])
        read = _slice_reader(checkpoint, key, transform, checkpoint.shape(key), dtype)
        out[path] = jax.make_array_from_callback(shape, sharding(path, shape), read)
    return unflatten(out)


def _slice_reader(checkpoint: Checkpoint, key: str, transform: Transform, hf_shape: tuple[int, ...], dtype):
    """index in the port's layout -> that part of the port parameter, read from the HF tensor's matching part."""
    permutation = _axis_permutation(transform, len(hf_shape))
    cache: dict[tuple, np.ndarray] = {}  # devices holding the same part (replicas) share one read

    def read(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index)
        marker = tuple((s.start, s.stop, s.step) for s in index)
        if marker not in cache:
            if permutation is None:  # not a pure axis permutation: read whole, then cut (no table uses one)
                cache[marker] = transform.to_port(checkpoint.get(key))[index].astype(dtype)
            else:
                hf_index = [slice(None)] * len(hf_shape)
                for port_axis, hf_axis in enumerate(permutation):
                    hf_index[hf_axis] = index[port_axis]
                part = checkpoint.read(key, tuple(hf_index))
                cache[marker] = np.ascontiguousarray(np.transpose(part, permutation)).astype(dtype)
        return cache[marker]

    return read


def _axis_permutation(transform: Transform, ndim: int) -> tuple[int, ...] | None:
    """`p` with to_port(a) == transpose(a, p) for every a of `ndim` dims, or None if the transform is not one."""
    sizes = tuple(range(2, 2 + ndim))  # distinct sizes identify each axis
    probe = np.arange(int(np.prod(sizes))).reshape(sizes)
    moved = transform.to_port(probe)
    if sorted(moved.shape) != sorted(sizes):
        return None
    permutation = tuple(sizes.index(n) for n in moved.shape)
    return permutation if np.array_equal(moved, np.transpose(probe, permutation)) else None


def plan_params(
    checkpoint: Checkpoint, rules: Iterable[Rule], expected: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[str, Transform]]:
    """port path -> (HF key, transform) for every expected parameter; one CheckpointError lists every mismatch."""
    rules = list(rules)
    plan: dict[str, tuple[str, Transform]] = {}  # port path -> (hf key, transform)
    unexpected, misshaped, misshaped_paths = [], [], set()
    for key in checkpoint.keys():
        rule = next((r for r in rules if _template_regex(r.hf).fullmatch(key)), None)
        if rule is None:
            unexpected.append(key)
            continue
        path = rule.match_hf(key)
        if rule.port is None:
            continue  # a tensor the port recomputes or shares (rotary buffers, tied head)
        if path not in expected:
            unexpected.append(key)
            continue
        shape = _transformed_shape(checkpoint.shape(key), rule.transform)
        if shape != tuple(expected[path]):
            misshaped.append(f"{key}: checkpoint {shape} (as {path}) vs model {tuple(expected[path])}")
            misshaped_paths.add(path)
            continue
        plan[path] = (key, rule.transform)
    missing = [p for p in expected if p not in plan and p not in misshaped_paths]
    if unexpected or missing or misshaped:
        raise CheckpointError(_mismatch_message(checkpoint.folder, missing, unexpected, misshaped))
    return plan


def _transformed_shape(shape: tuple[int, ...], transform: Transform) -> tuple[int, ...]:
    return tuple(transform.to_port(np.empty(shape, dtype=np.uint8)).shape) if shape else ()


def _mismatch_message(folder: Path, missing, unexpected, misshaped) -> str:
    def listing(title: str, items: Sequence[str]) -> str:
        shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
        return f"\n  {title} ({len(items)}):\n    {shown}" if items else ""

    return (
        f"checkpoint {folder} does not match the model built from its config.json"
        + listing("missing from the checkpoint", missing)
        + listing("unexpected in the checkpoint", unexpected)
        + listing("mis-shaped", misshaped)
        + "\n  Check that config.json belongs to these weights and that every shard was downloaded."
    )


# ----------------------------------------------------------------------------------------------------- export


def export_tensors(params: Mapping, rules: Iterable[Rule]) -> dict[str, np.ndarray]:
    """Port parameters -> {HF key: array} through the same rules read backwards."""
    rules = [r for r in rules if r.port is not None]
    out = {}
    for path, leaf in flatten(params).items():
        for rule in rules:
            key = rule.match_port(path)
            if key is not None:
                out[key] = np.ascontiguousarray(rule.transform.to_hf(np.asarray(leaf)))
                break
        else:
            raise CheckpointError(f"port parameter {path} has no rule in the weight table; cannot export it")
    return out


def write_safetensors(tensors: Mapping[str, np.ndarray], folder: Path, max_shard_bytes: int = 4 << 30) -> None:
    """Write `model.safetensors`, or shards plus `model.safetensors.index.json` when larger than one shard."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
