"""Chat examples -> token ids with a token type per token, so pooling and interventions never guess positions.

Token types: PAD, TEMPLATE (chat-template and system text), IMAGE (image placeholder tokens), PROMPT (the user's
text), RESPONSE (the assistant's reply and its end-of-turn token).
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from ports.errors import InputError

if TYPE_CHECKING:
    import PIL.Image

# A transformers tokenizer or processor, or a port's own processor (qwen2_vl, llava_onevision): duck-typed, as these
# functions use only what they all share (the chat template, tokenizing, `batch_decode`, `image_token`).
Processor = Any


class TokenType(enum.IntEnum):
    PAD = 0
    TEMPLATE = 1
    IMAGE = 2
    PROMPT = 3
    RESPONSE = 4


def chat_messages(prompt: str | list, response: str | None = None, system: str | None = None) -> list[dict]:
    """The conversation of one example: optional system turn, a user turn (text or content parts), a reply.

    With content parts (a VLM's prompt) the system turn and the reply are text parts too, as VLM templates expect."""
    part = (lambda text: [{"type": "text", "text": text}]) if isinstance(prompt, list) else (lambda text: text)
    messages = [{"role": "system", "content": part(system)}] if system is not None else []
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": part(response)})
    return messages


def encode_chat(
    tokenizer: Processor,
    prompt: str | list[dict],
    response: str | None = None,
    system: str | None = None,
    image_token_id: int | None = None,
    *,
    template: Processor | None = None,
    expand: Callable[[str], str] | None = None,
    add_special_tokens: bool | None = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One example -> (ids [T], token types [T]) through the chat template of `template` (default: the tokenizer).

    `prompt` is text or content parts (`{"type": "image"}`, `{"type": "text", "text": ...}`); `expand` rewrites the
    rendered conversation before tokenizing (a VLM's image placeholders into their feature tokens);
    `add_special_tokens=None` adds them unless the text starts with BOS, as processors' `apply_chat_template` does.
    Without a response the ids end with the generation prompt (ready to generate); with one, the reply follows.
    """
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, list):
        texts = [p.get("text") for p in prompt if isinstance(p, dict) and p.get("type") == "text"]
    else:
        texts = []
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise InputError(f"an example has an empty or non-text prompt ({prompt!r}); every prompt needs text")
    template = tokenizer if template is None else template
    expand = expand or (lambda rendered: rendered)
    head = expand(template.apply_chat_template(
        chat_messages(prompt, system=system), add_generation_prompt=True, tokenize=False
    ))
    text = head if response is None else expand(template.apply_chat_template(
        chat_messages(prompt, response, system), tokenize=False
    ))
    if not text.startswith(head):
        raise InputError("the chat template renders the reply in a way that changes the prompt's text; "
                         "token types cannot be assigned for this template")
    if add_special_tokens is None:
        add_special_tokens = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], np.int64)
    starts = np.asarray([start for start, _ in encoded["offset_mapping"]], np.int64)
    types = np.full(len(ids), TokenType.TEMPLATE, np.int8)

    end = len(head)
    for part in reversed(texts):  # the user's text parts, found from the end so a system text cannot shadow them
        user_at = text.rfind(part, 0, end)
        if user_at < 0:
            raise InputError(f"the chat template does not contain the prompt verbatim (prompt {part[:60]!r}...); "
                             "token types cannot be assigned for this template")
        types[(starts >= user_at) & (starts < user_at + len(part))] = TokenType.PROMPT
        end = user_at
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


# ----------------------------------------------------------------------------------------------------- images


def load_image(image: str | os.PathLike | np.ndarray | PIL.Image.Image, where: str) -> PIL.Image.Image:
    """A path, PIL image or uint8 array [H, W(, C)] -> an RGB PIL image; transparency goes over white, as
    transformers' `convert_to_rgb` does. `where` names the example in errors."""
    import PIL.Image

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"{where}: image file {path} does not exist; check the path")
        try:
            with PIL.Image.open(path) as opened:
                opened.load()  # decode now: a truncated file fails here, not inside the processor
                return _rgb(opened)
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
            raise InputError(f"{where}: {path} is not a readable image ({e}); re-export or re-download it") from None
    if isinstance(image, np.ndarray):
        array = image
        try:
            image = PIL.Image.fromarray(array)
        except (TypeError, ValueError) as e:
            raise InputError(f"{where}: an array of {array.dtype} {array.shape} is not an image ({e}); "
                             "give uint8 [height, width] or [height, width, 3 or 4]") from None
    if not isinstance(image, PIL.Image.Image):
        raise InputError(f"{where}: expected an image path, PIL image or uint8 array, got {type(image).__name__}")
    try:
        return _rgb(image)
    except (OSError, ValueError) as e:
        raise InputError(f"{where}: cannot convert a {image.mode} image to RGB ({e})") from None


def _rgb(image):
    import PIL.Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def image_chat_batch(processor: Processor, examples: Sequence[Mapping], *, system: str | None = None) -> dict:
    """Examples {"prompt", "images" (paths, PIL images or arrays; optional), "response" (optional)} -> one
    left-padded batch: the processor's ids and pixel inputs (`pixel_values`, `image_sizes`, ...) plus `token_types`.

    A text prompt gets its images before the text (`[{"type": "image"}, ..., {"type": "text", ...}]`); content
    parts are used as given. A missing or unreadable image, or a prompt whose image placeholders do not match its
    images, raises InputError naming the example, and nothing is returned."""
    if not examples:
        raise InputError("image_chat_batch got no examples; give at least one {'prompt': ...}")
    token = processor.image_token
    images, conversations = [], []
    for i, example in enumerate(examples):
        mine = [load_image(image, f"example {i}, image {j}") for j, image in enumerate(example.get("images") or [])]
        prompt = example.get("prompt")
        if isinstance(prompt, str):
            parts = [{"type": "image"}] * len(mine) + [{"type": "text", "text": prompt}]
        elif isinstance(prompt, list) and all(isinstance(p, dict) and "type" in p for p in prompt):
            parts = prompt
        else:
            raise InputError(f"example {i}: the prompt must be text or a list of content parts "
                             f"({{'type': 'image'}} / {{'type': 'text', 'text': ...}}), got {prompt!r:.80}")
        rendered = processor.apply_chat_template(
            chat_messages(parts, example.get("response"), example.get("system", system)), tokenize=False)
        if rendered.count(token) != len(mine):
            raise InputError(
                f"example {i}: its conversation holds {rendered.count(token)} image placeholder(s) {token!r} but "
                f"{len(mine)} image(s) were given; give one image per image part (and no {token!r} in the text)")
        images.append(mine)
        conversations.append(parts)
    pixels, replacements = {}, []
    if any(images):
        # All images at once, as the processor does: the pixel layout may depend on the whole batch.
        pixels = dict(processor.image_processor(images, return_tensors="np"))
        replacements = [processor.replace_image_token(pixels, k) for k in range(sum(map(len, images)))]
    rows, used = [], 0
    for i, (example, parts, mine) in enumerate(zip(examples, conversations, images)):
        expansions = replacements[used: used + len(mine)]
        used += len(mine)
        try:
            rows.append(encode_chat(
                processor.tokenizer, parts, example.get("response"), example.get("system", system),
                processor.image_token_id, template=processor, add_special_tokens=None,
                expand=lambda text, expansions=expansions: _expand(text, token, expansions),
            ))
        except InputError as e:
            raise InputError(f"example {i}: {e}") from None
    return {**pad_left(rows, processor.tokenizer.pad_token_id), **pixels}


def _expand(text: str, token: str, replacements: Sequence[str]) -> str:
    """Replace the i-th `token` of `text` by replacements[i]."""
    pieces = text.split(token)
    return pieces[0] + "".join(r + piece for r, piece in zip(replacements, pieces[1:]))
