"""Shared pieces of the Qwen2-VL / Qwen2.5-VL tests: tiny configs, the tiny tokenizer with Qwen's special tokens,
and transformers' own processor, site hooks and generate as references."""

from __future__ import annotations

import contextlib
import functools
import types

import jax
import numpy as np
import torch
import transformers
from flax.traverse_util import flatten_dict
from transformers.processing_utils import ProcessorMixin
from transformers.vision_utils import get_vision_window_index

from ports import generate, load_pretrained
from ports.processing import image_chat_batch
from precise_jax.capture import available_sites, model_inputs
from precise_jax.sites import site_filter, site_name
from tests.parity import randomize, rel_error, torch_sites
from tests.ports.vlm import tiny_tokenizer

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE, VIDEO = range(len(SPECIAL))  # the tokenizer's first ids
VOCAB = 320  # the models' vocabulary: the tokenizer's 300 ids and a few never produced
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 16  # a few dozen patches per image

# Qwen2-VL's chat template, as its checkpoints ship it.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def tokenizer() -> transformers.PreTrainedTokenizerBase:
    """The tests' tiny byte-level BPE with Qwen's special tokens and chat template (no hub download)."""
    tok = tiny_tokenizer(SPECIAL, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    assert tok.convert_tokens_to_ids(SPECIAL) == list(range(len(SPECIAL)))
    return tok


def image_processor() -> transformers.Qwen2VLImageProcessorPil:
    return transformers.Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=PAD,
            rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0))
TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
              vision_end_token_id=VISION_END)


def config(kind: str) -> transformers.PretrainedConfig:
    """Tiny Qwen2-VL with a tied head (as Qwen2-VL-2B), or Qwen2.5-VL with an untied head (as 7B), 2x2-token
    windows and one full-attention block between windowed ones."""
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
        return transformers.Qwen2VLConfig(text_config=TEXT, vision_config=vision, tie_word_embeddings=True, **TOKENS)
    vision = dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2,
                  fullatt_block_indexes=[1], window_size=56)
    return transformers.Qwen2_5_VLConfig(text_config=TEXT, vision_config=vision, **TOKENS)


def hf_model(kind: str, seed: int, scale: float):
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(config(kind))
    return randomize(model, seed, scale)


def hf_processor(tok, images) -> transformers.Qwen2VLProcessor:
    """transformers' Qwen2VLProcessor over our tokenizer and image processor. Its constructor insists on checking
    the (absent) video processor's class, which only exists with torchvision; that check alone is skipped."""
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None if arg is None else check(
        self, name, arg)
    try:
        return transformers.Qwen2VLProcessor(image_processor=images, tokenizer=tok, video_processor=None,
                                             chat_template=CHAT_TEMPLATE)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def torch_inputs(batch: dict) -> dict:
    """The batch as transformers' model takes it: with mm_token_type_ids (1 at image tokens), which HF's M-RoPE
    needs and our batches leave out (token_types carry the same)."""
    batch = {"mm_token_type_ids": (np.asarray(batch["input_ids"]) == IMAGE).astype(np.int64), **batch}
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    # HF's get_rope_index writes int64 positions into a tensor of input_ids' dtype: give it int64 ids.
    cast = lambda a: a.astype(np.int64) if np.issubdtype(a.dtype, np.integer) else a  # noqa: E731
    return {k: torch.tensor(cast(np.asarray(batch[k]))) for k in keys if k in batch}


@contextlib.contextmanager
def torch_vision_sites(hf, grid_thw: np.ndarray | None):
    """Record the vision and projector sites of a HF Qwen2(.5)-VL in patch order: {site: array [N or M, W]}.

    Qwen2.5-VL runs its blocks on patches permuted into window order; the hooks put them back.
    """
    visual = hf.model.visual
    found, handles = {}, []
    order = None  # window_index: group k of the window order is merge block order[k] of the patch order
    if hasattr(visual, "window_size") and grid_thw is not None:
        index, _ = get_vision_window_index(torch.tensor(grid_thw), visual.spatial_merge_size, visual.window_size,
                                           visual.patch_size)
        order = index.numpy()

    def in_patch_order(x, unit):
        x = x.detach().numpy()
        if order is None:
            return x
        grouped = x.reshape(len(order), unit, -1)
        restored = np.empty_like(grouped)
        restored[order] = grouped
        return restored.reshape(x.shape)

    def keep(name, pick, unit):
        return lambda module, args, out: found.__setitem__(name, in_patch_order(pick(args, out), unit))

    patches = visual.spatial_merge_size**2  # window order moves whole merge blocks of patches
    for i, block in enumerate(visual.blocks):
        p = f"vision.layers.{i}"
        down = block.mlp.fc2 if hasattr(block.mlp, "fc2") else block.mlp.down_proj
        handles += [
            down.register_forward_hook(keep(f"{p}.mlp.act", lambda a, o: a[0], patches)),
            block.mlp.register_forward_hook(keep(f"{p}.mlp.out", lambda a, o: o, patches)),
            block.attn.register_forward_hook(keep(f"{p}.attn.out", lambda a, o: o, patches)),
            block.register_forward_hook(keep(f"{p}.resid", lambda a, o: o, patches)),
        ]
    # The merger still runs in window order (one row per merge block); HF reorders its output afterwards.
    handles.append(visual.merger.register_forward_hook(keep("projector.out", lambda a, o: o, 1)))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------------- checks

