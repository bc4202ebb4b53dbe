"""Qwen2.5-VL vs Hugging Face PyTorch on a tiny random model (untied head; window attention with a full-attention
block between windowed ones) and real photos: logits and every site, batched greedy generation, text-only batches."""

import pytest

from tests.parity import one_torch_thread
from tests.ports import qwen_vl_support as support, vlm

KIND = "qwen2_5_vl"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    with one_torch_thread():
        yield support.build(KIND, seed=1, folder=tmp_path_factory.mktemp(KIND))


@pytest.fixture(scope="module")
def photos():
    return vlm.photos()


def test_window_attention_is_exercised(model):
    vision = model.lm.config.vision
    assert vision.windowed(0) and not vision.windowed(1) and vision.windowed(2)
    # 56-pixel windows are 2x2 merged tokens: the 8x8-patch astronaut splits into 4 windows, chelsea's 6x8 into 4.
    assert vision.window_size // vision.spatial_merge_size // vision.patch_size == 2


def test_logits_and_every_site_match_pytorch(model, photos):
    examples = [
        {"prompt": "Compare the two photos.", "images": [photos["astronaut"], photos["page"]]},
        {"prompt": [{"type": "text", "text": "What is in"}, {"type": "image"}, {"type": "text", "text": "this photo?"}],
         "images": [photos["chelsea"]], "response": "A cat on a rug."},
        {"prompt": "How do I stay safe online?"},
    ]
    errors = support.forward_errors(model, examples)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= support.TOL, f"{worst}: {errors[worst]:.2e}"


def test_greedy_generation_with_images_matches_hf_generate(model, photos):
    support.check_generation(model, [
        {"prompt": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "with"},
                    {"type": "image"}], "images": [photos["astronaut"], photos["page"]]},
        {"prompt": "What is in this picture?", "images": [photos["coffee"]]},
        {"prompt": "How do I stay safe online?"},
    ])


def test_text_only_batch_matches_pytorch(model):
    support.check_text_only(model, [{"prompt": "Hi"}, {"prompt": "How do I stay safe online? Explain briefly."}])
