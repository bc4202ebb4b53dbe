"""`load_pretrained` / `save_pretrained`: Hugging Face model folders <-> (linen module, params, config, processor)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ports import llama, llava, llava_onevision, qwen2, qwen2_vl, qwen3
from ports.errors import CheckpointError, UnsupportedArchitectureError
from ports.layers import CausalLM, DecoderConfig, Dtype
from ports.sharding import param_sharding
from ports.weights import Checkpoint, Rule, export_tensors, flatten, load_params, load_sharded_params, write_safetensors


def text_example(config: DecoderConfig) -> dict:
    """The smallest batch a decoder accepts (shape tracing only)."""
    return {"input_ids": np.zeros((1, 1), np.int32)}


@dataclasses.dataclass(frozen=True)
class Family:
    """What a port family contributes: the model types it reads, config translation, weight table, module.

    `example_batch(config)` is a tiny batch that reaches every parameter and site (images too, for a VLM).
    """

    model_types: tuple[str, ...]
    config_from_hf: Callable[[Any], Any]
    weight_rules: Callable[[Any], list[Rule]]
    build: Callable[[Any, Any], nn.Module]
    example_batch: Callable[[Any], dict] = text_example
    load_processor: Callable[[Path], Any] | None = None  # when transformers' AutoProcessor cannot build it here


FAMILIES = (
    Family(llama.MODEL_TYPES, llama.config_from_hf, llama.weight_rules, CausalLM),
    Family(qwen2.MODEL_TYPES, qwen2.config_from_hf, llama.weight_rules, CausalLM),
    Family(qwen3.MODEL_TYPES, qwen3.config_from_hf, llama.weight_rules, CausalLM),
    Family(qwen2_vl.QWEN2_VL_TYPES, qwen2_vl.config_from_hf, qwen2_vl.weight_rules, qwen2_vl.build,
           qwen2_vl.example_batch, qwen2_vl.load_processor),
    Family(qwen2_vl.QWEN2_5_VL_TYPES, qwen2_vl.config_from_hf, qwen2_vl.weight_rules, qwen2_vl.build,
           qwen2_vl.example_batch, qwen2_vl.load_processor),
    Family(llava.MODEL_TYPES, llava.config_from_hf, llava.weight_rules, llava.build, llava.example_batch),
    Family(llava_onevision.MODEL_TYPES, llava_onevision.config_from_hf, llava_onevision.weight_rules,
           llava_onevision.build, llava_onevision.example_batch, llava_onevision.load_processor),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


@dataclasses.dataclass
class Pretrained:
    """A loaded model: `model.apply({"params": params}, **batch)` runs it."""

    model: nn.Module
    params: dict
    config: Any  # the port's frozen config
    processor: Any | None  # transformers tokenizer or processor, when the folder has one
    hf_config: dict  # config.json as read, written back by save_pretrained
    source: Path | None = None

    @property
    def family(self) -> Family:
        return family_for(self.hf_config, "model")

    @property
    def dtype(self) -> np.dtype:
        return jax.tree_util.tree_leaves(self.params)[0].dtype

    @property
    def decoder(self) -> DecoderConfig:
        """The language model's DecoderConfig (layers, widths): the config itself for a text model, its `text` part
        for a vision-language one."""
        return getattr(self.config, "text", self.config)

    @property
    def mesh(self) -> jax.sharding.Mesh | None:
        """The device mesh the parameters are laid out on (`load_pretrained(..., mesh=)`), else None."""
        sharding = getattr(jax.tree_util.tree_leaves(self.params)[0], "sharding", None)
        mesh = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
        return mesh if isinstance(mesh, jax.sharding.Mesh) else None

    @property
    def model_id(self) -> str:
        """The identity recorded with statistics, neuron sets and runs: the absolute model folder, else the
        config's `_name_or_path`."""
        if self.source is not None:
            return os.path.abspath(self.source)
        return str(self.hf_config.get("_name_or_path") or "unknown")


def family_for(hf_config: dict, where: str) -> Family:
    if "auto_map" in hf_config:
        raise UnsupportedArchitectureError(
            f"{where}: model_type {hf_config.get('model_type')!r} needs trust_remote_code (config.json has "
            "auto_map); precise-jax runs no remote code. Use a natively supported architecture: "
            f"{', '.join(sorted(_BY_TYPE))}"
        )
    model_type = hf_config.get("model_type")
    if model_type not in _BY_TYPE:
        raise UnsupportedArchitectureError(
            f"{where}: model_type {model_type!r} has no port; supported: {', '.join(sorted(_BY_TYPE))}"
        )
    return _BY_TYPE[model_type]


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    if not path.exists():
        raise CheckpointError(f"{folder} has no config.json; give a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def abstract_params(model: nn.Module, example: dict) -> dict[str, tuple[int, ...]]:
    """Parameter path -> shape, without allocating anything."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **example)["params"])
    return {path: leaf.shape for path, leaf in flatten(shapes).items()}


def load_pretrained(path: str | os.PathLike, dtype: Dtype = jnp.float32, mesh: jax.sharding.Mesh | None = None,
                    ) -> Pretrained:
    """Load a Hugging Face model folder (config.json + safetensors) into a port, strictly, in `dtype`.

    With a `mesh` (`precise_jax.distributed.make_mesh`), parameters are laid out by the logical axis rules and each
    process reads only the slices its devices hold.
    """
    import transformers

    folder = Path(path)
    config_dict = read_config(folder)
    family = family_for(config_dict, str(folder))
    checkpoint = Checkpoint(folder)
    hf = transformers.AutoConfig.from_pretrained(folder)
    config = family.config_from_hf(hf)
    model = family.build(config, dtype)
    expected = abstract_params(model, family.example_batch(config))
    if mesh is None:
        params = load_params(checkpoint, family.weight_rules(config), expected,
                             convert=lambda _, array: jnp.asarray(array).astype(dtype))
    else:
        params = load_sharded_params(checkpoint, family.weight_rules(config), expected,
                                     lambda path, shape: param_sharding(path, shape, mesh), dtype)
    return Pretrained(model, params, config, _load_processor(folder, family), config_dict, folder)


def _load_processor(folder: Path, family: Family | None = None):
    import transformers

    if family is not None and family.load_processor is not None:
        return family.load_processor(folder)

    if (folder / "processor_config.json").exists() or (folder / "preprocessor_config.json").exists():
        return transformers.AutoProcessor.from_pretrained(folder)
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        return transformers.AutoTokenizer.from_pretrained(folder)
    return None


def save_pretrained(lm: Pretrained, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `lm` as a Hugging Face folder (config.json + safetensors + processor files) that transformers loads.

    The folder appears complete or not at all; an existing one is refused unless `overwrite`.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty; choose another folder or pass overwrite=True")
    family = family_for(lm.hf_config, "save_pretrained")
    tensors = export_tensors(jax.device_get(lm.params), family.weight_rules(lm.config))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_safetensors(tensors, tmp)
        config = dict(lm.hf_config, dtype=np.dtype(lm.dtype).name)
        config.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if lm.source is not None and (lm.source / "generation_config.json").exists():
            shutil.copy(lm.source / "generation_config.json", tmp)
        if lm.processor is not None:
            lm.processor.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
