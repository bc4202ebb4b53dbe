"""Presets: the real architectures' parameter counts equal Hugging Face's exactly (both built abstractly), and
random-weight checkpoints of any preset load in the port and in transformers alike."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ports import CheckpointError, InputError, load_pretrained
from ports.presets import PRESETS, build_abstract, hf_config, load_preset, num_params, write_random_checkpoint
from tests.parity import rel_error
from tests.ports.vlm import logits as forward

# preset -> the transformers class its checkpoint loads into, and its parameter count.
CASES = {
    "llava-1.5-7b-hf": (transformers.LlavaForConditionalGeneration, 7_063_427_072),
    "llava-onevision-qwen2-7b-ov-hf": (transformers.LlavaOnevisionForConditionalGeneration, 8_030_807_584),
    "llava-onevision-qwen2-72b-ov-hf": (transformers.LlavaOnevisionForConditionalGeneration, 73_181_570_592),
    "Qwen2.5-VL-7B-Instruct": (transformers.Qwen2_5_VLForConditionalGeneration, 8_292_166_656),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_parameter_count_equals_transformers(name):
    cls, count = CASES[name]
    with torch.device("meta"):  # shapes only: no memory
        hf = cls(hf_config(load_preset(name)))
    theirs = sum(p.numel() for p in hf.parameters())  # tied parameters are one Parameter: counted once
    ours = num_params(build_abstract(name).params)
    assert ours == theirs == count


def test_every_preset_is_registered_and_parses():
    for name in PRESETS:
        config = load_preset(name)
        assert config["model_type"] and hf_config(config).model_type == config["model_type"]
    with pytest.raises(InputError, match="no preset named 'llava-2'"):
        load_preset("llava-2")


TINY = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "image_token_index": 60,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "text_config": {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 48,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 28, "patch_size": 14},
}


def test_random_checkpoint_loads_in_the_port_and_in_transformers(tmp_path):
    out = write_random_checkpoint(TINY, tmp_path / "tiny", dtype="float32", seed=3, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "small shards force a sharded checkpoint"
    lm = load_pretrained(out)
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                                          output_loading_info=True)
    assert not any(info.values()), info  # every tensor in its place, none missing or left over
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 59, (2, 9))
    ids[:, 2:6] = 60  # one image of (28 / 14)^2 = 4 features per row
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    ours = forward(lm, {"input_ids": ids, "pixel_values": pixels})
    assert rel_error(ours, expected) <= 1e-5
    norms = np.asarray(lm.params["lm"]["norm"]["weight"])
    assert abs(norms.mean() - 1) < 0.05 and 0 < norms.std() < 0.05, "norm weights scatter around 1"

    again = write_random_checkpoint(TINY, tmp_path / "again", dtype="bfloat16", seed=3, max_shard_bytes=40_000)
    bf16 = load_pretrained(again, dtype=jnp.float32)  # the same values, rounded to bfloat16 on disk
    np.testing.assert_allclose(np.asarray(bf16.params["lm"]["norm"]["weight"]), norms, rtol=1e-2)
    with pytest.raises(CheckpointError, match="not empty"):
        write_random_checkpoint(TINY, out)


TINY_QWEN2_5_VL = {  # the preset's flat config.json layout, at toy sizes
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},
    "image_token_id": 60, "video_token_id": 61, "vision_start_token_id": 58, "vision_end_token_id": 59,
    "tie_word_embeddings": False,
    "vision_config": {"depth": 2, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2, "out_hidden_size": 32,
                      "window_size": 112, "fullatt_block_indexes": [1]},
}


def test_random_qwen2_5_vl_checkpoint_loads_in_the_port_and_in_transformers(tmp_path):
    out = write_random_checkpoint(TINY_QWEN2_5_VL, tmp_path / "tiny", dtype="float32", seed=1)
    lm = load_pretrained(out)
    hf, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    kernel = hf.model.visual.patch_embed.proj.weight.detach().numpy()  # [O, C, T, P, P]
    np.testing.assert_array_equal(np.asarray(lm.params["vision"]["patch_embed"]["proj"]["kernel"]),
                                  kernel.transpose(2, 3, 4, 1, 0))
