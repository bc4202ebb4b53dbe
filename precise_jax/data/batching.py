"""Examples -> fixed-shape batches (left padding to a few bucket lengths, so jit compiles a few shapes), and
position masks that pick tokens by their type.

A tokenizer encodes text examples one by one through its chat template (`ports.processing.encode_chat`). A
vision-language processor encodes each batch as a whole (the pixel layout can depend on the whole batch): through
its own `encode_batch` method when it has one (the `BatchEncoder` protocol), else through
`ports.processing.image_chat_batch`; text-only examples go the same way, so one template serves the batch.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ports.errors import InputError
from ports.processing import TokenType, encode_chat, load_image, pad_left
from precise_jax.data.examples import Example

POSITIONS = ("prompt", "last_prompt", "image", "text", "response", "all")
_SMALLEST_BUCKET = 64


@runtime_checkable
class BatchEncoder(Protocol):
    """The hook a vision-language processor may provide (default: ports.processing.image_chat_batch).

    examples: [{"prompt": str, "images": [RGB PIL images], "response": str (optional)}] -> a left-padded batch
    {"input_ids", "attention_mask", "token_types": [n, T], pixel inputs in the Hugging Face layout}.
    """

    def encode_batch(self, examples: Sequence[Mapping[str, Any]], *, system: str | None = None) -> dict:
        ...


@dataclasses.dataclass(frozen=True)
class Batch(Mapping[str, np.ndarray]):
    """Model inputs as a mapping (input_ids, attention_mask, token_types [B, T], pixel inputs), plus row info.

    Rows past the last example are dummies (row_valid False, id ""): all PAD, attending to one pad token so no
    row of the forward pass is empty.
    """

    arrays: dict[str, np.ndarray]
    ids: tuple[str, ...]  # [B]; "" for dummy rows
    row_valid: np.ndarray  # [B] bool

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, tokens)."""
        return self.arrays["input_ids"].shape


