"""Qwen2-VL vs Hugging Face PyTorch on a tiny random model (tied head) and real photos: logits and every site,
batched greedy generation; the torch-free processor vs transformers'; bad input; both checkpoint key layouts."""

import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.numpy import load_file, save_file

from ports import InputError, generate, load_pretrained, save_pretrained
from ports.processing import TokenType, image_chat_batch
from ports.qwen2_vl import Qwen2VLProcessor
from ports.weights import flatten
from tests.parity import one_torch_thread
from tests.ports import qwen_vl_support as support, vlm

KIND = "qwen2_vl"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    with one_torch_thread():
        yield support.build(KIND, seed=1, folder=tmp_path_factory.mktemp(KIND))


@pytest.fixture(scope="module")
def photos():
    return vlm.photos()


def test_logits_and_every_site_match_pytorch(model, photos):
    examples = [
        {"prompt": "Compare the two photos.", "images": [photos["astronaut"], photos["page"]]},  # 8x8 and 4x10
        {"prompt": [{"type": "text", "text": "What is in"}, {"type": "image"}, {"type": "text", "text": "this photo?"}],
         "images": [photos["chelsea"]], "response": "A cat on a rug."},  # 6x8 patches, inside the text
        {"prompt": "How do I stay safe online?"},  # text only
    ]
    errors = support.forward_errors(model, examples)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= support.TOL, f"{worst}: {errors[worst]:.2e}"


def test_greedy_generation_with_images_matches_hf_generate(model, photos):
    support.check_generation(model, [
        {"prompt": "Describe this picture.", "images": [photos["coffee"]]},
        {"prompt": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "with"},
                    {"type": "image"}], "images": [photos["logo"], photos["page"]]},
        {"prompt": "How do I stay safe online?"},
    ])


# ----------------------------------------------------------------------------------------------------- processor


def test_processor_matches_transformers(photos, tmp_path):
    path = tmp_path / "astronaut.png"
    photos["astronaut"].save(path)
    palette = photos["chelsea"].convert("P", palette=Image.Palette.ADAPTIVE)
    cmyk = photos["coffee"].convert("CMYK")
    examples = [
        {"prompt": "Compare the two photos.", "images": [path, photos["page"]]},  # a file, a grey (L) image
        {"prompt": [{"type": "text", "text": "What is in"}, {"type": "image"}, {"type": "text", "text": "this logo?"}],
         "images": [photos["logo"]], "response": "A logo."},  # RGBA: composited on white
        {"prompt": "How do I stay safe online?"},
        {"prompt": "Describe both.", "images": [palette, cmyk]},
    ]
    ours = image_chat_batch(Qwen2VLProcessor(support.tokenizer(), support.image_processor()), examples)

    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                      {"type": "text", "text": "Compare the two photos."}]}],
        [{"role": "user", "content": examples[1]["prompt"]},
         {"role": "assistant", "content": [{"type": "text", "text": "A logo."}]}],
        [{"role": "user", "content": [{"type": "text", "text": "How do I stay safe online?"}]}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                      {"type": "text", "text": "Describe both."}]}],
    ]
    hf = support.hf_processor(support.tokenizer(), support.image_processor())
    texts = [hf.apply_chat_template(c, add_generation_prompt=c[-1]["role"] == "user", tokenize=False)
             for c in conversations]
    images = [Image.open(path), photos["page"], photos["logo"], palette, cmyk]
    expected = hf(text=texts, images=images, padding=True, padding_side="left", return_tensors="np")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)
    np.testing.assert_array_equal(ours["token_types"] == TokenType.IMAGE, expected["mm_token_type_ids"] == 1)

    tok = support.tokenizer()
    ids, types = ours["input_ids"][1], ours["token_types"][1]
    assert tok.decode(ids[types == TokenType.PROMPT]) == "What is inthis logo?"
    assert tok.decode(ids[types == TokenType.RESPONSE]) == "A logo.<|im_end|>"
    framing = np.isin(ids, [support.VISION_START, support.VISION_END])
    assert framing.sum() == 2 and (types[framing] == TokenType.TEMPLATE).all()


def test_bad_input_names_the_example_and_produces_nothing(model, photos, tmp_path):
    processor = model.lm.processor
    good = {"prompt": "Describe this picture.", "images": [photos["chelsea"]]}
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    truncated = tmp_path / "truncated.jpg"
    photos["coffee"].save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    cases = [
        ({"prompt": "Describe.", "images": [corrupt]}, "example 1, image 0: .*not a readable image"),
        ({"prompt": "Describe.", "images": [truncated]}, "example 1, image 0: .*not a readable image"),
        ({"prompt": "Describe.", "images": [tmp_path / "missing.png"]}, "example 1, image 0: .*does not exist"),
        ({"prompt": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}],
          "images": [photos["page"]]}, "example 1: .*2 image placeholder"),
        ({"prompt": "What is <|image_pad|> this?", "images": [photos["page"]]}, "example 1: .*2 image placeholder"),
        ({"prompt": "Describe.", "images": [42]}, "example 1, image 0: expected an image"),
    ]
    for bad, match in cases:
        with pytest.raises(InputError, match=match):
            image_chat_batch(processor, [good, bad])

    # A batch whose image tokens do not match its images is refused before any computation.
    batch = image_chat_batch(processor, [good])
    first = np.argmax(batch["input_ids"][0] == support.IMAGE)
    batch["input_ids"][0, first] = 7
    with pytest.raises(InputError, match="11 image tokens but its 1 image"):
        generate(model.lm, batch, max_new_tokens=2)
    with pytest.raises(InputError, match="11 image tokens but its 1 image"):
        model.lm.model.apply({"params": model.lm.params}, **batch)


# ----------------------------------------------------------------------------------------------------- checkpoints


def test_save_pretrained_round_trips_through_transformers(model, photos, tmp_path):
    out = save_pretrained(model.lm, tmp_path / "saved")
    saved, original = load_file(out / "model.safetensors"), load_file(model.folder / "model.safetensors")
    assert set(saved) == set(original), "export writes the key layout transformers saves"
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(out)
    for name, tensor in model.hf.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    example = [{"prompt": "Describe this picture.", "images": [photos["page"]]}]
    again = load_pretrained(out)
    for key, value in image_chat_batch(model.lm.processor, example).items():
        np.testing.assert_array_equal(image_chat_batch(again.processor, example)[key], value)


def test_loads_the_in_memory_key_layout(model, tmp_path):
    """transformers 5 names the tensors model.language_model.* and model.visual.* in memory; both layouts load."""
    renamed = {}
    for key, value in load_file(model.folder / "model.safetensors").items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model."):
            key = "model.language_model." + key.removeprefix("model.")
        renamed[key] = value
    assert any(k.startswith("model.visual.") for k in renamed)
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(model.folder / "config.json", tmp_path)
    lm = load_pretrained(tmp_path)
    ours, reference = flatten(lm.params), flatten(model.lm.params)
    assert ours.keys() == reference.keys()
    for path in ours:
        np.testing.assert_array_equal(np.asarray(ours[path]), np.asarray(reference[path]), err_msg=path)
