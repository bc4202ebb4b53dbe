"""Layer skipping, activation patching and attribution patching against the same operations done with PyTorch
hooks on the Hugging Face model (the official CARE hooks for skips), and attribution against exact patching."""

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
import transformers

from ports import InputError, load_pretrained
from precise_jax.interventions import forward_with
from precise_jax.mediation import (
    activation_patching, attribution_patching, layer_skip_effects, neuron_patching, skipped,
)
from tests.parity import left_padded_batch, one_torch_thread, randomize, rel_error, torch_logits

VOCAB, PAD, EOS, LAYERS, N_NEW = 83, 0, 82, 3, 6
REFUSAL = [5, 17, 40]  # stand-ins for the first tokens of "I", "Sorry", "As"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)
    torch.manual_seed(0)
    model = randomize(transformers.LlamaForCausalLM(config), seed=5, scale=0.15)
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(path)
    with one_torch_thread():
        yield model, load_pretrained(path)


def batch_of(seed, lengths):
    b = left_padded_batch(np.random.default_rng(seed), EOS, lengths, avoid=[PAD])
    b.pop("position_ids")
    return b


def hf_logits(model, batch, hooks=()):
    """Logits [B, T, V] of an uncached forward with (module, hook(module, args, kwargs, output)) hooks."""
    handles = [m.register_forward_hook(fn, with_kwargs=True) for m, fn in hooks]
    try:
        return torch_logits(model, batch)
    finally:
        for h in handles:
            h.remove()


def official_skip_hooks(model, component, variant, layers):
    """FredJDean/CARE's HookedLVLM `block_layers` / `block_attention` / `block_layer_mlp` (and the zero variants).

    Transformers now calls the attention with keyword arguments, so its input is read from kwargs."""
    blocks = model.model.layers
    if component == "block":
        return [(blocks[l], lambda m, a, k, o: k["hidden_states"] if not a else a[0]) for l in layers]
    if component == "attn":
        fill = (lambda k, o: k["hidden_states"]) if variant == "official" else (lambda k, o: torch.zeros_like(o[0]))
        return [(blocks[l].self_attn, lambda m, a, k, o: (fill(k, o),) + tuple(o[1:])) for l in layers]
    if variant == "zero":
        return [(blocks[l].mlp, lambda m, a, k, o: torch.zeros_like(o)) for l in layers]
    stored = {}

    def hook(index):
        def fn(module, args, kwargs, output):
            if index in layers:
                prev = index - 1
                while prev >= 0 and prev in layers:
                    prev -= 1
                return stored[prev] if prev >= 0 else args[0]
            stored[index] = output
            return output
        return fn

    return [(blocks[l].mlp, hook(l)) for l in range(len(blocks))]


SKIPS = [("block", "official", [1, 2]), ("attn", "official", [0, 2]), ("attn", "zero", [1]),
         ("mlp", "official", [0, 1]), ("mlp", "zero", [2])]


@pytest.mark.parametrize("component, variant, layers", SKIPS)
def test_skips_match_the_official_hooks(models, component, variant, layers):
    model, lm = models
    batch = batch_of(1, [9, 6, 4])
    ours = np.asarray(forward_with(skipped(lm, layers, component, variant), batch, hook=None))
    expected = hf_logits(model, batch, official_skip_hooks(model, component, variant, layers))
    valid = batch["attention_mask"].astype(bool)
    assert rel_error(ours[valid], expected[valid]) <= 1e-5
    assert rel_error(expected[valid], hf_logits(model, batch)[valid]) > 1e-2  # the skip matters


def log_odds(logits):
    """float64 refusal log-odds of the last position's logits [B, V]."""
    logp = scipy.special.log_softmax(logits.astype(np.float64), axis=-1)
    log_r = scipy.special.logsumexp(logp[:, REFUSAL], axis=-1)
    return log_r - np.log1p(-np.exp(log_r))


def words(tokens, lengths):
    """A stand-in tokenizer: every fifth id reads 'sorry'."""
    return [" ".join("sorry" if t % 5 == 0 else f"w{t}" for t in row[:n]) for row, n in zip(tokens, lengths)]


def keyword_judge(texts):
    return [any(word in text.split() for word in ("sorry", "cannot")) for text in texts]


