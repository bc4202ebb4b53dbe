"""LLaVA-OneVision vs Hugging Face PyTorch on a tiny random model and real photos: anyres tiling (unpadding,
shrinking, newlines), multi-image rows, processor output, logits and every site, greedy generation, bad input."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import transformers

from ports import InputError, generate, load_pretrained
from ports.llava_onevision import LlavaOnevisionProcessor, packing_plan, tiled_images, tiles_of
from ports.processing import TokenType, image_chat_batch
from precise_jax import capture
from precise_jax.capture import available_sites
from tests.parity import one_torch_thread, randomize, rel_error, torch_sites
from tests.ports.vlm import (
    ONEVISION_TEMPLATE, check_greedy_generation, hf_batch, hf_inputs, logits as forward, photos, tiny_tokenizer,
)

TOL = 1e-5
N = 24  # generated tokens
SIDE = 42  # tile side: 3 x 3 patches of 14
PINPOINTS = [[42, 42], [42, 84], [84, 42], [84, 84], [42, 126], [126, 42], [84, 126], [126, 84], [126, 126]]
ASPECT = "anyres_max_2"  # shrink feature maps above ~2 tiles, so the tiny grids exercise HF's interpolation


def small_photo():
    """A 30 x 40 crop: one grid tile, nothing to shrink."""
    return photos()["chelsea"].crop((200, 100, 240, 130))


def examples():
    p = photos()
    return [
        {"prompt": "What is shown in this image?", "images": [p["astronaut"]]},  # square: 3 x 3 tiles, shrunk
        {"prompt": "Explain why the sky is blue."},  # text only
        {"prompt": "Read the page.", "images": [p["page"]]},  # very wide: unpadded rows, then shrunk
        {"prompt": "Compare the two pictures.", "images": [p["logo"], p["coffee"]]},  # multi-image row: no tiles
        {"prompt": "Describe the picture in detail, please.", "images": [p["rocket_portrait"]]},  # portrait
        {"prompt": "What is this?", "images": [small_photo()]},  # one tile, not shrunk
    ]


def build(tmp_path_factory, seed: int = 7):
    """The tiny HF model (saved with its processor) and the port loaded from its folder."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = tiny_tokenizer(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    image_processor = transformers.LlavaOnevisionImageProcessorPil(
        size={"height": SIDE, "width": SIDE}, image_grid_pinpoints=PINPOINTS)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=9,
        vision_feature_select_strategy="full", vision_aspect_ratio=ASPECT, chat_template=ONEVISION_TEMPLATE,
    )
    config = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                      num_attention_heads=4, image_size=SIDE, patch_size=14,
                                                      vision_use_head=False),
        text_config=transformers.Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id),
        image_token_index=processor.image_token_id, video_token_index=processor.video_token_id,
        image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=ASPECT,
    )
    torch.manual_seed(seed)
    hf = randomize(transformers.LlavaOnevisionForConditionalGeneration(config), seed, scale=0.15)
    folder = tmp_path_factory.mktemp("onevision")
    hf.save_pretrained(folder)
    processor.save_pretrained(folder)
    lm = load_pretrained(folder)
    assert type(lm.processor) is LlavaOnevisionProcessor
    return types.SimpleNamespace(hf=hf, lm=lm, processor=lm.processor)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    with one_torch_thread():
        yield build(tmp_path_factory)


def test_examples_cover_every_packing_case(model):
    """Tiling, unpadding of rows and columns, shrinking and its absence, and untiled multi-image rows all occur."""
    batch = image_chat_batch(model.processor, examples())
    spec = model.lm.config
    sizes, counts = batch["image_sizes"], batch["batch_num_images"]
    assert counts.tolist() == [1, 1, 2, 1, 1] and batch["pixel_values"].shape == (6, 10, 3, SIDE, SIDE)
    tiles = [tiles_of(spec, s) if t else 1 for s, t in zip(sizes, tiled_images(len(sizes), counts))]
    assert tiles == [10, 7, 1, 1, 10, 2]
    single = [len(packing_plan(spec, sizes[i:i + 1], None, 10)[0]) for i in (0, 1, 4, 5)]
    # Base tile 9 + rows x (columns + newline). astronaut: 9x9 map shrunk to 4x4. page: 6x9 unpadded to rows
    # 1..4 (4x9), shrunk to 2x6. rocket_portrait: 9x9 unpadded to columns 1..7 (HF's symmetric crop keeps 7 of
    # the 6.0 wide image), shrunk to 4x3. The small crop: 3x3, kept.
    assert single == [9 + 4 * 5, 9 + 2 * 7, 9 + 4 * 4, 9 + 3 * 4]


