"""SigLIP vision tower vs Hugging Face `SiglipVisionModel` on real photos: hidden states, post-norm output, the
attention-pooling head and every site."""

import pytest
import torch
import transformers

from ports import siglip
from tests.parity import randomize, rel_error
from tests.ports.vlm import load_tower, photos, tower_parity

TOL = 1e-5
CONFIG = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=42,
              patch_size=14)


@pytest.fixture(scope="module", params=[True, False], ids=["with-head", "without-head"])
def tower(request, tmp_path_factory):
    torch.manual_seed(1)
    config = transformers.SiglipVisionConfig(**CONFIG, vision_use_head=request.param)
    hf = randomize(transformers.SiglipVisionModel(config), seed=1)
    folder = tmp_path_factory.mktemp("siglip")
    hf.save_pretrained(folder)
    processor = transformers.SiglipImageProcessorPil(size={"height": 42, "width": 42})
    pixels = processor([photos()[n] for n in ("coffee", "rocket_portrait", "logo")], return_tensors="np")
    module = siglip.SiglipVisionTower(siglip.config_from_hf(hf.config))
    params = load_tower(folder, module, siglip.weight_rules("", ""), pixels["pixel_values"].shape)
    return hf, module, params, pixels["pixel_values"]


def test_hidden_states_head_and_sites_match_pytorch(tower):
    hf = tower[0]
    out, ref, sites, expected = tower_parity(*tower, CONFIG["num_hidden_layers"], TOL)
    if hf.config.vision_use_head:
        assert rel_error(out.pooled, ref.pooler_output.numpy()) <= TOL
    else:
        assert out.pooled is None and ref.pooler_output is None
    layer_sites = {name: value for name, value in sites.items() if name.startswith("vision.layers.")}
    assert set(layer_sites) == set(expected)
    errors = {name: rel_error(layer_sites[name], expected[name]) for name in expected}
    assert max(errors.values()) <= TOL, errors
