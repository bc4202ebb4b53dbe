"""Capture and pooled statistics against Hugging Face PyTorch with forward hooks."""

import jax
import numpy as np
import pytest
import torch
import transformers

from ports import InputError, load_pretrained
from ports.processing import TokenType, encode_chat, pad_left
from precise_jax.capture import capture, collect, layers_needed, pool_tokens
from tests.parity import left_padded_batch, randomize, rel_error, torch_sites

TOL = 1e-5
SITES = ("lm.layers.0.attn.out", "lm.layers.1.mlp.act", "lm.layers.2.mlp.out", "lm.layers.2.resid")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = randomize(transformers.LlamaForCausalLM(config), seed=21)
    model.save_pretrained(path)
    return model, load_pretrained(path)


def batches(seed, count=4, rows=3, width=10):
    """Fixed-width left-padded batches (one compile); token types mark the real tokens as prompt text."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        b = left_padded_batch(rng, 97, [int(n) for n in rng.integers(1, width + 1, rows - 1)] + [width])
        b.pop("position_ids")
        b["token_types"] = np.where(b["attention_mask"] == 1, TokenType.PROMPT, TokenType.PAD)
        out.append(b)
    return out


def torch_pooled(model, batch_list, pool):
    """The same pooling done on HF activations recorded by forward hooks, in float64 numpy."""
    result = {name: [] for name in SITES}
    for b in batch_list:
        mask = b["attention_mask"].astype(bool)
        positions = np.where(mask, np.cumsum(mask, 1) - 1, 0)
        with torch.no_grad(), torch_sites(model.model.layers) as acts:
            model(input_ids=torch.tensor(b["input_ids"]), attention_mask=torch.tensor(b["attention_mask"]),
                  position_ids=torch.tensor(positions))
        for name in SITES:
            x = acts[name].astype(np.float64)
            if pool == "mean":
                v = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
            elif pool == "max":
                v = np.where(mask[..., None], x, -np.inf).max(1)
            elif pool == "last":
                v = x[:, -1]  # left padding: the last column is every row's last real token
            else:
                v = x[mask]
            result[name].append(v)
    return {name: np.concatenate(v) for name, v in result.items()}


@pytest.mark.parametrize("pool", ["mean", "last", "max"])
def test_pooled_vectors_match_pytorch_hooks(tiny, pool):
    model, lm = tiny
    data = batches(1)
    got = collect(lm, data, SITES, positions="prompt", pool=pool, stats=False, vectors=True, progress=False)
    expected = torch_pooled(model, data, pool)
    for name in SITES:
        assert got.vectors[name].shape == expected[name].shape
        assert rel_error(got.vectors[name], expected[name]) <= TOL, name


@pytest.mark.parametrize("pool", ["mean", "tokens"])
def test_streaming_statistics_match_pytorch(tiny, pool):
    model, lm = tiny
    data = batches(2, count=6)
    got = collect(lm, data, SITES, positions="prompt", pool=pool, covariance=["lm.layers.2.resid"], progress=False)
    expected = torch_pooled(model, data, pool)
    for name in SITES:
        x = expected[name]
        stats = got.stats[name]
        assert int(stats.count) == len(x)
        assert rel_error(stats.mean, x.mean(0)) <= TOL
        assert rel_error(stats.variance(), x.var(0, ddof=1)) <= TOL
        np.testing.assert_array_equal(np.asarray(stats.positive), (x > 0).sum(0))
        assert rel_error(stats.maximum, x.max(0)) <= TOL
    assert rel_error(got.stats["lm.layers.2.resid"].covariance(), np.cov(expected["lm.layers.2.resid"].T)) <= TOL
    assert got.metadata["examples"] == sum(b["attention_mask"].shape[0] for b in data)


def test_padding_rows_and_ids(tiny):
    _, lm = tiny
    data = batches(3, count=2)
    data[1]["row_valid"] = np.array([True, False, True])
    data[0]["ids"], data[1]["ids"] = ["a", "b", "c"], ["d", "e", "f"]
    got = collect(lm, data, SITES[:1], positions="prompt", vectors=True, progress=False)
    assert got.ids == ["a", "b", "c", "d", "f"]
    assert got.vectors[SITES[0]].shape[0] == 5 and int(got.stats[SITES[0]].count) == 5


def test_forward_stops_after_the_deepest_layer(tiny):
    _, lm = tiny
    assert layers_needed(["lm.layers.1.mlp.act", "lm.layers.0.resid"]) == 2
    assert layers_needed(["projector.out"]) == 0
    batch = batches(4, count=1)[0]
    early = capture(lm, batch, ["lm.layers.1.mlp.act"])["lm.layers.1.mlp.act"]
    full = capture(lm, batch, ["lm.layers.1.mlp.act", "lm.layers.3.resid"])["lm.layers.1.mlp.act"]
    np.testing.assert_array_equal(np.asarray(early), np.asarray(full))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    def matmuls(**kwargs):
        jaxpr = jax.make_jaxpr(lambda p: lm.model.apply({"params": p}, **inputs, **kwargs))(lm.params)
        return str(jaxpr).count("dot_general")

    per_layer = 4 + 3 + 2  # q, k, v, o projections; gate, up, down; two attention einsums
    assert matmuls(num_layers=2) == 2 * per_layer
    assert matmuls() == 4 * per_layer + 1  # all layers and the tied head


def test_pool_tokens_rows_without_positions_get_no_weight():
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    mask = np.array([[True, False, True], [False, False, False]])
    for how in ("mean", "max", "last"):
        samples, weight = pool_tokens(x, mask, how)
        np.testing.assert_array_equal(weight, [1.0, 0.0])
        assert np.isfinite(np.asarray(samples)).all()


def test_bad_requests(tiny):
    _, lm = tiny
    data = batches(5, count=1)
    with pytest.raises(InputError, match="unknown sites"):
        collect(lm, data, ["lm.layers.9.mlp.act"], progress=False)
    with pytest.raises(InputError, match="unknown pooling"):
        collect(lm, data, SITES, pool="median", progress=False)
    with pytest.raises(InputError, match="one vector per example"):
        collect(lm, data, SITES, pool="tokens", vectors=True, progress=False)
    with pytest.raises(InputError, match="no examples"):
        collect(lm, [], SITES, progress=False)


def test_real_smollm2_pooled_activations_match_pytorch(smollm2_dir, smollm2_reference, prompt_sets):
    """Real weights, real JBB and AlpacaEval prompts in the chat template: mean over prompt tokens of the neurons."""
    lm = load_pretrained(smollm2_dir)
    prompts = [e.prompt for e in prompt_sets["jbb"][:4]] + [e.prompt for e in prompt_sets["alpaca-eval"][:4]]
    rows = [encode_chat(lm.processor, prompt) for prompt in prompts]
    batch = pad_left(rows, lm.processor.pad_token_id)
    sites = ["lm.layers.5.mlp.act", "lm.layers.15.mlp.act", "lm.layers.25.mlp.act"]
    got = collect(lm, [batch], sites, positions="prompt", vectors=True, progress=False)
    mask = batch["attention_mask"].astype(bool)
    prompt = batch["token_types"] == TokenType.PROMPT
    handles, acts = [], {}
    for layer in (5, 15, 25):
        down = smollm2_reference.model.layers[layer].mlp.down_proj
        handles.append(down.register_forward_hook(
            lambda m, a, o, layer=layer: acts.__setitem__(layer, a[0].detach().numpy())))
    try:
        with torch.no_grad():
            smollm2_reference(input_ids=torch.tensor(batch["input_ids"]),
                              attention_mask=torch.tensor(batch["attention_mask"]),
                              position_ids=torch.tensor(np.where(mask, np.cumsum(mask, 1) - 1, 0)))
    finally:
        for h in handles:
            h.remove()
    for layer in (5, 15, 25):
        x = acts[layer].astype(np.float64)
        expected = (x * prompt[..., None]).sum(1) / prompt.sum(1, keepdims=True)
        assert rel_error(got.vectors[f"lm.layers.{layer}.mlp.act"], expected) <= TOL