def test_processor_output_matches_transformers(model):
    # The reference is transformers' processing code: the port's LlavaOnevisionProcessor only leaves out the video
    # processor, which transformers cannot build without torchvision.
    batch = image_chat_batch(model.processor, examples())
    expected = hf_batch(model.processor, examples())
    assert set(batch) == {"input_ids", "attention_mask", "token_types", "pixel_values", "image_sizes",
                          "batch_num_images"}
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images"):
        np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
    image_token = model.processor.image_token_id
    np.testing.assert_array_equal(batch["token_types"] == TokenType.IMAGE, batch["input_ids"] == image_token)
    for row, example in enumerate(examples()):
        prompt = batch["input_ids"][row][batch["token_types"][row] == TokenType.PROMPT]
        assert model.processor.tokenizer.decode(prompt) == example["prompt"]


def valid_tiles(lm, batch) -> np.ndarray:
    """Rows of the port's [N * M] tile batch that HF's tower sees (it drops the zero-padded tiles)."""
    sizes, counts = batch["image_sizes"], batch.get("batch_num_images")
    m = batch["pixel_values"].shape[1]
    tiles = [tiles_of(lm.config, s) if t else 1 for s, t in zip(sizes, tiled_images(len(sizes), counts))]
    return np.concatenate([n * m + np.arange(t) for n, t in enumerate(tiles)])


def test_logits_and_every_site_match_pytorch(model):
    batch = image_chat_batch(model.processor, examples())
    found = {}
    hook = model.hf.model.multi_modal_projector.register_forward_hook(
        lambda module, args, out: found.__setitem__("projector.out", out.detach().numpy()))
    try:
        with torch.no_grad(), torch_sites(model.hf.model.language_model.layers) as lm_sites, \
                torch_sites(model.hf.model.vision_tower.encoder.layers, "vision", down_proj="fc2") as vision_sites:
            logits = model.hf(**hf_inputs(batch)).logits.numpy()
    finally:
        hook.remove()
    expected = {**lm_sites, **vision_sites, **found}

    sites = available_sites(model.lm)
    assert set(sites) == set(expected)
    ours = capture(model.lm, batch, sites)
    valid = batch["attention_mask"].astype(bool)
    assert rel_error(forward(model.lm, batch)[valid], logits[valid]) <= TOL
    tiles = valid_tiles(model.lm, batch)
    errors = {}
    for name in sites:
        mine = np.asarray(ours[name])
        mine = mine[valid] if name.startswith("lm.") else mine[tiles]
        theirs = expected[name][valid] if name.startswith("lm.") else expected[name]
        errors[name] = rel_error(mine, theirs)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{worst}: {errors[worst]:.2e}"


def test_without_batch_num_images_every_image_is_tiled(model):
    """HF's fallback: without batch_num_images each image counts as a single-image row."""
    batch = image_chat_batch(model.processor, [examples()[2], examples()[0]])
    batch.pop("batch_num_images")
    with torch.no_grad():
        logits = model.hf(**hf_inputs(batch)).logits.numpy()
    valid = batch["attention_mask"].astype(bool)
    assert rel_error(forward(model.lm, batch)[valid], logits[valid]) <= TOL


def test_greedy_generation_with_images_matches_hf_generate(model):
    batch = image_chat_batch(model.processor, examples())
    assert len(batch["input_ids"]) == 6
    check_greedy_generation(model, batch, N, TOL)


def test_model_refuses_batches_that_do_not_fit_their_images(model):
    batch = image_chat_batch(model.processor, examples()[:1])
    image_token = model.processor.image_token_id
    short = dict(batch, input_ids=np.where(np.cumsum(batch["input_ids"] == image_token, axis=1) > 20,
                                           7, batch["input_ids"]))
    with pytest.raises(InputError, match="20 image tokens but its 1 image\\(s\\) give 29 image features"):
        generate(model.lm, short, max_new_tokens=2)
    with pytest.raises(InputError, match="needs 10 tiles but pixel_values holds 4"):
        model.lm.model.apply({"params": model.lm.params}, **dict(batch, pixel_values=batch["pixel_values"][:, :4]))
    with pytest.raises(InputError, match="image_sizes"):
        model.lm.model.apply({"params": model.lm.params}, **{k: v for k, v in batch.items() if k != "image_sizes"})