def test_skip_effects_on_refusal_score_and_rate(models):
    """The MLP skip (which carries outputs across layers, at prefill and every decode step) against HF generate
    with the official hooks: the same log-odds, generations, and refusal rate."""
    model, lm = models
    batch = batch_of(2, [8, 8, 5, 3])
    effects = layer_skip_effects(lm, batch, REFUSAL, component="mlp", span=2, layers=[0, 1], judge=keyword_judge,
                                 max_new_tokens=N_NEW, decoder=words)
    assert effects.skipped == [(0, 1), (1, 2)]
    ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
    clean = log_odds(hf_logits(model, batch)[:, -1]).mean()
    assert abs(effects.clean_score - clean) <= 1e-5 * max(1.0, abs(clean))
    for config, score, rate in zip(effects.skipped, effects.score, effects.rate):
        hooks = official_skip_hooks(model, "mlp", "official", list(config))
        expected = log_odds(hf_logits(model, batch, hooks)[:, -1]).mean()
        assert abs(score - expected) <= 1e-5 * max(1.0, abs(expected))
        handles = [m.register_forward_hook(fn, with_kwargs=True) for m, fn in hooks]
        try:
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False,
                                     eos_token_id=EOS, pad_token_id=PAD)
        finally:
            for h in handles:
                h.remove()
        new = np.full((len(ids), N_NEW), PAD)
        new[:, :out.shape[1] - ids.shape[1]] = out[:, ids.shape[1]:].numpy()
        lengths = np.where((new == EOS).any(1), (new == EOS).argmax(1) + 1, N_NEW)
        assert rate == np.mean(keyword_judge(words(new, lengths)))
    assert np.all(effects.delta_score != 0)


def test_activation_patching_matches_torch(models):
    model, lm = models
    harmful, benign = batch_of(3, [9, 9, 6]), batch_of(4, [7, 5, 7])
    sites = ["lm.layers.0.mlp.out", "lm.layers.1.attn.out", "lm.layers.2.resid"]
    effects = activation_patching(lm, harmful, benign, REFUSAL, sites=sites)
    blocks = model.model.layers
    modules = {sites[0]: (blocks[0].mlp, lambda o: o), sites[1]: (blocks[1].self_attn, lambda o: o[0]),
               sites[2]: (blocks[2], lambda o: o[0] if isinstance(o, tuple) else o)}
    clean = log_odds(hf_logits(model, harmful)[:, -1])
    for site, (module, pick) in modules.items():
        seen = {}
        hf_logits(model, benign, [(module, lambda m, a, k, o: seen.__setitem__("v", pick(o)[:, -1].clone()))])

        def patch(m, a, k, o):
            x = pick(o).clone()
            x[:, -1] = seen["v"]  # left padding: the last column is every row's last prompt token
            return (x,) + tuple(o[1:]) if isinstance(o, tuple) else x

        expected = log_odds(hf_logits(model, harmful, [(module, patch)])[:, -1]) - clean
        np.testing.assert_allclose(effects[site], expected, atol=2e-5 * max(1.0, np.abs(expected).max()))
        assert np.abs(expected).max() > 1e-3  # the patch matters


def test_attribution_patching_ranks_neurons_like_exact_patching(models):
    """Spearman rank correlation of gradient × activation difference with exact one-neuron patching: measured 0.955
    over the 144 neurons of this model (layers 0/1/2: 0.906, 0.954, 0.994; the first-order estimate degrades
    through more downstream nonlinearity). With weights drawn at scale 0.08 instead of 0.15 it is 0.99-0.998."""
    _, lm = models
    harmful, benign = batch_of(5, [9, 9, 9]), batch_of(6, [7, 7, 7])
    exact = neuron_patching(lm, harmful, benign, REFUSAL)
    estimate = attribution_patching(lm, harmful, benign, REFUSAL)
    assert set(exact) == set(estimate) == {f"lm.layers.{l}.mlp.act" for l in range(LAYERS)}
    overall = scipy.stats.spearmanr(np.concatenate(list(exact.values())), np.concatenate(list(estimate.values())))
    assert overall.statistic >= 0.9
    for site in exact:
        assert scipy.stats.spearmanr(exact[site], estimate[site]).statistic >= 0.85


def test_bad_input(models):
    _, lm = models
    batch = batch_of(1, [5, 3])
    with pytest.raises(InputError, match="unknown skip"):
        skipped(lm, [0], "embedding")
    with pytest.raises(InputError, match="unknown skip variant"):
        skipped(lm, [0], "attn", "mean")
    with pytest.raises(InputError, match="outside the model's 3 layers"):
        skipped(lm, [3])
    with pytest.raises(InputError, match="refusal_ids"):
        layer_skip_effects(lm, batch, [VOCAB])
    right_padded = {k: v[:, ::-1].copy() for k, v in batch.items()}
    with pytest.raises(InputError, match="left-padded"):
        layer_skip_effects(lm, right_padded, REFUSAL)
    with pytest.raises(InputError, match="pairs rows"):
        activation_patching(lm, batch, batch_of(2, [4, 4, 4]), REFUSAL, sites=["lm.layers.0.resid"])
    with pytest.raises(InputError, match="span"):
        layer_skip_effects(lm, batch, REFUSAL, span=4)
    with pytest.raises(InputError, match="no tokenizer"):
        layer_skip_effects(lm, batch, REFUSAL, judge=keyword_judge)
