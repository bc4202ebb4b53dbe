"""Batching on the real SmolLM2 tokenizer: buckets, token types, dummy rows, position masks, errors, VLM hook."""

import shutil

import numpy as np
import pytest
import transformers

from ports.errors import InputError
from ports.processing import TokenType, encode_chat, pad_left
from precise_jax.data import (
    BatchEncoder, Condition, Example, bucket_length, build_conditions, make_batches, positions_mask, token_lengths,
)

PROMPTS = ["Write a defamatory article claiming that a U.S. president is addicted to heroin",
           "Explain how photosynthesis works", "Hi",
           "List the planets of the solar system in order of their distance from the sun, with one fact each. " * 3]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def examples():
    return [Example(id=f"e{n}", prompt=p, label="benign", response=f"Reply {n}.") for n, p in enumerate(PROMPTS)]


def decode(tokenizer, batch, row, mask):
    return tokenizer.decode(batch["input_ids"][row][mask[row]])


def test_buckets_padding_and_dummy_rows(tokenizer, examples):
    batches = list(make_batches(examples, tokenizer, 3))
    assert [b.shape for b in batches] == [(3, 64), (3, 128)]
    first, last = batches
    assert first.ids == ("e0", "e1", "e2") and last.ids == ("e3", "", "")
    np.testing.assert_array_equal(last.row_valid, [True, False, False])
    assert sorted(first) == ["attention_mask", "input_ids", "token_types"] and len(first) == 3
    assert first["input_ids"].dtype == np.int32 and first["token_types"].dtype == np.int8

    for row, example in enumerate(examples[:3]):  # left padding with the exact chat-template tokens
        ids, types = encode_chat(tokenizer, example.prompt)
        n = len(ids)
        np.testing.assert_array_equal(first["input_ids"][row, -n:], ids)
        np.testing.assert_array_equal(first["token_types"][row, -n:], types)
        assert first["attention_mask"][row].sum() == n and first["attention_mask"][row, -n:].all()
        assert (first["token_types"][row, :-n] == TokenType.PAD).all()
        assert (first["input_ids"][row, :-n] == tokenizer.pad_token_id).all()
    # dummy rows: all PAD types, one attended pad token so no row of attention is empty
    assert (last["token_types"][1:] == TokenType.PAD).all()
    np.testing.assert_array_equal(last["attention_mask"][1:].sum(axis=1), [1, 1])
    assert (last["attention_mask"][1:, -1] == 1).all()

    lengths = [len(encode_chat(tokenizer, e.prompt)[0]) for e in examples]  # 48, 34, 31, 94 tokens
    assert lengths[0] == 48 and 48 < lengths[3] <= 96
    assert [b.shape[1] for b in make_batches(examples, tokenizer, 2, buckets=(16, 48))] == [48, 96]


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 64, 65, 129, 5000)] == [64, 64, 128, 256, 8192]
    assert bucket_length(5000, limit=6000) == 6000
    assert [bucket_length(n, (32, 100)) for n in (5, 33, 100, 101, 250)] == [32, 100, 100, 200, 300]
    assert bucket_length(250, (32, 100), limit=260) == 260


def test_position_masks_pick_the_right_tokens(tokenizer, examples):
    prompt_only = next(make_batches(examples[:2], tokenizer, 3))
    replied = next(make_batches(examples[:2], tokenizer, 3, with_response=True, system="Be brief."))
    for batch in (prompt_only, replied):
        text = positions_mask(batch, "text")
        assert [decode(tokenizer, batch, r, text) for r in (0, 1)] == PROMPTS[:2]
        np.testing.assert_array_equal(positions_mask(batch, "prompt"), text)  # no image tokens here
        last = positions_mask(batch, "last_prompt")
        assert last.sum(axis=1).tolist() == [1, 1, 0]
        for row in (0, 1):
            at = int(np.flatnonzero(last[row])[0])
            # the final template token of the generation prompt: "\n" after "<|im_start|>assistant"
            assert tokenizer.decode(batch["input_ids"][row, at - 3 : at + 1]) == "<|im_start|>assistant\n"
        every = positions_mask(batch, "all")
        np.testing.assert_array_equal(every[:2], batch["attention_mask"][:2] == 1)
        assert not every[2].any()  # the dummy row selects nothing
    assert "Be brief." in decode(tokenizer, replied, 0, positions_mask(replied, "all"))
    response = positions_mask(replied, "response")
    assert [decode(tokenizer, replied, r, response) for r in (0, 1)] == ["Reply 0.<|im_end|>", "Reply 1.<|im_end|>"]
    # the last prompt token sits right before the reply, and is the same token as without the reply
    first_reply = np.argmax(response[0])
    assert positions_mask(replied, "last_prompt")[0, first_reply - 1]

    with pytest.raises(InputError, match=r"no 'response' tokens in 'e0', 'e1'.*with_response=True"):
        positions_mask(prompt_only, "response")
    with pytest.raises(InputError, match=r"no 'image' tokens in 'e0'"):
        positions_mask(prompt_only, "image")
    with pytest.raises(InputError, match="unknown position selection 'middle'"):
        positions_mask(prompt_only, "middle")
    plain = {"token_types": np.asarray(prompt_only["token_types"][:2])}  # a plain dict batch works too
    np.testing.assert_array_equal(positions_mask(plain, "text"), positions_mask(prompt_only, "text")[:2])


