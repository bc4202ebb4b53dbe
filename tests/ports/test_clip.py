"""CLIP vision tower vs Hugging Face `CLIPVisionModel` on real photos: every hidden state, pooled output and site."""

import functools

import jax
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict

from ports import clip
from precise_jax.sites import site_name
from tests.parity import randomize, rel_error, torch_sites
from tests.ports.vlm import is_site, load_tower, photos

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
    hf, module, params, pixels = tower
    with torch.no_grad(), torch_sites(hf.encoder.layers, "vision", down_proj="fc2") as expected:
        ref = hf(torch.tensor(pixels), output_hidden_states=True)
    out, state = jax.jit(functools.partial(module.apply, capture_intermediates=is_site))({"params": params}, pixels)
    assert len(out.hidden_states) == len(ref.hidden_states) == CONFIG["num_hidden_layers"] + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert rel_error(ours, theirs.numpy()) <= TOL
    assert rel_error(out.last_hidden_state, ref.last_hidden_state.numpy()) <= TOL
    assert rel_error(out.pooled, ref.pooler_output.numpy()) <= TOL
    sites = {site_name(("vision", *path[:-1])): v[0] for path, v in flatten_dict(state["intermediates"]).items()}
    assert set(sites) == set(expected)
    errors = {name: rel_error(sites[name], expected[name]) for name in expected}
    assert max(errors.values()) <= TOL, errors


def test_wrong_image_size_is_refused(tower):
    from ports import InputError

    _, module, params, pixels = tower
    with pytest.raises(InputError, match=r"\[images, 3, 42, 42\]"):
        module.apply({"params": params}, np.zeros((1, 3, 56, 56), np.float32))

