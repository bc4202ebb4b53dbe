"""KV-cache generation vs Hugging Face `generate` on tiny random models: greedy parity, cache vs full forward,
sampling (reproducibility, top-p, distribution), the site hook, and bad input."""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
import transformers

from ports import InputError, load_pretrained
from ports.generate import GenerationOutput, HookInfo, _generate, generate, intercept_sites
from tests.parity import left_padded_batch, one_torch_thread, randomize, rel_error

TOL = 1e-5
N = 24  # new tokens
PAD = 0
LENGTHS = [5, 11, 8, 3]
SMALL = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=64,
             bos_token_id=None, eos_token_id=None, pad_token_id=PAD)
CASES = {
    "llama-gqa": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": (transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": (transformers.Qwen3Config, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "llama-tied": (
        transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    ),
}
TARGET = ("lm", "layers_1", "mlp", "act")  # the neurons of layer 1: the input of its down_proj


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, batch):
    return model.apply({"params": params}, **batch).logits


def forward(lm, batch):
    """A plain (uncached) forward; jitted, since eager flax compiles op by op and is slower on first use."""
    return _logits(lm.model, lm.params, batch)


def hf_generate(model, batch, eos, **kwargs):
    """Greedy HF generate -> (new tokens [B, N] padded with PAD, scores [B, steps run, V])."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
            max_new_tokens=N, do_sample=False, eos_token_id=eos, pad_token_id=PAD,
            output_scores=True, return_dict_in_generate=True, **kwargs,
        )
    new = out.sequences[:, batch["input_ids"].shape[1]:].numpy()
    tokens = np.full((len(new), N), PAD)
    tokens[:, : new.shape[1]] = new
    return tokens, torch.stack(out.scores, axis=1).numpy()


def lengths_of(tokens, eos) -> np.ndarray:
    """Generated tokens up to and including the first eos (N when none)."""
    hit = tokens == eos
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, N)


def assert_no_ties(scores, lengths):
    """The greedy choice is decided by a clear margin at every step a row is still running."""
    top2 = np.sort(scores, axis=-1)[..., -2:]
    gaps = top2[..., 1] - top2[..., 0]
    running = np.arange(scores.shape[1])[None, :] < lengths[:, None]
    assert gaps[running].min() > 1e-4, "tied top-2 logits: pick another seed"


def pick_eos(tokens, prompts) -> int:
    """A token that ends some rows early but never appears in another row, nor in any prompt."""
    for token in np.unique(tokens):
        early, never = (tokens[:, : N - 4] == token).any(axis=1), ~(tokens == token).any(axis=1)
        if token != PAD and token not in prompts and early.any() and never.any():
            return int(token)
    raise AssertionError("no token ends some rows but not all: pick another seed")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """case -> namespace(hf, lm, batch, eos, expected, scores), built once per module."""
    built = {}

    def get(case):
        if case not in built:
            seed = list(CASES).index(case) + 1  # seeds checked free of near-tied greedy choices
            config_cls, fields = CASES[case]
            torch.manual_seed(seed)
            hf = randomize(transformers.AutoModelForCausalLM.from_config(config_cls(**{**SMALL, **fields})), seed,
                           scale=0.15)
            batch = left_padded_batch(np.random.default_rng(seed), SMALL["vocab_size"], LENGTHS, avoid=[PAD])
            batch.pop("position_ids")
            # Generate once without a stop token, then make a token that some rows reach early the eos.
            free, free_scores = hf_generate(hf, batch, eos=None)
            eos = pick_eos(free, batch["input_ids"][batch["attention_mask"] == 1])
            hf.config.eos_token_id = hf.generation_config.eos_token_id = eos
            hf.generation_config.pad_token_id = PAD
            folder = tmp_path_factory.mktemp(case)
            hf.save_pretrained(folder)
            expected, scores = hf_generate(hf, batch, eos)
            built[case] = types.SimpleNamespace(
                hf=hf, lm=load_pretrained(folder), batch=batch, eos=eos, expected=expected, scores=scores, free=free,
                free_scores=free_scores,
            )
        return built[case]

    with one_torch_thread():  # tiny models run ~30x faster on one thread
        yield get


# ----------------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_hf_generate(models, case):
    m = models(case)
    lengths = lengths_of(m.expected, m.eos)
    assert_no_ties(m.scores, lengths)
    assert (lengths < N).any() and (lengths == N).any(), "some rows stop early, some run to the end"

    out = generate(m.lm, m.batch, max_new_tokens=N, return_logits=True)  # stop and pad ids from the checkpoint
    np.testing.assert_array_equal(np.asarray(out.tokens), m.expected)
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths)
    run = m.scores.shape[1]
    assert rel_error(np.asarray(out.logits)[:, :run], m.scores) <= TOL


def test_cache_steps_equal_full_forward(models):
    m = models("llama-gqa")
    out = generate(m.lm, m.batch, max_new_tokens=N, return_logits=True)
    ids = np.concatenate([m.batch["input_ids"], np.asarray(out.tokens)], axis=1)
    mask = np.concatenate([m.batch["attention_mask"], np.ones_like(out.tokens)], axis=1)
    full = forward(m.lm, {"input_ids": ids, "attention_mask": mask})
    t, run = m.batch["input_ids"].shape[1], int(out.lengths.max())
    # The logits that chose token s come from the forward over the prompt and tokens 0..s-1.
    assert rel_error(np.asarray(out.logits)[:, :run], np.asarray(full)[:, t - 1: t - 1 + run]) <= TOL


def test_stop_tokens_argument_overrides_the_checkpoint(models):
    m = models("llama-gqa")
    assert_no_ties(m.free_scores, np.full(len(LENGTHS), N))
    out = generate(m.lm, m.batch, max_new_tokens=N, stop_tokens=[], return_logits=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), m.free)
    assert (np.asarray(out.lengths) == N).all()
    single = generate(m.lm, m.batch, max_new_tokens=N, stop_tokens=m.eos, return_logits=True)
    np.testing.assert_array_equal(np.asarray(single.tokens), m.expected)


def test_decoding_ends_when_every_row_has_stopped(models):
    m = models("llama-gqa")
    stops = sorted({int(t) for t in m.free[:, 2]})  # every row meets one of these by its third token
    expected, scores = hf_generate(m.hf, m.batch, stops)
    lengths = np.array([min(np.flatnonzero(np.isin(row, stops))) + 1 for row in expected])
    assert_no_ties(scores, lengths)
    assert scores.shape[1] == lengths.max() <= 3, "Hugging Face stopped early too"

    out = generate(m.lm, m.batch, max_new_tokens=N, stop_tokens=stops, return_logits=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths)
    assert not np.asarray(out.logits)[:, lengths.max():].any(), "no step ran after every row had stopped"


# ----------------------------------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy(models):
    m = models("llama-gqa")
    sample = lambda seed, top_p=0.9: np.asarray(generate(  # noqa: E731
        m.lm, m.batch, max_new_tokens=N, temperature=1.5, top_p=top_p, rng=jax.random.key(seed)).tokens)
    first = sample(1)
    compiled = _generate._cache_size()
    np.testing.assert_array_equal(first, sample(1))
    assert (first != sample(2)).any()
    np.testing.assert_array_equal(sample(3, top_p=1e-6), m.expected)
    assert _generate._cache_size() == compiled, "top_p and rng are traced, not static"


def test_first_token_follows_the_truncated_softmax(models):
    m = models("llama-gqa")
    temperature, top_p, draws = 0.5, 0.8, 2000  # keeps 7 tokens holding 0.81 of the mass
    row = 1  # the longest prompt (no padding)
    batch = {k: np.repeat(v[row: row + 1], draws, axis=0) for k, v in m.batch.items()}
    out = generate(m.lm, batch, max_new_tokens=1, temperature=temperature, top_p=top_p, rng=jax.random.key(7))
    counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=SMALL["vocab_size"])

    # Reference in float64 from the PyTorch logits: softmax(logits / T), then Hugging Face's top-p cut.
    p = scipy.special.softmax(m.scores[row, 0].astype(np.float64) / temperature)
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    assert np.abs(before - top_p).min() > 1e-3, "a token sits on the top-p boundary: pick other settings"
    kept = order[before < top_p]
    assert 3 <= len(kept) and p[kept].sum() < 0.9, "the cut keeps several tokens and drops real mass"
    assert counts.sum() == counts[kept].sum(), "no draw outside the nucleus"
    expected = p[kept] / p[kept].sum() * draws
    # Chi-square goodness of fit on the kept tokens (bins expected < 5 merged so the asymptotics hold). With a
    # fixed key the test is deterministic; a correct sampler fails p < 1e-3 for one key in a thousand, while a
    # temperature off by 10 % already gives p ~ 1e-30 here (checked), and one ignored draws outside the nucleus.
    big = expected >= 5
    observed = np.append(counts[kept][big], counts[kept][~big].sum())
    wanted = np.append(expected[big], expected[~big].sum())
    if wanted[-1] == 0:
        observed, wanted = observed[:-1], wanted[:-1]
    assert scipy.stats.chisquare(observed, wanted).pvalue > 1e-3
    # Total variation: E[TV] <= sqrt(2 / pi) / 2 * sqrt(k / n) ~ 0.4 sqrt(k / n) for n draws over k categories.
    tv = 0.5 * np.abs(counts[kept] / draws - expected / draws).sum()
    assert tv < np.sqrt(len(kept) / draws)


# ----------------------------------------------------------------------------------------------------- hooks


def identity(hook_params, path, x, info):
    return x


TRACED = []


def mask_neurons(hook_params, path, x, info):
    """Multiply the layer-1 neurons by hook_params['mask'] [F]; records each trace (a Python side effect)."""
    TRACED.append((path, info.prefill))
    return x * hook_params["mask"] if path == TARGET else x


def test_identity_hook_changes_nothing(models):
    m = models("llama-gqa")
    out = generate(m.lm, m.batch, max_new_tokens=N, hook=identity)
    np.testing.assert_array_equal(np.asarray(out.tokens), m.expected)


def test_neuron_hook_matches_torch_pre_hook_and_does_not_recompile(models):
    m = models("llama-gqa")
    width = m.lm.config.intermediate_size
    handle = m.hf.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda module, args: (args[0] * 0,))
    try:
        ablated, scores = hf_generate(m.hf, m.batch, m.eos)
    finally:
        handle.remove()
    assert_no_ties(scores, lengths_of(ablated, m.eos))
    assert (ablated != m.expected).any(), "zeroing the layer-1 neurons changes the output"

    TRACED.clear()
    zero = generate(m.lm, m.batch, max_new_tokens=N, hook=mask_neurons, hook_params={"mask": jnp.zeros(width)})
    np.testing.assert_array_equal(np.asarray(zero.tokens), ablated)
    assert {(TARGET, True), (TARGET, False)} <= set(TRACED), "the hook sees the site at prefill and decode"
    traces, compiled = len(TRACED), _generate._cache_size()

    keep = generate(m.lm, m.batch, max_new_tokens=N, hook=mask_neurons, hook_params={"mask": jnp.ones(width)})
    np.testing.assert_array_equal(np.asarray(keep.tokens), m.expected)
    assert len(TRACED) == traces and _generate._cache_size() == compiled, "new hook_params reuse the compilation"


def test_intercept_sites_in_a_plain_forward(models):
    m = models("llama-gqa")
    seen = {}

    def record(hook_params, path, x, info):
        seen[path] = info
        return x * hook_params if path == TARGET else x

    @jax.jit
    def hooked(params, batch, scale):
        with intercept_sites(record, scale, HookInfo.for_forward(batch["attention_mask"])):
            return m.lm.model.apply({"params": params}, **batch).logits

    batch = {k: jnp.asarray(v) for k, v in m.batch.items()}
    plain = forward(m.lm, batch)
    assert rel_error(hooked(m.lm.params, batch, jnp.float32(1)), plain) <= 1e-6  # jit fuses differently
    assert rel_error(hooked(m.lm.params, batch, jnp.float32(0)), plain) > 1e-2
    assert seen[TARGET].prefill and seen[TARGET].positions.shape == batch["input_ids"].shape
    assert len(seen) == 4 * SMALL["num_hidden_layers"], "every site of every layer passes through the hook"


# ----------------------------------------------------------------------------------------------------- outputs


def test_text_cuts_rows_at_their_length():
    calls = []

    class Processor:
        def batch_decode(self, rows, skip_special_tokens):
            calls.append(skip_special_tokens)
            return [" ".join(map(str, row)) for row in rows]

    tokens = jnp.asarray([[5, 6, 2, 0], [7, 8, 9, 4]], jnp.int32)
    out = GenerationOutput(tokens=tokens, lengths=jnp.asarray([3, 4], jnp.int32))
    assert out.text(Processor()) == ["5 6 2", "7 8 9 4"] and calls == [True]


# ----------------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_a_clear_message(models):
    m = models("llama-gqa")
    right = {"input_ids": np.array([[5, 6, 0], [5, 6, 7]]), "attention_mask": np.array([[1, 1, 0], [1, 1, 1]])}
    with pytest.raises(InputError, match="padding_side='left'"):
        generate(m.lm, right, max_new_tokens=2)
    with pytest.raises(InputError, match="rng=jax.random.key"):
        generate(m.lm, m.batch, max_new_tokens=2, temperature=0.7)
    with pytest.raises(InputError, match="rng=jax.random.key"):
        generate(m.lm, m.batch, max_new_tokens=2, temperature=0.7, rng=3)
    with pytest.raises(InputError, match="max_new_tokens"):
        generate(m.lm, m.batch, max_new_tokens=0)
    with pytest.raises(InputError, match="top_p"):
        generate(m.lm, m.batch, max_new_tokens=2, temperature=0.7, top_p=0.0, rng=jax.random.key(0))
