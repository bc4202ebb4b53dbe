"""Architecture presets: the config.json of real checkpoints, to build ports abstractly (shapes, parameter counts,
sharding plans) or to write random-weight checkpoints of the real size for benchmarks, without downloading them.

`PRESETS` maps a name to a JSON file in this folder (README.md says where each file comes from).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ports.errors import CheckpointError, InputError
from ports.layers import Dtype

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from ports.pretrained import Pretrained

PRESETS: dict[str, str] = {
    "llava-1.5-7b-hf": "llava-1.5-7b-hf.json",
    "llava-onevision-qwen2-7b-ov-hf": "llava-onevision-qwen2-7b-ov-hf.json",
    "llava-onevision-qwen2-72b-ov-hf": "llava-onevision-qwen2-72b-ov-hf.json",
    "Qwen2.5-VL-7B-Instruct": "Qwen2.5-VL-7B-Instruct.json",
}

_FOLDER = Path(__file__).parent


def load_preset(name: str) -> dict:
    """The preset's config.json contents."""
    if name not in PRESETS:
        raise InputError(f"no preset named {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return json.loads((_FOLDER / PRESETS[name]).read_text())


def hf_config(config: Mapping[str, Any]) -> PretrainedConfig:
    """A transformers config object from config.json contents."""
    import transformers

    model_type = config.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise InputError(f"config has model_type {model_type!r}, which transformers does not know")
    return transformers.CONFIG_MAPPING[model_type].from_dict(dict(config))


def build_abstract(preset: str | Mapping[str, Any], dtype: Dtype = jnp.bfloat16) -> Pretrained:
    """The port of a preset (or config.json contents) with abstract parameters: a `Pretrained` whose `params` are
    `jax.ShapeDtypeStruct`s; nothing is allocated. `num_params(lm.params)` counts them."""
    from ports.pretrained import Pretrained, family_for

    config_dict = load_preset(preset) if isinstance(preset, str) else dict(preset)
    family = family_for(config_dict, preset if isinstance(preset, str) else "config")
    config = family.config_from_hf(hf_config(config_dict))
    model = family.build(config, dtype)
    example = family.example_batch(config)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), **example)["params"])
    return Pretrained(model, params, config, None, config_dict, None)


def num_params(params: dict) -> int:
    """Parameters in a (possibly abstract) parameter tree."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------------------------------- random


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def write_random_checkpoint(preset: str | Mapping, out_dir: str | os.PathLike, dtype: str = "bfloat16",
                            seed: int = 0, max_shard_bytes: int = 4 << 30) -> Path:
    """Write a Hugging Face folder (config.json + safetensors) of the preset's architecture with random weights
    (normal, std 0.02; norm weights around 1), streaming a block of rows at a time, so memory stays small whatever
    the model's size. Each tensor depends only on (seed, its name). The folder appears complete or not at all."""
    from ports.pretrained import family_for

    if dtype not in _SAFETENSORS_DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {sorted(_SAFETENSORS_DTYPES)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose another folder")
    lm = build_abstract(preset)
    family = family_for(lm.hf_config, "write_random_checkpoint")
    shapes = _hf_shapes(lm.params, family.weight_rules(lm.config))
    np_dtype = np.dtype(jnp.dtype(dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shards = _plan_shards(shapes, np_dtype.itemsize, max_shard_bytes)
        weight_map = {}
        for n, keys in enumerate(shards, 1):
            name = "model.safetensors" if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            _stream_safetensors(tmp / name, {k: shapes[k] for k in keys}, np_dtype, dtype, seed)
            weight_map.update({k: name for k in keys})
        if len(shards) > 1:
            total = sum(int(np.prod(s)) * np_dtype.itemsize for s in shapes.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = dict(lm.hf_config, dtype=dtype)
        config.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _hf_shapes(params, rules) -> dict[str, tuple[int, ...]]:
    """HF key -> HF shape of every port parameter, through the family's export rules."""
    from ports.weights import flatten

    rules = [r for r in rules if r.port is not None]
    shapes = {}
    for path, leaf in flatten(params).items():
        rule = next((r for r in rules if r.match_port(path) is not None), None)
        if rule is None:
            raise CheckpointError(f"port parameter {path} has no rule in the weight table; cannot write it")
        shapes[rule.match_port(path)] = rule.transform.to_hf(np.empty(leaf.shape, np.uint8)).shape
    return shapes


def _plan_shards(shapes: Mapping[str, tuple], itemsize: int, max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(shapes):
        nbytes = int(np.prod(shapes[key])) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _stream_safetensors(path: Path, shapes: Mapping[str, tuple], np_dtype, dtype: str, seed: int,
                        block_bytes: int = 64 << 20) -> None:
    """Write a safetensors file (8-byte header length, JSON header, raw little-endian data) tensor by tensor."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in sorted(shapes):
        nbytes = int(np.prod(shapes[key])) * np_dtype.itemsize
        header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shapes[key]),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for key in sorted(shapes):
            shape = shapes[key]
            rng = np.random.default_rng((seed, zlib.crc32(key.encode())))
            is_norm = "norm" in key and key.endswith(".weight")
            rows = shape[0] if shape else 1
            per_row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            step = max(1, block_bytes // max(1, per_row * 4))
            for start in range(0, rows, step):
                block = rng.standard_normal((min(step, rows - start), per_row), dtype=np.float32) * np.float32(0.02)
                if is_norm:
                    block += np.float32(1.0)
                f.write(block.astype(np_dtype).tobytes())
