"""Chat encoding with token types, on the real SmolLM2 tokenizer."""

import numpy as np
import pytest
import transformers

from ports import InputError
from ports.processing import TokenType, encode_chat, pad_left


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def spans(tokenizer, ids, types, kind):
    return tokenizer.decode(ids[types == kind])


def test_prompt_and_response_tokens_are_marked(tokenizer):
    prompt, reply = "List three uses of baking soda, please.", "Cleaning, baking and deodorising."
    ids, types = encode_chat(tokenizer, prompt, reply)
    assert spans(tokenizer, ids, types, TokenType.PROMPT) == prompt
    assert spans(tokenizer, ids, types, TokenType.RESPONSE) == reply + "<|im_end|>"
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}], tokenize=True)
    np.testing.assert_array_equal(ids, np.asarray(expected["input_ids"] if hasattr(expected, "keys") else expected))
    assert set(np.unique(types)) == {TokenType.TEMPLATE, TokenType.PROMPT, TokenType.RESPONSE}


def test_generation_prompt_without_response(tokenizer):
    ids, types = encode_chat(tokenizer, "Why is the sky blue?", system="Answer briefly.")
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and "Answer briefly." in text
    assert TokenType.RESPONSE not in types
    assert spans(tokenizer, ids, types, TokenType.PROMPT) == "Why is the sky blue?"


def test_pad_left(tokenizer):
    rows = [encode_chat(tokenizer, "Hi"), encode_chat(tokenizer, "A much longer question about the weather?")]
    batch = pad_left(rows, tokenizer.pad_token_id)
    n = len(rows[0][0])
    assert batch["attention_mask"][0].sum() == n and batch["attention_mask"][0, -n:].all()
    assert (batch["token_types"][0, :-n] == TokenType.PAD).all()
    np.testing.assert_array_equal(batch["input_ids"][1], rows[1][0])


def test_bad_input(tokenizer):
    with pytest.raises(InputError, match="empty"):
        encode_chat(tokenizer, "   ")
    rows = [encode_chat(tokenizer, "A question that is not short at all")]
    with pytest.raises(InputError, match="more than 8 tokens"):
        pad_left(rows, 0, length=8)