def make_batches(
    examples: Sequence[Example],
    processor_or_tokenizer: Any,
    batch_size: int,
    *,
    buckets: Sequence[int] | None = None,
    system: str | None = None,
    with_response: bool = False,
    max_length: int | None = None,
) -> Iterator[Batch]:
    """Batches of `batch_size` rows in example order, each left-padded to the smallest bucket length that fits.

    `buckets` default to 64, 128, 256, ... (past the largest given bucket, multiples of it), capped at the
    context length: `max_length`, else the model's max_position_embeddings (a Pretrained given), else the
    tokenizer's model_max_length. A longer example raises InputError naming it.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    if not examples:
        raise InputError("no examples to batch: the prompt set is empty")
    if buckets is not None and (not buckets or min(buckets) < 1):
        raise InputError(f"buckets must be positive token lengths, got {buckets}")
    if with_response:
        lacking = [e.id for e in examples if e.response is None]
        if lacking:
            raise InputError(f"with_response=True but {len(lacking)} examples have no response (e.g. {lacking[:5]})")
    processor, limit = _processor_and_limit(processor_or_tokenizer, max_length)
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return _batches(list(examples), processor, tokenizer, batch_size, buckets, system, with_response, limit, pad_id)


def token_lengths(examples: Sequence[Example], processor_or_tokenizer: Any, *, system: str | None = None,
                  batch_size: int = 16) -> np.ndarray:
    """[N] tokens of each example as `make_batches` encodes it (its reply included when it has one; image tokens
    expanded by a vision-language processor), before padding."""
    processor, _ = _processor_and_limit(processor_or_tokenizer, None)
    tokenizer = getattr(processor, "tokenizer", processor)
    multimodal = isinstance(processor, BatchEncoder) or hasattr(processor, "image_processor")
    lengths = np.zeros(len(examples), np.int64)
    for with_response in (False, True):
        rows = [i for i, e in enumerate(examples) if (e.response is not None) == with_response]
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            chunk = [examples[i] for i in part]
            if multimodal:
                lengths[part] = _encode_images(chunk, processor, system, with_response)["attention_mask"].sum(axis=1)
            else:
                lengths[part] = [len(_encode_text(e, tokenizer, system, with_response)[0]) for e in chunk]
    return lengths


def positions_mask(batch: Mapping[str, Any], which: str) -> np.ndarray:
    """[B, T] bool: the tokens of each valid row that `which` selects; a valid row with none raises InputError.

    prompt: prompt text and image tokens; text: prompt text only; image: image tokens; response: reply tokens;
    all: every non-pad token (template included); last_prompt: the token just before the reply, i.e. the last
    token of the chat template's generation prompt (for ChatML, the "\\n" after "<|im_start|>assistant"), whose
    output predicts the first reply token; the same token with and without a response.
    """
    if which not in POSITIONS:
        raise InputError(f"unknown position selection {which!r}; use one of {POSITIONS}")
    types = np.asarray(batch["token_types"])
    valid = getattr(batch, "row_valid", None)
    if valid is None:  # a plain dict batch: its own row_valid entry, else every row
        valid = batch.get("row_valid", np.ones(types.shape[0], bool))
    valid = np.asarray(valid, bool)
    if which == "last_prompt":
        mask = np.zeros(types.shape, bool)
        for row, row_types in enumerate(types):
            reply = np.flatnonzero(row_types == TokenType.RESPONSE)
            real = np.flatnonzero(row_types != TokenType.PAD)
            last = reply[0] - 1 if len(reply) else (real[-1] if len(real) else -1)
            if last >= 0 and row_types[last] != TokenType.PAD:
                mask[row, last] = True
    else:
        kinds = {"prompt": (TokenType.PROMPT, TokenType.IMAGE), "text": (TokenType.PROMPT,),
                 "image": (TokenType.IMAGE,), "response": (TokenType.RESPONSE,)}
        mask = types != TokenType.PAD if which == "all" else np.isin(types, kinds[which])
    mask &= valid[:, None]
    empty = np.flatnonzero(valid & ~mask.any(axis=1))
    if len(empty):
        ids = getattr(batch, "ids", None)
        rows = [ids[r] if ids else f"row {r}" for r in empty]
        raise InputError(f"no {which!r} tokens in {', '.join(map(repr, rows[:5]))}; choose another position "
                         "selection, or batch with_response=True / image examples for 'response' / 'image'")
    return mask


def bucket_length(n: int, buckets: Sequence[int] | None = None, limit: int | None = None) -> int:
    """The padded length for a longest row of `n` tokens: the smallest bucket >= n, capped at `limit`."""
    if buckets is None:
        length = _SMALLEST_BUCKET
        while length < n:
            length *= 2
    else:
        fitting = [b for b in sorted(buckets) if b >= n]
        largest = max(buckets)
        length = fitting[0] if fitting else -(-n // largest) * largest
    return min(length, limit) if limit else length


def _processor_and_limit(obj: Any, max_length: int | None) -> tuple[Any, int | None]:
    """(processor or tokenizer, context length) from a tokenizer, a processor or a loaded Pretrained."""
    if hasattr(obj, "hf_config") and hasattr(obj, "processor"):  # a ports.Pretrained
        if obj.processor is None:
            raise InputError(f"the model from {obj.source} has no tokenizer files; load one and pass it instead")
        config = obj.hf_config.get("text_config", obj.hf_config)
        return obj.processor, max_length or config.get("max_position_embeddings")
    if max_length is None:
        tokenizer = getattr(obj, "tokenizer", obj)
        declared = getattr(tokenizer, "model_max_length", None)
        max_length = declared if isinstance(declared, int) and declared < 10**7 else None  # HF's "no limit" is 1e30
    return obj, max_length


def _batches(examples, processor, tokenizer, batch_size, buckets, system, with_response, limit, pad_id):
    multimodal = isinstance(processor, BatchEncoder) or hasattr(processor, "image_processor")
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        if multimodal:
            arrays = _encode_images(chunk, processor, system, with_response)
        else:
            arrays = pad_left([_encode_text(e, tokenizer, system, with_response) for e in chunk], pad_id)
        lengths = arrays["attention_mask"].sum(axis=1)
        for example, n in zip(chunk, lengths):
            if limit and n > limit:
                raise InputError(f"example {example.id!r} has {n} tokens, more than the model's context of "
                                 f"{limit}; shorten it or drop it from the set")
        yield _to_bucket(arrays, [e.id for e in chunk], batch_size,
                         bucket_length(int(lengths.max()), buckets, limit), pad_id)


def _encode_text(example: Example, tokenizer, system, with_response) -> tuple[np.ndarray, np.ndarray]:
    if example.images:
        raise InputError(f"example {example.id!r} has images but {type(tokenizer).__name__} is a tokenizer; "
                         "batch image examples with the vision-language model's processor")
    try:
        return encode_chat(tokenizer, example.prompt, example.response if with_response else None, system)
    except InputError as error:
        raise InputError(f"example {example.id!r}: {error}") from None


def _encode_images(chunk: Sequence[Example], processor, system, with_response) -> dict:
    """One batch through the processor's hook; its errors name examples by id rather than by position."""
    rows = []
    for example in chunk:
        images = [load_image(image, f"example {example.id!r}, image {k}") for k, image in enumerate(example.images)]
        rows.append({"prompt": example.prompt, "images": images,
                     **({"response": example.response} if with_response else {})})
    try:
        if isinstance(processor, BatchEncoder):
            arrays = processor.encode_batch(rows, system=system)
        else:
            from ports.processing import image_chat_batch

            arrays = image_chat_batch(processor, rows, system=system)
    except InputError as error:
        named = re.sub(r"\bexample (\d+)", lambda m: f"example {chunk[int(m.group(1))].id!r}", str(error), count=1)
        raise InputError(named) from None
    return {key: np.asarray(value) for key, value in arrays.items()}


def _to_bucket(arrays: dict, ids: list[str], batch_size: int, length: int, pad_id: int) -> Batch:
    """Left-pad [n, T] token arrays to [batch_size, length], adding dummy rows; other inputs pass through."""
    n, width = arrays["input_ids"].shape
    token_arrays = {
        "input_ids": np.full((batch_size, length), pad_id, np.int32),
        "attention_mask": np.zeros((batch_size, length), np.int32),
        "token_types": np.full((batch_size, length), TokenType.PAD, np.int8),
    }
    for key, out in token_arrays.items():
        out[:n, length - width:] = arrays[key]
    token_arrays["attention_mask"][n:, -1] = 1  # dummy rows attend to one pad token: no all-masked softmax
    others = {key: value for key, value in arrays.items() if key not in token_arrays}
    return Batch({**token_arrays, **others}, tuple(ids) + ("",) * (batch_size - n), np.arange(batch_size) < n)
