"""Neuron scoring and selection against a float64 numpy reimplementation; NeuronSet algebra and storage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ports import InputError
from precise_jax.neurons import (
    NeuronSet, check_for_model, combine, overlap_matrix, parameter_fraction, random_like, select_safety_neurons,
)
from precise_jax.stats import Moments

LAYERS, WIDTH, HIDDEN = 4, 200, 16


def fake_params(rng):
    return {"lm": {f"layers_{l}": {"mlp": {"down_proj": {"kernel": rng.normal(size=(WIDTH, HIDDEN))}}}
                   for l in range(LAYERS)}}


def stats_of(samples):
    """{site: Moments} from per-layer samples [N, WIDTH]."""
    update = jax.jit(Moments.update)
    return {f"lm.layers.{l}.mlp.act": update(Moments.zeros(WIDTH), jnp.asarray(x, jnp.float32),
                                             jnp.ones(len(x))) for l, x in enumerate(samples)}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    params = fake_params(rng)
    harmful = [rng.normal(size=(40, WIDTH)) * rng.uniform(0.1, 2, WIDTH) + rng.normal(0, 1, WIDTH)
               for _ in range(LAYERS)]
    benign = [rng.normal(size=(30, WIDTH)) * rng.uniform(0.1, 2, WIDTH) + rng.normal(0, 1, WIDTH)
              for _ in range(LAYERS)]
    return params, harmful, benign


def numpy_plnd(params, samples, layer, k):
    norms = np.sqrt((params["lm"][f"layers_{layer}"]["mlp"]["down_proj"]["kernel"] ** 2).sum(1))
    importance = np.abs(samples.astype(np.float32).astype(np.float64).mean(0)) * norms
    saliency = importance / importance.sum()
    return set(np.argsort(-saliency, kind="stable")[:k])


@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.2])
def test_plnd_set_difference_equals_numpy(data, ratio):
    params, harmful, benign = data
    got = select_safety_neurons(params, stats_of(harmful), stats_of(benign), ratio=ratio)
    k = int(np.floor(ratio * WIDTH))
    for layer in range(LAYERS):
        expected = numpy_plnd(params, harmful[layer], layer, k) - numpy_plnd(params, benign[layer], layer, k)
        assert set(got.neurons.get(layer, [])) == expected
    assert got.metadata["score"] == "plnd" and got.per_layer() == [len(got.neurons.get(l, [])) for l in range(4)]


def test_contrast_scores_equal_numpy(data):
    params, harmful, benign = data
    k = 10
    for score in ("mean_diff", "cohen_d"):
        got = select_safety_neurons(params, stats_of(harmful), stats_of(benign), score=score, ratio=k / WIDTH)
        for layer in range(LAYERS):
            h, b = harmful[layer].astype(np.float32).astype(np.float64), benign[layer].astype(np.float32).astype(
                np.float64)
            diff = h.mean(0) - b.mean(0)
            if score == "cohen_d":
                pooled = (((h - h.mean(0)) ** 2).sum(0) + ((b - b.mean(0)) ** 2).sum(0)) / (len(h) + len(b) - 2)
                diff = diff / np.sqrt(pooled)
            assert set(got.neurons[layer]) == set(np.argsort(-diff, kind="stable")[:k])


def test_global_budget(data):
    params, harmful, benign = data
    got = select_safety_neurons(params, stats_of(harmful), stats_of(benign), score="mean_diff", budget=25)
    assert len(got) == 25
    flat = np.concatenate([harmful[l].astype(np.float32).astype(np.float64).mean(0)
                           - benign[l].astype(np.float32).astype(np.float64).mean(0) for l in range(LAYERS)])
    expected = set(np.argsort(-flat, kind="stable")[:25])
    assert {l * WIDTH + int(i) for l, idx in got.neurons.items() for i in idx} == expected


def test_set_algebra_and_storage(tmp_path):
    a = NeuronSet({0: [1, 2, 3], 2: [5]}, WIDTH, LAYERS, {"model": "m"})
    b = NeuronSet({0: [3, 4], 1: [7]}, WIDTH, LAYERS, {"model": "m"})
    assert a.union(b).pairs() == {(0, 1), (0, 2), (0, 3), (0, 4), (1, 7), (2, 5)}
    assert a.intersection(b).pairs() == {(0, 3)}
    assert a.jaccard(b) == pytest.approx(1 / 6)
    names, m = overlap_matrix({"en": a, "es": b})
    np.testing.assert_allclose(m, [[1, 1 / 6], [1 / 6, 1]])
    assert combine([a, b], "intersection").pairs() == {(0, 3)}
    r = random_like(a, seed=3)
    assert r.per_layer() == a.per_layer() and not (r.pairs() & a.pairs())
    a.save(tmp_path / "safety")
    loaded = NeuronSet.load(tmp_path / "safety.json")
    assert loaded.pairs() == a.pairs() and loaded.metadata == {"model": "m"}
    assert parameter_fraction(a, HIDDEN, 10_000) == pytest.approx(4 * 3 * HIDDEN / 10_000)


def test_bad_input(data):
    params, harmful, benign = data
    empty = NeuronSet({}, WIDTH, LAYERS, {"model": "m"})
    with pytest.raises(InputError, match="empty"):
        check_for_model(empty, "m", LAYERS, WIDTH)
    other = NeuronSet({0: [1]}, WIDTH, LAYERS, {"model": "other"})
    with pytest.raises(InputError, match="located on 'other'"):
        check_for_model(other, "m", LAYERS, WIDTH)
    with pytest.raises(InputError, match="different models"):
        other.union(NeuronSet({0: [1]}, WIDTH, LAYERS, {"model": "m"}))
    with pytest.raises(InputError, match="outside"):
        NeuronSet({0: [WIDTH]}, WIDTH, LAYERS)
    with pytest.raises(InputError, match="unknown score"):
        select_safety_neurons(params, stats_of(harmful), stats_of(benign), score="magic")
    with pytest.raises(InputError, match="different layers"):
        select_safety_neurons(params, stats_of(harmful), stats_of(benign[:2]))


def test_frequency_score_equals_numpy(data):
    params, harmful, benign = data
    got = select_safety_neurons(params, stats_of(harmful), stats_of(benign), score="frequency", ratio=0.1)
    k = int(np.floor(0.1 * WIDTH))

    def top(samples):
        frequency = (samples.astype(np.float32) > 0).astype(np.float64).mean(0)
        return set(np.argsort(-frequency, kind="stable")[:k])

    for layer in range(LAYERS):
        assert set(got.neurons.get(layer, [])) == top(harmful[layer]) - top(benign[layer])


def test_safety_neurons_overlap_the_pytorch_baseline_on_smollm2(smollm2_dir, prompt_sets):
    """The same PLND set from Hugging Face PyTorch with forward hooks and float64 numpy scoring (real weights)."""
    import torch
    import transformers

    from ports import load_pretrained
    from ports.processing import TokenType, encode_chat
    from precise_jax.shield import neuron_stats

    # Short prompts: both sets then pad to the same bucket, so the capture compiles once.
    harmful = [e for e in prompt_sets["jbb"] if len(e.prompt) < 120][:4]
    benign = [e for e in prompt_sets["alpaca-eval"] if len(e.prompt) < 120][:4]
    ratio = 0.01
    lm = load_pretrained(smollm2_dir)
    ours = select_safety_neurons(lm.params, neuron_stats(lm, harmful, batch_size=4, progress=False).stats,
                                 neuron_stats(lm, benign, batch_size=4, progress=False).stats, ratio=ratio)

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    layers = hf.model.layers
    captured = {}
    hooks = [layer.mlp.down_proj.register_forward_hook(
        lambda module, args, out, l=l: captured.__setitem__(l, args[0][0].double().numpy()))
        for l, layer in enumerate(layers)]

    def mean_over_prompts(examples):  # per prompt: mean over its prompt tokens; then the mean over prompts
        total = np.zeros((len(layers), hf.config.intermediate_size))
        for example in examples:
            ids, types = encode_chat(lm.processor, example.prompt)
            with torch.no_grad():
                hf(torch.from_numpy(np.asarray(ids, np.int64)[None]))
            total += np.stack([captured[l][types == TokenType.PROMPT].mean(0) for l in range(len(layers))])
        return total / len(examples)

    try:
        means = {"harmful": mean_over_prompts(harmful), "benign": mean_over_prompts(benign)}
    finally:
        for hook in hooks:
            hook.remove()
    k = int(np.floor(ratio * hf.config.intermediate_size))
    baseline = {}
    for l, layer in enumerate(layers):
        norms = np.linalg.norm(layer.mlp.down_proj.weight.detach().double().numpy(), axis=0)  # HF [d, d_ff]
        top = {}
        for name, mean in means.items():
            saliency = np.abs(mean[l]) * norms
            top[name] = set(np.argsort(-(saliency / saliency.sum()), kind="stable")[:k])
        baseline[l] = sorted(top["harmful"] - top["benign"])
    expected = NeuronSet(baseline, ours.width, ours.num_layers, ours.metadata)
    assert len(ours) > 100 and ours.jaccard(expected) >= 0.95, (len(ours), ours.jaccard(expected))
