"""LLaVA vs Hugging Face PyTorch on tiny random models and real photos: processor output, logits and every LM,
vision and projector site (float32, rel err <= 1e-5), greedy generation with images, checkpoint layouts, bad input."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from ports import InputError, generate, load_pretrained, save_pretrained
from ports.processing import TokenType, image_chat_batch
from precise_jax import capture
from precise_jax.capture import available_sites
from tests.parity import one_torch_thread, randomize, rel_error, torch_sites
from tests.ports.vlm import (
    LLAVA_TEMPLATE, check_greedy_generation, hf_batch, hf_inputs, logits as forward, photos, tiny_tokenizer,
)

TOL = 1e-5
N = 24  # generated tokens

VARIANTS = {
    # LLaVA-1.5's choices: the second-to-last CLIP layer, class token dropped.
    "llava-1.5": dict(vision_feature_layer=-2, vision_feature_select_strategy="default"),
    # Several feature layers concatenated (the projector's input widens), every token kept.
    "multi-layer-full": dict(vision_feature_layer=[0, -1], vision_feature_select_strategy="full"),
}


def examples():
    p = photos()
    return [
        {"prompt": "What is shown in this image?", "images": [p["astronaut"]]},
        {"prompt": "Explain why the sky is blue."},  # text only, in the same batch
        {"prompt": "How many objects can you count?", "images": [p["logo"], p["page"]]},  # RGBA and L, two images
        {"prompt": "Describe the picture in detail, please.", "images": [p["rocket_portrait"]]},
    ]


def build(variant: str, seed: int, tmp_path_factory):
    tokenizer = tiny_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos="<s>", eos="</s>", pad="<pad>")
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 42},
                                                         crop_size={"height": 42, "width": 42})
    fields = VARIANTS[variant]
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14, num_additional_image_tokens=1,
        vision_feature_select_strategy=fields["vision_feature_select_strategy"], chat_template=LLAVA_TEMPLATE,
    )
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                    num_attention_heads=4, image_size=42, patch_size=14),
        text_config=transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=None, pad_token_id=tokenizer.pad_token_id),
        image_token_index=processor.image_token_id, **fields,
    )
    torch.manual_seed(seed)
    hf = randomize(transformers.LlavaForConditionalGeneration(config), seed, scale=0.15)
    folder = tmp_path_factory.mktemp(variant)
    hf.save_pretrained(folder)
    processor.save_pretrained(folder)
    lm = load_pretrained(folder)
    assert isinstance(lm.processor, transformers.LlavaProcessor)  # transformers' own, torch-free (PIL images)
    return types.SimpleNamespace(hf=hf, lm=lm, processor=lm.processor, folder=folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    built = {}

    def get(variant):
        if variant not in built:
            built[variant] = build(variant, list(VARIANTS).index(variant) + 3, tmp_path_factory)
        return built[variant]

    with one_torch_thread():
        yield get


# ----------------------------------------------------------------------------------------------------- processor


def test_processor_output_matches_transformers(models):
    m = models("llava-1.5")
    batch = image_chat_batch(m.processor, examples())
    expected = hf_batch(m.processor, examples())
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "token_types"}
    for key in ("input_ids", "attention_mask", "pixel_values"):
        np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
    assert batch["pixel_values"].dtype == np.float32 and batch["pixel_values"].shape == (4, 3, 42, 42)

    image_token = m.processor.image_token_id
    types_ = batch["token_types"]
    np.testing.assert_array_equal(types_ == TokenType.IMAGE, batch["input_ids"] == image_token)
    np.testing.assert_array_equal(types_ == TokenType.PAD, batch["attention_mask"] == 0)
    for row, example in zip(range(4), examples()):
        prompt = m.processor.tokenizer.decode(batch["input_ids"][row][types_[row] == TokenType.PROMPT])
        assert prompt == example["prompt"]


def test_every_pil_mode_becomes_rgb_as_transformers_does(models, tmp_path):
    m = models("llava-1.5")
    astronaut = photos()["astronaut"]
    palette = astronaut.convert("P", palette=1, colors=64)  # PIL's adaptive palette
    palette.info["transparency"] = 3  # one palette entry transparent: composited over white
    path = tmp_path / "astronaut.tiff"
    astronaut.convert("CMYK").save(path)
    images = {"CMYK": astronaut.convert("CMYK"), "P": palette, "LA": astronaut.convert("LA"),
              "RGBA": photos()["logo"], "L": photos()["page"], "array": np.asarray(astronaut), "path": path}
    chats = [{"prompt": f"What is this {mode} picture?", "images": [image]} for mode, image in images.items()]
    batch = image_chat_batch(m.processor, chats)
    reference = dict(chats[-1], images=[astronaut.convert("CMYK")])  # transformers takes PIL images
    expected = hf_batch(m.processor, [*chats[:-2], dict(chats[-2], images=[astronaut]), reference])
    np.testing.assert_array_equal(batch["pixel_values"], expected["pixel_values"])
    np.testing.assert_array_equal(batch["input_ids"], expected["input_ids"])


def test_processor_with_a_response_matches_transformers(models):
    m = models("llava-1.5")
    chats = [dict(e, response="A short answer.") for e in examples()[:2]]
    batch = image_chat_batch(m.processor, chats)
    expected = hf_batch(m.processor, chats, generation_prompt=False)
    np.testing.assert_array_equal(batch["input_ids"], expected["input_ids"])
    reply = batch["input_ids"][0][batch["token_types"][0] == TokenType.RESPONSE]
    assert m.processor.tokenizer.decode(reply).strip() == "A short answer."


# ----------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_every_site_match_pytorch(models, variant):
    m = models(variant)
    batch = image_chat_batch(m.processor, examples())
    found = {}
    hooks = [m.hf.model.multi_modal_projector.register_forward_hook(
        lambda module, args, out: found.__setitem__("projector.out", out.detach().numpy()))]
    try:
        with torch.no_grad(), torch_sites(m.hf.model.language_model.layers) as lm_sites, \
                torch_sites(m.hf.model.vision_tower.encoder.layers, "vision", down_proj="fc2") as vision_sites:
            logits = m.hf(**hf_inputs(batch)).logits.numpy()
    finally:
        for h in hooks:
            h.remove()
    expected = {**lm_sites, **vision_sites, **found}

    sites = available_sites(m.lm)
    assert set(sites) == set(expected), "the port exposes exactly the canonical LM, vision and projector sites"
    ours = capture(m.lm, batch, sites)
    valid = batch["attention_mask"].astype(bool)
    assert rel_error(forward(m.lm, batch)[valid], logits[valid]) <= TOL
    errors = {}
    for name in sites:
        theirs, mine = expected[name], np.asarray(ours[name])
        assert mine.shape == theirs.shape, name
        errors[name] = rel_error(mine[valid], theirs[valid]) if name.startswith("lm.") else rel_error(mine, theirs)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{worst}: {errors[worst]:.2e}"
    # Vision and projector sites alone: the forward stops before the first LM layer.
    alone = capture(m.lm, batch, ["projector.out", "vision.layers.1.mlp.act"])
    assert rel_error(alone["projector.out"], expected["projector.out"]) <= TOL


def test_text_only_batch_matches_pytorch(models):
    m = models("llava-1.5")
    batch = image_chat_batch(m.processor, [{"prompt": "Why is the sky blue?"}, {"prompt": "Count to three."}])
    assert "pixel_values" not in batch
    with torch.no_grad():
        logits = m.hf(**hf_inputs(batch)).logits.numpy()
    valid = batch["attention_mask"].astype(bool)
    assert rel_error(forward(m.lm, batch)[valid], logits[valid]) <= TOL


# ----------------------------------------------------------------------------------------------------- generation


def test_greedy_generation_with_images_matches_hf_generate(models):
    m = models("llava-1.5")
    batch = image_chat_batch(m.processor, examples())
    assert len(batch["input_ids"]) == 4
    check_greedy_generation(m, batch, N, TOL)


# ----------------------------------------------------------------------------------------------------- checkpoints


def test_export_reloads_in_transformers_and_every_layout_loads(models, tmp_path):
    m = models("llava-1.5")
    batch = image_chat_batch(m.processor, examples()[:1])
    reference = forward(m.lm, batch)

    out = save_pretrained(m.lm, tmp_path / "export")
    keys = set(load_file(out / "model.safetensors"))
    assert "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight" in keys  # the llava-hf hub layout
    assert "language_model.model.layers.0.mlp.down_proj.weight" in keys and "language_model.lm_head.weight" in keys
    reloaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                                                output_loading_info=True)
    assert not any(info.values()), info  # every tensor in its place, none missing or left over
    with torch.no_grad():
        logits = reloaded(**hf_inputs(batch)).logits.numpy()
    assert rel_error(reference, logits) <= TOL

    # transformers >= 4.52 wrote `model.language_model.*`, `model.vision_tower.vision_model.*`, `lm_head.weight`.
    modern = tmp_path / "modern"
    modern.mkdir()
    rename = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
              ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")]
    tensors = {}
    for key, value in load_file(out / "model.safetensors").items():
        old, new = next((o, n) for o, n in rename if key.startswith(o))
        tensors[new + key[len(old):]] = value
    save_file(tensors, modern / "model.safetensors", metadata={"format": "pt"})
    (modern / "config.json").write_text((out / "config.json").read_text())
    again = load_pretrained(modern)
    assert rel_error(forward(again, batch), reference) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"


# ----------------------------------------------------------------------------------------------------- bad input


def test_bad_images_and_placeholders_raise_naming_the_example(models, tmp_path):
    m = models("llava-1.5")
    good = {"prompt": "What is this?", "images": [photos()["chelsea"]]}
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    truncated = tmp_path / "truncated.jpg"
    photos()["coffee"].save(truncated, format="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:2000])

    with pytest.raises(InputError, match=r"example 1, image 0: .*corrupt\.png is not a readable image"):
        image_chat_batch(m.processor, [good, {"prompt": "And this?", "images": [corrupt]}])
    with pytest.raises(InputError, match=r"example 1, image 0: .*truncated\.jpg is not a readable image"):
        image_chat_batch(m.processor, [good, {"prompt": "And this?", "images": [truncated]}])
    with pytest.raises(InputError, match=r"example 2, image 0: image file .*missing\.png does not exist"):
        image_chat_batch(m.processor, [good, good, {"prompt": "And this?", "images": [tmp_path / "missing.png"]}])
    with pytest.raises(InputError, match=r"example 1: .*2 image placeholder\(s\) '<image>' but 1 image"):
        image_chat_batch(m.processor, [good, {"prompt": "Compare <image> with this.", "images": good["images"]}])
    parts = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."}]
    with pytest.raises(InputError, match=r"example 0: .*2 image placeholder\(s\) '<image>' but 1 image"):
        image_chat_batch(m.processor, [{"prompt": parts, "images": [photos()["chelsea"]]}])


def test_model_refuses_image_tokens_that_do_not_match_the_images(models):
    m = models("llava-1.5")
    batch = image_chat_batch(m.processor, examples()[:1])
    batch["input_ids"] = np.where(batch["input_ids"] == m.processor.image_token_id, 5, batch["input_ids"])
    batch["input_ids"][0, -3] = m.processor.image_token_id
    with pytest.raises(InputError, match="1 image tokens but its 1 image\\(s\\) give 9 image features"):
        m.lm.model.apply({"params": m.lm.params}, **batch)
    with pytest.raises(InputError, match="1 image tokens"):
        generate(m.lm, batch, max_new_tokens=2)