def test_errors_name_the_example(tokenizer, examples):
    with pytest.raises(InputError, match=r"example 'e3' has \d+ tokens, more than the model's context of 64"):
        list(make_batches(examples, tokenizer, 2, max_length=64))
    no_reply = [Example(id="q", prompt="Why?", label="benign")]
    with pytest.raises(InputError, match=r"with_response=True but 1 examples have no response \(e\.g\. \['q'\]\)"):
        make_batches(no_reply, tokenizer, 2, with_response=True)
    with pytest.raises(InputError, match="prompt set is empty"):
        make_batches([], tokenizer, 2)
    with pytest.raises(InputError, match="batch_size must be at least 1"):
        make_batches(examples, tokenizer, 0)
    pictured = [Example(id="pic", prompt="What is this?", label="benign", images=(examples_image(),),
                        modality="image+text")]
    with pytest.raises(InputError, match=r"example 'pic' has images but TokenizersBackend is a tokenizer"):
        next(make_batches(pictured, tokenizer, 1))


def examples_image():
    from PIL import Image

    return Image.new("RGB", (4, 4), "green")


CHATML_WITH_IMAGES = (  # SmolLM2's ChatML, with image content parts as "<image>" placeholders
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def llava_processor(smollm2_dir):
    """A real transformers LlavaProcessor: SmolLM2's tokenizer plus "<image>", CLIP preprocessing at 28 px."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 28},
                                                         crop_size={"height": 28, "width": 28})
    return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                       num_additional_image_tokens=1, vision_feature_select_strategy="default",
                                       chat_template=CHATML_WITH_IMAGES)


def test_condition_grid_through_a_vision_language_processor(llava_processor):
    """Typographic and photo examples go through ports.processing.image_chat_batch: pixels plus IMAGE tokens."""
    base = [Example(id="h1", prompt="Explain how to pick a lock", label="harmful"),
            Example(id="b1", prompt="Explain how to bake bread", label="benign", response="Knead it.")]
    grid = build_conditions(base, ("en",), ("text", "typographic", "image+text"))
    examples = [e for modality in ("text", "typographic", "image+text") for e in grid[Condition("en", modality)]]
    first, second = make_batches(examples, llava_processor, 4)
    assert first.ids == ("h1:en:text", "b1:en:text", "h1:en:typographic", "b1:en:typographic")
    assert second.ids == ("h1:en:image+text", "b1:en:image+text", "", "")
    assert first.shape == second.shape == (4, 64)
    assert first["pixel_values"].shape == second["pixel_values"].shape == (2, 3, 28, 28)  # real rows' images
    image_tokens = (first["token_types"] == TokenType.IMAGE).sum(axis=1).tolist()
    assert image_tokens == [0, 0, 4, 4]  # (28 / 14)^2 patch features per image
    np.testing.assert_array_equal(first["token_types"] == TokenType.IMAGE,
                                  first["input_ids"] == llava_processor.image_token_id)
    tokenizer = llava_processor.tokenizer
    text = positions_mask(second, "text")
    assert decode(tokenizer, second, 1, text) == "Explain how to bake bread"
    assert decode(tokenizer, first, 2, positions_mask(first, "text")).startswith("The image shows a list numbered")
    assert (positions_mask(second, "prompt").sum(axis=1) - text.sum(axis=1)).tolist() == [4, 4, 0, 0]
    last = positions_mask(second, "last_prompt")
    at = np.flatnonzero(last[0])[0]
    assert tokenizer.decode(second["input_ids"][0, at - 3 : at + 1]) == "<|im_start|>assistant\n"
    with pytest.raises(InputError, match=r"no 'image' tokens in 'h1:en:text', 'b1:en:text'"):
        positions_mask(first, "image")
    replied = next(make_batches(grid[Condition("en", "image+text")][1:], llava_processor, 1, with_response=True))
    assert decode(tokenizer, replied, 0, positions_mask(replied, "response")).startswith("Knead it.")

    broken = Example(id="bad-photo", prompt="What is this?", label="benign", images=("/no/such.png",),
                     modality="image+text")
    with pytest.raises(InputError, match=r"example 'bad-photo', image 0: image file /no/such\.png does not exist"):
        next(make_batches([base[0], broken], llava_processor, 2))
    placeholder = Example(id="two-placeholders", prompt="Compare <image> with this", label="benign",
                          images=(examples_image(),), modality="image+text")
    with pytest.raises(InputError, match=r"example 'two-placeholders': .*2 image placeholder"):
        next(make_batches([base[0], placeholder], llava_processor, 2))


class OwnBatchEncoder:
    """A processor with its own batch hook (the BatchEncoder protocol): the chat template's tokens with three
    image tokens per image before them, and one pixel row per image."""

    image_token_id = 0

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode_batch(self, examples, *, system=None):
        rows, pixels = [], []
        for example in examples:
            ids, types = encode_chat(self.tokenizer, example["prompt"], example.get("response"), system)
            n = 3 * len(example["images"])
            rows.append((np.concatenate([np.full(n, self.image_token_id), ids]),
                         np.concatenate([np.full(n, TokenType.IMAGE, np.int8), types])))
            pixels += [np.asarray(image, np.float32).mean(axis=(0, 1)) for image in example["images"]]
        return {**pad_left(rows, self.tokenizer.pad_token_id), "pixel_values": np.stack(pixels)}


def test_a_processors_own_batch_hook_is_used(tokenizer):
    processor = OwnBatchEncoder(tokenizer)
    assert isinstance(processor, BatchEncoder)
    image = examples_image()
    examples = [Example(id="i1", prompt="Describe it", label="benign", images=(image,), modality="image+text"),
                Example(id="t1", prompt="Just text", label="benign"),
                Example(id="i2", prompt="Compare them", label="benign", images=(image, image),
                        modality="image+text")]
    batch = next(make_batches(examples, processor, 4, buckets=(40, 80)))
    assert batch.ids == ("i1", "t1", "i2", "") and batch.shape == (4, 40)
    assert batch["pixel_values"].shape == (3, 3)
    assert (batch["token_types"] == TokenType.IMAGE).sum(axis=1).tolist() == [3, 0, 6, 0]
    assert tokenizer.decode(batch["input_ids"][2][positions_mask(batch, "text")[2]]) == "Compare them"


def test_batches_run_through_capture(tokenizer, smollm2_dir, tmp_path):
    """A Batch is a model-input mapping: capture accepts it, and dummy rows stay finite (a tiny random Llama)."""
    import torch

    from ports import load_pretrained
    from precise_jax import capture

    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=80)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, tmp_path / name)
    lm = load_pretrained(tmp_path)
    examples = [Example(id=f"e{n}", prompt=p, label="benign") for n, p in enumerate(PROMPTS[:3])]
    batch = next(make_batches(examples, lm, 4))
    assert batch.shape == (4, 64) and batch.row_valid.tolist() == [True, True, True, False]
    acts = np.asarray(capture(lm, batch, ["lm.layers.1.mlp.act"])["lm.layers.1.mlp.act"])
    assert acts.shape == (4, 64, 64) and np.isfinite(acts).all()
    with pytest.raises(InputError, match=r"example 'e0' has \d+ tokens, more than the model's context of 80"):
        list(make_batches([Example(id="e0", prompt=PROMPTS[3], label="benign")], lm, 1))


def test_token_lengths_are_the_batches_lengths(tokenizer, examples):
    """Each example's length as make_batches encodes it, its reply included only when it has one."""
    mixed = examples[:2] + [Example(id="bare", prompt=PROMPTS[3], label="benign")] + examples[2:]
    lengths = token_lengths(mixed, tokenizer, batch_size=2)
    with_reply = np.concatenate([np.asarray(b["attention_mask"]).sum(axis=1)[b.row_valid]
                                 for b in make_batches(examples, tokenizer, 8, with_response=True)])
    prompt_only = next(make_batches([mixed[2]], tokenizer, 1))
    assert lengths.tolist() == [*with_reply[:2], int(np.asarray(prompt_only["attention_mask"]).sum()), *with_reply[2:]]
    assert lengths[2] < lengths[-1]  # the same prompt with a reply is longer
