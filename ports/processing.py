"""Chat examples -> token ids with a token type per token, so pooling and interventions never guess positions.

Token types: PAD, TEMPLATE (chat-template and system text), IMAGE (image placeholder tokens), PROMPT (the user's
text), RESPONSE (the assistant's reply and its end-of-turn token).
"""

from __future__ import annotations

import enum
from typing import Sequence

import numpy as np

from ports.errors import InputError


class TokenType(enum.IntEnum):
    PAD = 0
    TEMPLATE = 1
    IMAGE = 2
    PROMPT = 3
    RESPONSE = 4


def chat_messages(prompt: str | list, response: str | None = None, system: str | None = None) -> list[dict]:
    """The conversation of one example: optional system turn, a user turn (text or content parts), a reply."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def encode_chat(
    tokenizer,
    prompt: str,
    response: str | None = None,
    system: str | None = None,
    image_token_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One example -> (ids [T], token types [T]) through the tokenizer's chat template.

    Without a response the ids end with the generation prompt (ready to generate); with one, the reply follows.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"an example has an empty or non-text prompt ({prompt!r}); every prompt needs text")
    head = tokenizer.apply_chat_template(
        chat_messages(prompt, system=system), add_generation_prompt=True, tokenize=False
    )
    text = head if response is None else tokenizer.apply_chat_template(
        chat_messages(prompt, response, system), tokenize=False
    )
    if not text.startswith(head):
        raise InputError("the chat template renders the reply in a way that changes the prompt's text; "
                         "token types cannot be assigned for this template")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], np.int64)
    starts = np.asarray([start for start, _ in encoded["offset_mapping"]], np.int64)
    types = np.full(len(ids), TokenType.TEMPLATE, np.int8)

    user_at = text.rfind(prompt, 0, len(head))
    if user_at < 0:
        raise InputError(f"the chat template does not contain the prompt verbatim (prompt {prompt[:60]!r}...); "
                         "token types cannot be assigned for this template")
    types[(starts >= user_at) & (starts < user_at + len(prompt))] = TokenType.PROMPT
    if response is not None:
        reply = np.nonzero(starts >= len(head))[0]
        stops = _end_of_turn_ids(tokenizer)
        for i in reply:
            types[i] = TokenType.RESPONSE
            if ids[i] in stops:
                break
    if image_token_id is not None:
        types[ids == image_token_id] = TokenType.IMAGE
    return ids, types


def _end_of_turn_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids


def pad_left(rows: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int, length: int | None = None) -> dict:
    """Left-pad (ids, types) rows to `length` (default: the longest) -> input_ids, attention_mask, token_types."""
    width = max(len(ids) for ids, _ in rows) if length is None else length
    if any(len(ids) > width for ids, _ in rows):
        raise InputError(f"an example has more than {width} tokens; raise the length or shorten the prompt")
    batch = {
        "input_ids": np.full((len(rows), width), pad_id, np.int32),
        "attention_mask": np.zeros((len(rows), width), np.int32),
        "token_types": np.full((len(rows), width), TokenType.PAD, np.int8),
    }
    for r, (ids, types) in enumerate(rows):
        if len(ids):
            batch["input_ids"][r, -len(ids):] = ids
            batch["attention_mask"][r, -len(ids):] = 1
            batch["token_types"][r, -len(ids):] = types
    return batch
