"""Decoder ports vs Hugging Face PyTorch on tiny random configs: logits and every site, float32, rel err <= 1e-5."""

import numpy as np
import pytest
import torch
import transformers

from ports import load_pretrained
from precise_jax import capture
from precise_jax.capture import available_sites
from tests.parity import left_padded_batch, randomize, rel_error, torch_sites

TOL = 1e-5
SMALL = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3, max_position_embeddings=64)

CASES = {
    "llama-mha-untied": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa-tied-odd-head-dim": (
        transformers.LlamaConfig,
        dict(num_attention_heads=6, num_key_value_heads=2, head_dim=10, tie_word_embeddings=True),
    ),
    "llama-biases": (
        transformers.LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    ),
    "llama3-rope": (
        transformers.LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=1, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8)),
    ),
    "linear-rope": (
        transformers.LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters=dict(
            rope_type="linear", rope_theta=10000.0, factor=2.5)),
    ),
    # max_position_embeddings below the sequence length so that the dynamic NTK base actually grows.
    "dynamic-rope": (
        transformers.LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8, rope_parameters=dict(
            rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
    ),
    "mistral-sliding-window": (
        transformers.MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=4),
    ),
    "qwen2": (transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2-sliding-layers": (
        transformers.Qwen2Config,
        dict(num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
             max_window_layers=1),
    ),
    "qwen3-gelu": (
        transformers.Qwen3Config,
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="gelu_pytorch_tanh"),
    ),
}


def hf_model(case: str, seed: int):
    config_cls, fields = CASES[case]
    config = config_cls(**{**SMALL, **fields})
    torch.manual_seed(seed)
    return randomize(transformers.AutoModelForCausalLM.from_config(config), seed)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_every_site_match_pytorch(case, tmp_path):
    seed = sorted(CASES).index(case)
    model = hf_model(case, seed)
    model.save_pretrained(tmp_path)
    lm = load_pretrained(tmp_path)

    batch = left_padded_batch(np.random.default_rng(seed), SMALL["vocab_size"], [13, 9, 4])
    with torch.no_grad(), torch_sites(model.model.layers) as expected:
        logits = model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()

    sites = available_sites(lm)
    assert set(sites) == set(expected), "the port exposes exactly the canonical sites of every layer"
    ours = capture(lm, batch, sites)
    out = lm.model.apply({"params": lm.params}, **batch)
    valid = batch["attention_mask"].astype(bool)  # pad positions carry no meaning in either implementation
    assert rel_error(out.logits[valid], logits[valid]) <= TOL
    errors = {name: rel_error(np.asarray(ours[name])[valid], expected[name][valid]) for name in sites}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{worst}: {errors[worst]:.2e}"


def test_default_positions_follow_left_padding(tmp_path):
    """Without position_ids the port counts real tokens only, as HF generate does."""
    model = hf_model("llama-gqa-tied-odd-head-dim", 11)
    model.save_pretrained(tmp_path)
    lm = load_pretrained(tmp_path)
    batch = left_padded_batch(np.random.default_rng(11), SMALL["vocab_size"], [7, 3])
    with torch.no_grad():
        expected = model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
    batch.pop("position_ids")
    logits = np.asarray(lm.model.apply({"params": lm.params}, **batch).logits)
    valid = batch["attention_mask"].astype(bool)
    assert rel_error(logits[valid], expected[valid]) <= TOL


def test_bfloat16_load_stays_close(tmp_path):
    model = hf_model("qwen2", 5)
    model.save_pretrained(tmp_path)
    import jax.numpy as jnp

    lm = load_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in __import__("jax").tree_util.tree_leaves(lm.params))
    batch = left_padded_batch(np.random.default_rng(5), SMALL["vocab_size"], [12, 12])
    with torch.no_grad():
        expected = model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
    logits = np.asarray(lm.model.apply({"params": lm.params}, **batch).logits)
    assert rel_error(logits, expected) < 5e-2  # bf16 has 8 mantissa bits; this checks wiring, not exactness
