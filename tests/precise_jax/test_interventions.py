"""Interventions against the same edits done with PyTorch hooks on the Hugging Face model."""

import numpy as np
import pytest
import torch
import transformers

from ports import InputError, generate, load_pretrained
from ports.generate import _generate
from ports.processing import TokenType
from precise_jax.interventions import forward_with, neuron_ablation, unit_edit, unit_edit_hook
from precise_jax.neurons import NeuronSet
from precise_jax.stats import Moments
from tests.parity import left_padded_batch, randomize, rel_error, torch_logits

FF = 48


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(vocab_size=83, hidden_size=32, intermediate_size=FF, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=82, pad_token_id=0)
    torch.manual_seed(0)
    model = randomize(transformers.LlamaForCausalLM(config), seed=5)
    model.save_pretrained(path)
    return model, load_pretrained(path)


@pytest.fixture(scope="module")
def batch():
    b = left_padded_batch(np.random.default_rng(2), 82, [10, 7, 4])
    b.pop("position_ids")
    # the first two real tokens of each row are "template", the rest "prompt"
    types = np.where(b["attention_mask"] == 1, TokenType.PROMPT, TokenType.PAD)
    for r in range(len(types)):
        start = int(np.argmax(b["attention_mask"][r]))
        types[r, start:start + 2] = TokenType.TEMPLATE
    b["token_types"] = types
    return b


def hf_logits(model, batch, edits):
    """edits: {layer: fn(act [B,T,F], position mask [B,T]) -> act} applied as forward-pre-hooks on down_proj."""
    handles = []
    for layer, fn in edits.items():
        handles.append(model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
            lambda m, args, fn=fn: (fn(args[0]),)))
    try:
        return torch_logits(model, batch)
    finally:
        for h in handles:
            h.remove()


def test_zero_mean_amplify_match_pytorch(models, batch):
    model, lm = models
    neurons = NeuronSet({0: [1, 7, 30], 2: [4, 47]}, FF, 3)
    rng = np.random.default_rng(0)
    means = {f"lm.layers.{l}.mlp.act": Moments.zeros(FF).replace(mean=rng.normal(size=FF).astype(np.float32))
             for l in (0, 2)}
    valid = batch["attention_mask"].astype(bool)
    for kind in ("zero", "mean", "amplify"):
        ours = np.asarray(forward_with(lm, batch, unit_edit_hook, neuron_ablation(neurons, kind, means=means,
                                                                                  factor=3.0)))

        def edit(layer):
            idx = list(neurons.neurons[layer])

            def fn(a):
                a = a.clone()
                if kind == "zero":
                    a[..., idx] = 0
                elif kind == "mean":
                    a[..., idx] = torch.tensor(np.asarray(means[f"lm.layers.{layer}.mlp.act"].mean)[idx])
                else:
                    a[..., idx] = a[..., idx] * 3.0
                return a
            return fn

        expected = hf_logits(model, batch, {0: edit(0), 2: edit(2)})
        assert rel_error(ours[valid], expected[valid]) <= 1e-5, kind
        assert rel_error(expected[valid], hf_logits(model, batch, {})[valid]) > 1e-3  # the edit matters


def test_edit_limited_to_token_types(models, batch):
    model, lm = models
    params = {"lm.layers.1.mlp.act": unit_edit(FF, np.arange(0, FF, 3), "zero", token_types=[TokenType.PROMPT])}
    ours = np.asarray(forward_with(lm, batch, unit_edit_hook, params))
    prompt = torch.tensor(batch["token_types"] == TokenType.PROMPT)

    def fn(a):
        a = a.clone()
        a[..., ::3] = torch.where(prompt[..., None], 0.0, a[..., ::3])
        return a

    expected = hf_logits(model, batch, {1: fn})
    valid = batch["attention_mask"].astype(bool)
    assert rel_error(ours[valid], expected[valid]) <= 1e-5
    with pytest.raises(InputError, match="no token_types"):
        forward_with(lm, {k: v for k, v in batch.items() if k != "token_types"}, unit_edit_hook, params)


def test_generation_with_ablation_reuses_compilation(models, batch):
    model, lm = models
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_types")}
    a = NeuronSet({1: np.arange(0, FF, 2)}, FF, 3)
    b = NeuronSet({1: np.arange(1, FF, 2)}, FF, 3)
    first = generate(lm, inputs, max_new_tokens=6, hook=unit_edit_hook, hook_params=neuron_ablation(a))
    size = _generate._cache_size()
    second = generate(lm, inputs, max_new_tokens=6, hook=unit_edit_hook, hook_params=neuron_ablation(b))
    assert _generate._cache_size() == size
    plain = generate(lm, {k: batch[k] for k in ("input_ids", "attention_mask")}, max_new_tokens=6)
    assert not np.array_equal(first.tokens, plain.tokens) or not np.array_equal(second.tokens, plain.tokens)


def test_bad_edits():
    with pytest.raises(InputError, match="unknown edit"):
        unit_edit(4, [0], "invert")
    with pytest.raises(InputError, match="needs the mean"):
        unit_edit(4, [0], "mean")
    with pytest.raises(InputError, match="empty"):
        neuron_ablation(NeuronSet({}, 4, 2))
