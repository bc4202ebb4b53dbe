"""Shared material for the vision-language port tests: real photos, tiny tokenizers, tower loading."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import torch
import transformers
from flax.traverse_util import flatten_dict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ports.layers import Site
from ports.weights import Checkpoint, flatten, load_params
from precise_jax.sites import site_name
from tests.parity import rel_error, torch_sites


@functools.cache
def photos() -> dict[str, PIL.Image.Image]:
    """Real scikit-image sample photos of several sizes, aspect ratios and PIL modes (never downloaded)."""
    import skimage.data

    rocket = skimage.data.rocket()
    return {
        "astronaut": PIL.Image.fromarray(skimage.data.astronaut()),  # 512 x 512 RGB
        "chelsea": PIL.Image.fromarray(skimage.data.chelsea()),  # 300 x 451 RGB, landscape
        "coffee": PIL.Image.fromarray(skimage.data.coffee()),  # 400 x 600 RGB
        "rocket": PIL.Image.fromarray(rocket),  # 427 x 640 RGB
        "rocket_portrait": PIL.Image.fromarray(np.ascontiguousarray(rocket.transpose(1, 0, 2))),  # 640 x 427
        "page": PIL.Image.fromarray(skimage.data.page()),  # 191 x 384 grayscale (mode L), very wide
        "logo": PIL.Image.fromarray(skimage.data.logo()),  # 500 x 500 RGBA: transparency over white
        "hubble": PIL.Image.fromarray(skimage.data.hubble_deep_field()),  # 872 x 1000 RGB
    }


CORPUS = [
    "What is shown in this image? Describe the picture in detail, please.",
    "A cat sits on the table next to a cup of coffee and a rocket.",
    "The astronaut smiles at the camera while the rocket waits on the launch pad.",
    "Explain why the sky is blue, and list three uses of baking soda.",
    "Write a short poem about the stars, the moon and the deep field of galaxies.",
    "How many objects can you count? Answer in one short sentence.",
]


def tiny_tokenizer(specials: list[str], bos: str | None, eos: str, pad: str, vocab: int = 300):
    """A byte-level BPE trained on a few sentences (deterministic), with the given special tokens.

    With `bos`, the tokenizer prepends it as Llama's does, so processors' chat templating adds it too."""
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(CORPUS * 4, trainer)
    if bos is not None:
        model.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, model.token_to_id(bos))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, bos_token=bos, eos_token=eos, pad_token=pad)


def is_site(module, method: str) -> bool:
    """A `capture_intermediates` filter keeping every Site."""
    return isinstance(module, Site)


def load_tower(folder, tower, rules, pixel_shape) -> dict:
    """Params of a bare vision tower module from an HF `CLIPVisionModel` / `SiglipVisionModel` folder."""
    example = jnp.zeros(pixel_shape, jnp.float32)
    shapes = jax.eval_shape(lambda: tower.init(jax.random.key(0), example)["params"])
    expected = {path: leaf.shape for path, leaf in flatten(shapes).items()}
    return load_params(Checkpoint(folder), rules, expected, convert=lambda _, a: jnp.asarray(a))


def tower_parity(hf, module, params, pixels: np.ndarray, num_layers: int, tol: float) -> tuple:
    """Run an HF vision tower and its port on the same pixels; assert that every hidden state and the last one agree
    within `tol`. Returns (port output, HF output, port sites {name: [N, G, W]}, HF sites)."""
    with torch.no_grad(), torch_sites(hf.encoder.layers, "vision", down_proj="fc2") as expected:
        ref = hf(torch.tensor(pixels), output_hidden_states=True)
    out, state = jax.jit(functools.partial(module.apply, capture_intermediates=is_site))({"params": params}, pixels)
    assert len(out.hidden_states) == len(ref.hidden_states) == num_layers + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert rel_error(ours, theirs.numpy()) <= tol
    assert rel_error(out.last_hidden_state, ref.last_hidden_state.numpy()) <= tol
    sites = {site_name(("vision", *path[:-1])): v[0] for path, v in flatten_dict(state["intermediates"]).items()}
    return out, ref, sites, expected


def check_greedy_generation(m, batch: dict, tokens: int, tol: float) -> None:
    """Greedy generation of `tokens` tokens by the port equals HF's `generate` on the batch: tokens and scores."""
    from ports import generate

    with torch.no_grad():
        out = m.hf.generate(**{k: v for k, v in hf_inputs(batch).items() if k != "position_ids"},
                            max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                            pad_token_id=m.processor.tokenizer.pad_token_id,
                            output_scores=True, return_dict_in_generate=True)
    expected = out.sequences[:, batch["input_ids"].shape[1]:].numpy()
    scores = torch.stack(out.scores, axis=1).numpy()
    assert expected.shape == (len(batch["input_ids"]), tokens)
    assert_no_ties(scores)
    ours = generate(m.lm, batch, max_new_tokens=tokens, stop_tokens=[], return_logits=True)
    np.testing.assert_array_equal(np.asarray(ours.tokens), expected)
    assert rel_error(np.asarray(ours.logits), scores) <= tol


# Chat templates in the style of llava-hf/llava-1.5-7b-hf and llava-hf/llava-onevision-qwen2-7b-ov-hf
# (chat_template.json, written from memory: the tests need realistic VLM templates, not byte-exact copies).
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ '\n' + content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}"
    "{% endfor %}{% endif %}{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def hf_conversations(examples) -> list[list[dict]]:
    """The examples as transformers chat conversations, images inline (the reference for image_chat_batch)."""
    conversations = []
    for e in examples:
        content = [{"type": "image", "image": image} for image in e.get("images", [])]
        content.append({"type": "text", "text": e["prompt"]})
        conversation = [{"role": "user", "content": content}]
        if "response" in e:
            conversation.append({"role": "assistant", "content": [{"type": "text", "text": e["response"]}]})
        conversations.append(conversation)
    return conversations


def hf_batch(processor, examples, generation_prompt: bool = True) -> dict:
    """transformers' own processing of the examples: one left-padded numpy batch."""
    out = processor.apply_chat_template(
        hf_conversations(examples), tokenize=True, return_dict=True, add_generation_prompt=generation_prompt,
        processor_kwargs=dict(padding=True, padding_side="left", return_tensors="np"),
    )
    return dict(out)


def hf_inputs(batch: dict) -> dict:
    """A port batch as PyTorch model inputs, with HF generate's positions (real tokens counted, pads 0)."""
    import torch

    inputs = {k: torch.tensor(np.asarray(v)) for k, v in batch.items() if k != "token_types"}
    mask = np.asarray(batch["attention_mask"])
    inputs["position_ids"] = torch.tensor(np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0))
    return inputs


def assert_no_ties(scores: np.ndarray, margin: float = 1e-4) -> None:
    """Greedy choices decided by a clear margin at every step [B, steps, V]."""
    top2 = np.sort(scores, axis=-1)[..., -2:]
    gap = (top2[..., 1] - top2[..., 0]).min()
    assert gap > margin, f"tied top-2 logits (gap {gap:.2e}): pick another seed"


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, batch):
    return model.apply({"params": params}, **batch).logits


def logits(lm, batch) -> np.ndarray:
    """A jitted plain forward (eager flax compiles op by op: far slower for one call)."""
    return np.asarray(_logits(lm.model, lm.params, {k: jnp.asarray(v) for k, v in batch.items()}))
