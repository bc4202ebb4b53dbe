"""Neuron masks: masked-out entries stay bit-identical under AdamW + clipping; lean deltas (biases too) equal
masked updates."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from ports import InputError, load_pretrained
from precise_jax.masking import NeuronDeltas, neuron_masked, neuron_masks, trainable_count
from precise_jax.neurons import NeuronSet
from tests.parity import left_padded_batch, randomize

LAYERS, D, FF = 3, 24, 40


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    # MLP biases (Llama's mlp_bias): gate/up bias entries belong to their neurons, the down bias to none
    config = transformers.LlamaConfig(vocab_size=71, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, mlp_bias=True)
    torch.manual_seed(0)
    randomize(transformers.LlamaForCausalLM(config), seed=8).save_pretrained(path)
    return load_pretrained(path)


@pytest.fixture(scope="module")
def neurons():
    return NeuronSet({0: [3, 17], 2: [0, 5, 39]}, FF, LAYERS, {"model": "tiny"})


@pytest.fixture(scope="module")
def batch():
    b = left_padded_batch(np.random.default_rng(4), 71, [9, 6, 9])
    b.pop("position_ids")
    return b


def lm_loss(lm, batch, interceptor=None):
    def loss(params):
        def run():
            return lm.model.apply({"params": params}, **batch).logits
        if interceptor is None:
            logits = run()
        else:
            with nn.intercept_methods(interceptor):
                logits = run()
        targets = batch["input_ids"][:, 1:]
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return -(picked * batch["attention_mask"][:, 1:]).sum() / batch["attention_mask"][:, 1:].sum()
    return loss


def mlp_key(path) -> tuple | None:
    """(layer, matrix, leaf) of a language-model MLP leaf's tree path, as `neuron_masks` keys them."""
    keys = [p.key for p in path]
    if keys[0] == "lm" and len(keys) == 5 and keys[2] == "mlp":
        return int(keys[1].split("_")[1]), keys[3], keys[4]
    return None


def test_masked_adamw_leaves_every_other_entry_bit_identical(lm, neurons, batch):
    optimizer = neuron_masked(optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2, weight_decay=0.1)),
                              lm.params, neurons)
    params, state = lm.params, None
    state = optimizer.init(params)
    loss, update = jax.jit(jax.value_and_grad(lm_loss(lm, batch))), jax.jit(optimizer.update)
    losses = []
    for _ in range(5):
        value, grads = loss(params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    masks = neuron_masks(lm.params, neurons)
    changed = 0
    for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(lm.params), jax.tree_util.tree_leaves(params)):
        key = mlp_key(path)
        frozen = 1 - masks[key] if key in masks else np.ones(before.shape)
        np.testing.assert_array_equal(np.asarray(after)[frozen == 1], np.asarray(before)[frozen == 1])
        changed += int((np.asarray(after) != np.asarray(before)).sum())
    assert changed == trainable_count(neurons, D, gate_up_bias=True) == sum(int(m.sum()) for m in masks.values())
    # frozen leaves keep no optimizer state: moments exist only for the 10 leaves wired to neurons (gate/up kernels
    # and biases, down kernels, in 2 layers), and the selection is one bool d_ff vector per such leaf
    state_leaves = [x for x in jax.tree_util.tree_leaves(state) if hasattr(x, "shape") and x.ndim >= 1]
    moments = [x.shape for x in state_leaves if x.dtype == jnp.float32]
    selection = [x.shape for x in state_leaves if x.dtype == jnp.bool_]
    assert sorted(moments) == sorted(2 * ([(D, FF)] * 4 + [(FF,)] * 4 + [(FF, D)] * 2))
    assert sorted(selection) == sorted([(1, FF)] * 4 + [(FF,)] * 4 + [(FF, 1)] * 2)


def test_another_set_over_the_same_layers_reuses_the_compiled_update(lm, neurons):
    """The selection is optimizer state, not a traced constant: one compiled update serves every set."""
    adamw = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2, weight_decay=0.1))
    other = NeuronSet({0: [1, 2, 30], 2: [7]}, FF, LAYERS, {"model": "tiny"})
    first, second = neuron_masked(adamw, lm.params, neurons), neuron_masked(adamw, lm.params, other)
    rng = np.random.default_rng(3)
    grads = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), lm.params)
    update = jax.jit(first.update)
    reused, _ = update(grads, second.init(lm.params), lm.params)
    own, _ = second.update(grads, second.init(lm.params), lm.params)
    assert update._cache_size() == 1
    masks = neuron_masks(lm.params, other)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(reused), jax.tree_util.tree_leaves(own)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
        key = mlp_key(path)
        np.testing.assert_array_equal(np.asarray(a) != 0, masks[key] == 1 if key in masks else False)
    update(grads, first.init(lm.params), lm.params)
    assert update._cache_size() == 1


def test_trainable_count_by_hand(neurons):
    assert trainable_count(neurons, D) == 5 * 3 * D
    assert trainable_count(neurons, D, ("gate_proj", "up_proj"), gate_up_bias=True) == 5 * (2 * D + 2)


def test_lean_deltas_equal_merged_weights_and_masked_gradients(lm, neurons, batch):
    lean = NeuronDeltas(neurons)
    rng = np.random.default_rng(1)
    deltas = jax.tree_util.tree_map(lambda z: jnp.asarray(rng.normal(size=z.shape) * 0.1, jnp.float32),
                                    lean.init(lm.params))
    assert deltas["layers_2"]["up_proj"]["bias"].shape == (3,) and "bias" not in deltas["layers_2"]["down_proj"]
    merged = lean.merge(lm.params, deltas)

    # loss and gradient w.r.t. the deltas == the merged model's, at the selected rows/columns/bias entries
    loss_deltas, grad_deltas = jax.jit(jax.value_and_grad(
        lambda dl: lm_loss(lm, batch, lean.interceptor(dl))(lm.params)))(deltas)
    loss_full, grad_full = jax.jit(jax.value_and_grad(lm_loss(lm, batch)))(merged)
    np.testing.assert_allclose(loss_deltas, loss_full, rtol=1e-6)
    for layer, idx in lean.indices().items():
        g = grad_full["lm"][layer]["mlp"]
        for matrix, leaf, entries in [("gate_proj", "kernel", (slice(None), idx)), ("up_proj", "bias", idx),
                                      ("down_proj", "kernel", idx)]:
            np.testing.assert_allclose(grad_deltas[layer][matrix][leaf], g[matrix][leaf][entries], rtol=1e-4,
                                       atol=1e-7)


def test_bad_input(lm, neurons):
    empty = NeuronSet({}, FF, LAYERS)
    with pytest.raises(InputError, match="selects no parameters"):
        neuron_masked(optax.sgd(0.1), lm.params, empty)
    with pytest.raises(InputError, match="matrices must be"):
        neuron_masked(optax.sgd(0.1), lm.params, neurons, matrices=("o_proj",))
    with pytest.raises(InputError, match="empty"):
        NeuronDeltas(empty).init(lm.params)
