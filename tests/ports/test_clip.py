"""CLIP vision tower vs Hugging Face `CLIPVisionModel` on real photos: every hidden state, pooled output and site."""

import numpy as np
import pytest
import torch
import transformers

from ports import clip
from tests.parity import randomize, rel_error
from tests.ports.vlm import load_tower, photos, tower_parity

TOL = 1e-5
CONFIG = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=42,
              patch_size=14)


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    torch.manual_seed(0)
    hf = randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CONFIG)), seed=0)
    folder = tmp_path_factory.mktemp("clip")
    hf.save_pretrained(folder)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42})
    pixels = processor([photos()[n] for n in ("astronaut", "chelsea", "page", "logo")], return_tensors="np")
    config = clip.config_from_hf(hf.config)
    module = clip.ClipVisionTower(config)
    params = load_tower(folder, module, clip.weight_rules("", ""), pixels["pixel_values"].shape)
    return hf, module, params, pixels["pixel_values"]


def test_hidden_states_pooled_and_sites_match_pytorch(tower):
    out, ref, sites, expected = tower_parity(*tower, CONFIG["num_hidden_layers"], TOL)
    assert rel_error(out.pooled, ref.pooler_output.numpy()) <= TOL
    assert set(sites) == set(expected)
    errors = {name: rel_error(sites[name], expected[name]) for name in expected}
    assert max(errors.values()) <= TOL, errors


def test_wrong_image_size_is_refused(tower):
    from ports import InputError

    _, module, params, pixels = tower
    with pytest.raises(InputError, match=r"\[images, 3, 42, 42\]"):
        module.apply({"params": params}, np.zeros((1, 3, 56, 56), np.float32))

