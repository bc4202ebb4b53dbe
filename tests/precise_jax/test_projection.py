"""CARE's projection h' = h − α U Uᵀ (h − μ), fused across subspaces, against the same formula applied eagerly
in PyTorch to the Hugging Face model through forward hooks (plain forwards and step-by-step greedy generation)."""

import numpy as np
import pytest
import torch
import transformers

from ports import InputError, generate, load_pretrained
from ports.generate import _generate
from ports.processing import TokenType
from precise_jax.interventions import care_projection, forward_with, projection, projection_hook
from precise_jax.subspace import Subspace
from tests.parity import left_padded_batch, one_torch_thread, randomize, rel_error

D, N_NEW, PAD, LAYERS = 32, 8, 0, (0, 2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(vocab_size=83, hidden_size=D, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=None,
                                      pad_token_id=PAD, bos_token_id=None)
    torch.manual_seed(0)
    model = randomize(transformers.LlamaForCausalLM(config), seed=7, scale=0.15)
    model.save_pretrained(path)
    with one_torch_thread():
        yield model, load_pretrained(path)


@pytest.fixture(scope="module")
def batch():
    b = left_padded_batch(np.random.default_rng(3), 82, [10, 7, 5], avoid=[PAD])
    b.pop("position_ids")
    # Pretend tokens 1..3 of each row are an image, so the two subspaces can be gated by modality.
    types = np.where(b["attention_mask"] == 1, TokenType.PROMPT, TokenType.PAD)
    for r in range(len(types)):
        start = int(np.argmax(b["attention_mask"][r]))
        types[r, start] = TokenType.TEMPLATE
        types[r, start + 1:start + 4] = TokenType.IMAGE
    b["token_types"] = types
    return b


@pytest.fixture(scope="module")
def subspaces():
    """Per layer a visual subspace with an orthonormal basis and a text one with unit, non-orthogonal columns (as
    the faithful mode gives), of the MLP output."""
    rng = np.random.default_rng(11)
    out = {}
    for layer in LAYERS:
        ortho, _ = np.linalg.qr(rng.normal(size=(D, 6)))
        unit = rng.normal(size=(D, 4))
        unit /= np.linalg.norm(unit, axis=0)
        out[layer] = [
            Subspace(basis=ortho.astype(np.float32), center=(rng.normal(size=D) * 0.05).astype(np.float32),
                     eigenvalues=np.arange(6, 0, -1, dtype=np.float32), site=f"lm.layers.{layer}.mlp.out",
                     modality="visual"),
            Subspace(basis=unit.astype(np.float32), center=(rng.normal(size=D) * 0.05).astype(np.float32),
                     eigenvalues=np.arange(4, 0, -1, dtype=np.float32), site=f"lm.layers.{layer}.mlp.out",
                     modality="text", mode="faithful"),
        ]
    return out


def torch_project(h, subs, fusion, alpha, ks, wheres, ratios=(0.5, 0.5)):
    """The official formula in torch: h [B, T, D], wheres [B, T, 1] 0/1 per subspace."""
    def corr(m, v):
        u = torch.tensor(subs[m].basis[:, :ks[m]])
        mu = torch.tensor(subs[m].center)
        return -alpha[m] * wheres[m] * ((v - mu) @ u @ u.T)

    if fusion == "sequential":
        v = h
        for m in range(len(subs)):
            v = v + corr(m, v)
        return v
    deltas = [corr(m, h) for m in range(len(subs))]
    if fusion == "parallel":
        return sum(r * (h + d) for r, d in zip(ratios, deltas))
    sizes = [d.norm(dim=-1, keepdim=True) for d in deltas]
    total = sum(sizes)
    fused = sum(s / (total + 1e-8) * (h + d) for s, d in zip(sizes, deltas))
    return torch.where(total > 0, fused, h)


def placement_masks(types, generated: int):
    """Per subspace [B, T, 1]: visual on image tokens only, text on prompt tokens and every generated token."""
    types = np.concatenate([types, np.full((len(types), generated), TokenType.RESPONSE)], axis=1)
    vis = types == TokenType.IMAGE
    txt = (types == TokenType.PROMPT) | (types == TokenType.RESPONSE)
    return [torch.tensor(m[..., None], dtype=torch.float32) for m in (vis, txt)]


OPTIONS = dict(alpha=[3.0, 2.5], k=[5, 3], token_types=[[TokenType.IMAGE], [TokenType.PROMPT]],
               at_decode=[False, True])


def hf_run(model, ids, mask, edits):
    """Logits [B, T, V] of an uncached forward with each layer's MLP output replaced by edits[layer](h)."""
    handles = [model.model.layers[l].mlp.register_forward_hook(lambda m, a, o, fn=fn: fn(o))
               for l, fn in edits.items()]
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         position_ids=torch.tensor(np.where(mask == 1, np.cumsum(mask, 1) - 1, 0))).logits.numpy()
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("fusion", ["adaptive", "parallel", "sequential"])
def test_forward_matches_torch_hooks(models, batch, subspaces, fusion):
    model, lm = models
    params = care_projection(subspaces, fusion=fusion, **OPTIONS)
    ours = np.asarray(forward_with(lm, batch, projection_hook, params))
    wheres = placement_masks(batch["token_types"], 0)
    edits = {l: (lambda h, l=l: torch_project(h, subspaces[l], fusion, OPTIONS["alpha"], OPTIONS["k"], wheres))
             for l in LAYERS}
    expected = hf_run(model, batch["input_ids"], batch["attention_mask"], edits)
    valid = batch["attention_mask"].astype(bool)
    assert rel_error(ours[valid], expected[valid]) <= 1e-5
    assert rel_error(expected[valid], hf_run(model, batch["input_ids"], batch["attention_mask"], {})[valid]) > 1e-2