TOL = 1e-5
N = 24  # new tokens in the generation checks


def build(kind: str, seed: int, folder, scale: float = 0.15) -> types.SimpleNamespace:
    """A random HF model saved with our tokenizer and image processor, and the port loaded from that folder."""
    hf = hf_model(kind, seed, scale)
    hf.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    image_processor().save_pretrained(folder)
    return types.SimpleNamespace(hf=hf, lm=load_pretrained(folder), folder=folder)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(model, sites: tuple[str, ...], params, batch):
    """Logits and the named sites, picked by canonical name as precise_jax.capture does, in one compilation."""
    out, state = model.apply({"params": params}, **batch, capture_intermediates=site_filter(sites))
    found = flatten_dict(state.get("intermediates", {}))
    return out.logits, {site_name(path[:-1]): value[0] for path, value in found.items()}


def forward_errors(m, examples) -> dict[str, float]:
    """Relative error of the logits and of every site against HF, over real tokens (LM) and every patch (vision)."""
    batch = image_chat_batch(m.lm.processor, examples)
    with torch.no_grad(), torch_sites(m.hf.model.language_model.layers) as text_sites, \
            torch_vision_sites(m.hf, batch.get("image_grid_thw")) as vision_sites:
        expected = m.hf(**torch_inputs(batch)).logits.numpy()
    sites = available_sites(m.lm)
    assert set(sites) == set(text_sites) | set(vision_sites), "the port exposes exactly HF's sites"
    logits, ours = _forward(m.lm.model, sites, m.lm.params, model_inputs(batch))
    assert set(ours) == set(sites)
    valid = batch["attention_mask"].astype(bool)  # pads carry no meaning in either implementation
    errors = {"logits": rel_error(np.asarray(logits)[valid], expected[valid])}
    for name in sites:
        if name.startswith("lm."):
            errors[name] = rel_error(np.asarray(ours[name])[valid], text_sites[name][valid])
        else:
            errors[name] = rel_error(ours[name], vision_sites[name])
    return errors


def hf_generate(hf, batch) -> tuple[np.ndarray, np.ndarray]:
    """Greedy transformers generate without a stop token -> (new tokens [B, N], scores [B, N, V])."""
    with torch.no_grad():
        out = hf.generate(**torch_inputs(batch), max_new_tokens=N, do_sample=False, eos_token_id=None,
                          pad_token_id=PAD, output_scores=True, return_dict_in_generate=True)
    return out.sequences[:, batch["input_ids"].shape[1]:].numpy(), torch.stack(out.scores, axis=1).numpy()


def assert_no_ties(scores):
    """Every greedy choice is decided by a clear margin, so float32 rounding cannot flip a token."""
    top2 = np.sort(scores, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-4, "tied top-2 logits: pick another seed"


def check_generation(m, examples) -> None:
    """Batched greedy decoding through ports.generate (prefill with pixels, decode from the cache) equals HF's."""
    batch = image_chat_batch(m.lm.processor, examples)
    expected, scores = hf_generate(m.hf, batch)
    assert_no_ties(scores)
    out = generate(m.lm, batch, max_new_tokens=N, stop_tokens=[], return_logits=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    assert rel_error(np.asarray(out.logits), scores) <= TOL


def check_text_only(m, examples) -> None:
    """A batch without images (no pixel keys) equals HF given the positions HF's generate uses (real tokens only)."""
    batch = image_chat_batch(m.lm.processor, examples)
    assert "pixel_values" not in batch and "image_grid_thw" not in batch
    mask = batch["attention_mask"]
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        expected = m.hf(**torch_inputs(batch), position_ids=torch.tensor(positions)).logits.numpy()
    logits = np.asarray(_forward(m.lm.model, (), m.lm.params, model_inputs(batch))[0])
    valid = mask.astype(bool)
    assert rel_error(logits[valid], expected[valid]) <= TOL