# (fusion, alpha, k) per generation run: all share one compilation.
SWEEP = [("adaptive", [3.0, 2.5], [5, 3]), ("parallel", [1.5, 4.0], [2, 4]), ("sequential", [4.0, 1.0], [6, 1])]


def test_generation_matches_eager_step_by_step(models, batch, subspaces):
    """Cached jitted decoding with the projection at prefill and every step = uncached torch greedy with hooks;
    sweeping fusion, alpha and k reuses one compilation."""
    model, lm = models
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_types")}
    options = {k: v for k, v in OPTIONS.items() if k not in ("alpha", "k")}
    size = None
    for fusion, alpha, k in SWEEP:
        params = care_projection(subspaces, fusion=fusion, alpha=alpha, k=k, **options)
        out = generate(lm, inputs, max_new_tokens=N_NEW, stop_tokens=[], pad_token=PAD, hook=projection_hook,
                       hook_params=params)
        size = size or _generate._cache_size()
        assert _generate._cache_size() == size

        expected = torch_greedy(model, batch, lambda step: {l: (
            lambda h, l=l, wheres=placement_masks(batch["token_types"], step):  # noqa: B008  (bound per step)
            torch_project(h, subspaces[l], fusion, alpha, k, wheres)) for l in LAYERS})
        np.testing.assert_array_equal(np.asarray(out.tokens), expected)
        assert not np.array_equal(expected, torch_greedy(model, batch, lambda step: {}))  # the projection matters


def torch_greedy(model, batch, edits_at):
    """[B, N_NEW] greedy tokens from uncached forwards over the whole sequence, edits_at(step) at each step."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for step in range(N_NEW):
        token = hf_run(model, ids, mask, edits_at(step))[:, -1].argmax(-1)
        ids = np.concatenate([ids, token[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones_like(token)[:, None]], axis=1)
    return ids[:, -N_NEW:]


def test_zero_strength_is_the_identity(models, batch, subspaces):
    model, lm = models
    zero = np.asarray(forward_with(lm, batch, projection_hook, care_projection(subspaces, alpha=0.0)))
    valid = batch["attention_mask"].astype(bool)
    assert rel_error(zero[valid], hf_run(model, batch["input_ids"], batch["attention_mask"], {})[valid]) <= 1e-5


def test_bad_projections(subspaces):
    vis, txt = subspaces[0]
    narrow = Subspace(basis=np.eye(8, 2, dtype=np.float32), center=np.zeros(8, np.float32),
                      eigenvalues=np.ones(2, np.float32))
    with pytest.raises(InputError, match="different widths"):
        projection([vis, narrow])
    with pytest.raises(InputError, match="has 4 directions"):
        projection([vis, txt], k=[2, 5])
    with pytest.raises(InputError, match="unknown fusion"):
        projection([vis, txt], fusion="mean")
    with pytest.raises(InputError, match="sum to 1"):
        projection([vis, txt], fusion="parallel", ratios=[0.5, 0.7])
    with pytest.raises(InputError, match="one entry per subspace"):
        projection([vis, txt], token_types=[[TokenType.IMAGE]])
    with pytest.raises(InputError, match="at least one"):
        projection([])
    with pytest.raises(InputError, match="max_k"):
        projection([vis, txt], max_k=3)
