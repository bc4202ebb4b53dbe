"""Generalized eigen-decomposition and CARE subspaces against scipy / a float64 numpy reimplementation of the
official code; CARE's kernel token selection against the official numpy scorers; storage; bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch
import transformers

from ports import InputError, load_pretrained
from ports.processing import TokenType
from precise_jax.stats import Moments
from precise_jax.subspace import (
    build_subspace, care_weights, collect_care, generalized_eigh, load_subspaces, modality_masks, save_subspaces,
    shrink, text_token_scores, visual_token_scores,
)
from tests.parity import left_padded_batch, randomize, rel_error


def spd_problem(rng, d, n_a, n_b, spread=3.0):
    """Covariances of n_a and n_b random samples with unequal scales per direction (float64)."""
    scales = np.exp(rng.uniform(-np.log(spread), np.log(spread), d))
    x_a = rng.normal(size=(n_a, d)) * scales
    x_b = rng.normal(size=(n_b, d)) @ (np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d))
    return np.cov(x_a.T), np.cov(x_b.T)


def max_sine(u, v):
    """The largest principal angle's sine between the spans of u and v."""
    return float(np.max(np.sin(scipy.linalg.subspace_angles(np.asarray(u, np.float64), np.asarray(v, np.float64)))))


def moments(x) -> Moments:
    """Streaming statistics of samples x [N, D] with covariance, made on the host (no per-op compilation)."""
    x = np.asarray(x, np.float64)
    dev = x - x.mean(0)
    f32 = lambda v: jnp.asarray(np.asarray(v, np.float32))  # noqa: E731
    return Moments(count=jnp.asarray(len(x), jnp.int32), mean=f32(x.mean(0)), m2=f32((dev**2).sum(0)),
                   positive=jnp.asarray((x > 0).sum(0), jnp.int32), maximum=f32(x.max(0)), comoment=f32(dev.T @ dev))


# ----------------------------------------------------------------------------------------------------- eigen


D = 40  # one width for the small problems, so each jitted routine compiles once


@pytest.mark.parametrize("k, ridge", [(6, 0.0), (10, 0.05)])
def test_generalized_eigh_matches_scipy(k, ridge):
    d = D
    rng = np.random.default_rng(k)
    a, b = spd_problem(rng, d, 3 * d, 4 * d)
    w, v = generalized_eigh(a, b, k=k, ridge=ridge)
    ref_w, ref_v = scipy.linalg.eigh(a, b + ridge * np.eye(d))
    ref_w, ref_v = ref_w[::-1][:k], ref_v[:, ::-1][:, :k]
    assert np.max(np.abs(np.asarray(w) - ref_w) / ref_w) <= 2e-5
    assert max_sine(v, ref_v) <= 1e-4
    # B-orthonormal, as scipy's eigenvectors are
    np.testing.assert_allclose(np.asarray(v).T @ (b + ridge * np.eye(d)) @ np.asarray(v), np.eye(k), atol=2e-5)


def test_rank_deficient_b_with_shrinkage_matches_scipy_on_the_shrunk_b():
    rng = np.random.default_rng(5)
    d, gamma = D, 0.1
    a, _ = spd_problem(rng, d, 200, 10)
    b = np.cov((rng.normal(size=(30, d)) * rng.uniform(0.5, 2, d)).T)  # rank 29 < d
    w, v = generalized_eigh(a, b, k=8, shrinkage=gamma)
    shrunk = (1 - gamma) * b + gamma * np.trace(b) / d * np.eye(d)
    np.testing.assert_allclose(np.asarray(shrink(b, gamma)), shrunk, rtol=1e-5, atol=1e-6)
    ref_w, ref_v = scipy.linalg.eigh(a, shrunk)
    assert np.max(np.abs(np.asarray(w) - ref_w[::-1][:8]) / ref_w[::-1][:8]) <= 2e-5
    assert max_sine(v, ref_v[:, ::-1][:, :8]) <= 1e-4
    with pytest.raises(InputError, match="not positive definite"):
        generalized_eigh(a, b - 0.5 * np.eye(d))  # indefinite, no regularisation


def test_large_problem_matches_scipy():
    """d = 2048: the float32 Cholesky route against scipy's float64 eigh(a, b) (top 16 pairs)."""
    rng = np.random.default_rng(2048)
    d, k = 2048, 16
    # Low-rank-plus-identity covariances: cheap to build, well conditioned, with distinct leading eigenvalues.
    x_a, x_b = rng.normal(size=(d, 48)) * np.linspace(1, 3, 48), rng.normal(size=(d, 64))
    a = x_a @ x_a.T / 48 + 0.1 * np.eye(d)
    b = x_b @ x_b.T / 64 + np.eye(d)
    w, v = generalized_eigh(a, b, k=k)
    ref_w, ref_v = scipy.linalg.eigh(a, b, subset_by_index=[d - k, d - 1], driver="gvx")
    ref_w, ref_v = ref_w[::-1], ref_v[:, ::-1]
    assert np.max(np.abs(np.asarray(w) - ref_w) / ref_w) <= 1e-4
    assert max_sine(v, ref_v) <= 1e-3


# ----------------------------------------------------------------------------------------------------- subspaces


def official_subspace(benign, malicious, n_components):
    """FredJDean/CARE `_build_generalized_subspace`, in float64 numpy (sqrtm, inv, eigh, unit columns)."""
    benign_mean, malicious_mean = benign.mean(axis=0), malicious.mean(axis=0)
    sigma_ben = (benign - benign_mean).T @ (benign - benign_mean) / len(benign)
    sigma_mal = (malicious - malicious_mean).T @ (malicious - malicious_mean) / len(malicious)
    d = sigma_ben.shape[0]
    white = np.linalg.inv(scipy.linalg.sqrtm(sigma_ben + 1e-6 * np.eye(d)))
    eigvals, eigvecs = np.linalg.eigh(white @ sigma_mal @ white)
    k = min(n_components, d - 1)
    u = (white @ eigvecs[:, np.argsort(eigvals)[::-1][:k]]).astype(np.float32)
    for i in range(k):
        u[:, i] /= np.linalg.norm(u[:, i]) + 1e-8
    return u, benign_mean


def test_faithful_mode_equals_the_official_formula():
    rng = np.random.default_rng(17)
    d = D
    benign = rng.normal(size=(300, d)) * rng.uniform(0.3, 2, d) + 1.0
    malicious = rng.normal(size=(200, d)) * np.linspace(0.2, 3, d) - 0.5
    u, mean = official_subspace(benign, malicious, 6)
    s = build_subspace(moments(benign), moments(malicious), 6, mode="faithful")
    ours, ref = s.basis.astype(np.float64), u.astype(np.float64)
    assert rel_error(ours @ ours.T, ref @ ref.T) <= 1e-4  # the operator the projection applies
    np.testing.assert_allclose(np.linalg.norm(s.basis, axis=0), 1.0, atol=1e-6)
    assert rel_error(s.center, mean) <= 1e-6 and s.mode == "faithful"


def test_faithful_mode_in_float64_on_a_singular_benign_covariance():
    """N_ben < d, as in the paper: float32 cannot resolve the 1e-6 ridge and says so; float64 matches numpy."""
    rng = np.random.default_rng(4)
    d = D
    benign = rng.normal(size=(20, d)) * 3
    malicious = rng.normal(size=(60, d)) * np.linspace(0.5, 2, d)
    u, mean = official_subspace(benign, malicious, 6)
    with pytest.raises(InputError, match="float64"):
        build_subspace(moments(benign), moments(malicious), 6, mode="faithful")
    cov = lambda x: (x - x.mean(0)).T @ (x - x.mean(0)) / len(x)  # noqa: E731
    with jax.enable_x64(True):
        s = build_subspace(cov(benign), cov(malicious), 6, mode="faithful", center=mean, counts=(20, 60),
                           dtype=jnp.float64)
    assert rel_error(s.basis.astype(np.float64) @ s.basis.T, u.astype(np.float64) @ u.T) <= 1e-5


def test_orthonormal_mode_spans_the_generalized_eigenvectors(tmp_path):
    rng = np.random.default_rng(8)
    d, k, gamma = D, 5, 0.1
    benign, malicious = rng.normal(size=(20, d)), rng.normal(size=(50, d)) * np.linspace(0.2, 2, d)
    s = build_subspace(moments(benign), moments(malicious), k, shrinkage=gamma, site="lm.layers.3.resid",
                       modality="text", provenance={"data": "unit-test"})
    np.testing.assert_allclose(s.basis.T @ s.basis, np.eye(k), atol=1e-5)
    b, a = np.cov(benign.T), np.cov(malicious.T)
    ref_w, ref_v = scipy.linalg.eigh(a, (1 - gamma) * b + gamma * np.trace(b) / d * np.eye(d))
    assert max_sine(s.basis, ref_v[:, ::-1][:, :k]) <= 1e-4
    assert np.max(np.abs(s.eigenvalues - ref_w[::-1][:k]) / ref_w[::-1][:k]) <= 2e-5
    assert rel_error(s.center, benign.mean(0)) <= 1e-6

    visual = dataclasses.replace(s, modality="visual", mode="faithful")
    path = save_subspaces(tmp_path / "care.safetensors", [s, visual], {"model": "tiny"})
    loaded, meta = load_subspaces(path)
    assert meta == {"model": "tiny"} and set(loaded) == {"text/lm.layers.3.resid", "visual/lm.layers.3.resid"}
    back = loaded["text/lm.layers.3.resid"]
    np.testing.assert_array_equal(back.basis, s.basis)
    np.testing.assert_array_equal(back.center, s.center)
    assert back.provenance["data"] == "unit-test" and back.provenance["shrinkage"] == gamma
    assert loaded["visual/lm.layers.3.resid"].mode == "faithful"


def test_bad_input():
    rng = np.random.default_rng(0)
    d = D
    a, b = spd_problem(rng, d, 120, 120)
    nan = a.copy()
    nan[2, 3] = nan[3, 2] = np.nan
    with pytest.raises(InputError, match="NaN or Inf"):
        generalized_eigh(nan, b)
    inf = b.copy()
    inf[0, 0] = np.inf
    with pytest.raises(InputError, match="NaN or Inf"):
        build_subspace(a, inf, 2, center=np.zeros(d))
    with pytest.raises(InputError, match="not symmetric"):
        generalized_eigh(a, b + np.triu(np.ones((d, d)), 1))
    with pytest.raises(InputError, match="not positive definite"):
        generalized_eigh(a, -b)
    with pytest.raises(InputError, match=r"k must be an integer in \[1, d=40\]"):
        generalized_eigh(a, b, k=41)
    with pytest.raises(InputError, match="square"):
        generalized_eigh(a, b[:, :5])
    few, many = moments(rng.normal(size=(1, d))), moments(rng.normal(size=(60, d)))
    with pytest.raises(InputError, match="1 example"):
        build_subspace(many, few, 1)
    with pytest.raises(InputError, match="exceeds the rank"):
        build_subspace(many, moments(rng.normal(size=(4, d))), 4)  # rank <= 3
    with pytest.raises(InputError, match="numerical rank"):
        low = rng.normal(size=(d, 2))
        build_subspace(b, low @ low.T, 3, center=np.zeros(d))  # rank 2, no counts given
    with pytest.raises(InputError, match="singular"):
        build_subspace(moments(rng.normal(size=(30, d))), many, 2)  # N_ben - 1 < d without shrinkage
    with pytest.raises(InputError, match="center="):
        build_subspace(b, a, 2)
    with pytest.raises(InputError, match="no covariance"):
        build_subspace(Moments.zeros(d), many, 2)
    with pytest.raises(InputError, match="unknown mode"):
        build_subspace(many, many, 2, mode="pca")
    with pytest.raises(InputError, match="enable_x64"):
        build_subspace(many, many, 2, dtype=jnp.float64)
    with pytest.raises(InputError, match="shrinkage"):
        build_subspace(many, many, 2, mode="faithful", shrinkage=0.1)


# ----------------------------------------------------------------------------------------------------- tokens


def official_visual_scores(v, t):
    """FredJDean/CARE steer/act_qwen.py `compute_visual_text_mi_scores`, float64."""
    eps = 1e-8
    dists = np.clip((v**2).sum(1)[:, None] + (t**2).sum(1)[None] - 2 * v @ t.T, 0, 1e6)
    sigma = np.sqrt(0.5 * np.median(dists[dists > 0]) + eps)
    k = np.exp(-dists / (2 * sigma**2 + eps))
    k = k @ (np.eye(len(t)) - np.ones((len(t), len(t))) / len(t))
    s = np.sum(k**2, axis=1)
    return (s - s.min()) / (s.max() - s.min() + eps)


def official_text_scores(t):
    """FredJDean/CARE steer/act_qwen_text.py `compute_text_token_mi_scores` (self_hsic), float64."""
    eps, n = 1e-8, len(t)
    sq = (t**2).sum(1, keepdims=True)
    dists = np.clip(sq + sq.T - 2 * t @ t.T, 0, 1e6)
    np.fill_diagonal(dists, 0.0)  # the exact value; float rounding leaves ~1e-13 there
    nonzero = dists[dists > 0]
    sigma = np.sqrt(0.5 * np.median(nonzero) + eps) if len(nonzero) else 1.0
    k = np.exp(-dists / (2 * sigma**2 + eps))
    h = np.eye(n) - np.ones((n, n)) / n
    s = 0.7 * dists.mean(1) + 0.3 * np.abs(np.diag(h @ k @ h))
    return (s - s.min()) / (s.max() - s.min() + eps) if s.max() > s.min() else s


def official_vector(x, visual, text, modality):
    """The official per-example vector of one row x [T, D] (visual: top n_v/8; text: top 20 %)."""
    v, t = x[visual], x[text]
    if modality == "visual":
        scores, k = official_visual_scores(v, t), int(len(v) / 8)
        pool = v
    else:
        scores, k = official_text_scores(t), max(1, int(len(t) * 0.2))
        pool = t
    top = np.argsort(scores, kind="stable")[-k:][::-1]
    top = top[scores[top] > 1e-6]
    return pool[top].mean(0) if len(top) else pool.mean(0)


def token_batch(rng, rows, width, images):
    """Left-padded rows of width tokens: template, `images[r]` image tokens, then prompt and response text."""
    types = np.full((rows, width), TokenType.PAD)
    lengths = rng.integers(width - 6, width + 1, rows)
    lengths[0] = width
    for r, (n, n_img) in enumerate(zip(lengths, images)):
        row = [TokenType.TEMPLATE] * 2 + [TokenType.IMAGE] * n_img + [TokenType.PROMPT] * 5
        row += [TokenType.TEMPLATE] * 2 + [TokenType.RESPONSE] * (n - len(row) - 2)
        types[r, width - n:] = row
    return types, (types != TokenType.PAD).astype(np.int32)


def test_kernel_scores_and_selection_match_the_official_scorers():
    rng = np.random.default_rng(1)
    types, mask = token_batch(rng, 3, 40, [17, 9, 0])
    acts = rng.normal(size=(3, 40, 24)) * 3.0 + rng.normal(size=(3, 1, 24))
    visual, text = modality_masks({"token_types": types, "attention_mask": mask})
    np.testing.assert_array_equal(text[2], mask[2].astype(bool))  # no image: every real token is text
    vis = np.asarray(visual_token_scores(jnp.asarray(acts), jnp.asarray(visual), jnp.asarray(text)))
    txt = np.asarray(text_token_scores(jnp.asarray(acts), jnp.asarray(text)))
    for r in range(2):
        np.testing.assert_allclose(vis[r][visual[r]], official_visual_scores(acts[r][visual[r]], acts[r][text[r]]),
                                   atol=2e-5)
    for r in range(3):
        np.testing.assert_allclose(txt[r][text[r]], official_text_scores(acts[r][text[r]]), atol=2e-5)
    real = types != TokenType.PAD
    for modality in ("visual", "text"):
        w = np.asarray(care_weights(jnp.asarray(acts), jnp.asarray(visual), jnp.asarray(text), jnp.asarray(real),
                                    modality=modality))
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
        pooled = np.einsum("btd,bt->bd", acts, w)
        for r in range(3):
            if modality == "visual" and not visual[r].any():
                expected = acts[r][real[r]].mean(0)  # no image: the official code averages the whole row
            else:
                expected = official_vector(acts[r], visual[r], text[r], modality)
            np.testing.assert_allclose(pooled[r], expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = randomize(transformers.LlamaForCausalLM(config), seed=3, scale=0.3)
    model.save_pretrained(path)
    return model, load_pretrained(path)


def test_collect_care_against_hf_activations(tiny):
    """Vectors and covariance of collect_care = the official selection on HF's residual stream (forward hooks)."""
    model, lm = tiny
    rng = np.random.default_rng(6)
    batches = []
    for seed in range(2):
        types, mask = token_batch(rng, 3, 40, [16, 12, 9])  # the shapes of the test above: one compilation
        b = left_padded_batch(np.random.default_rng(seed), 64, [int(n) for n in mask.sum(1)])
        b.pop("position_ids")
        b["token_types"], b["row_valid"] = types, np.array([True, True, seed == 0])
        batches.append(b)
    site = "lm.layers.0.resid"
    got = {m: collect_care(lm, batches, [site], m, vectors=True, progress=False) for m in ("visual", "text")}
    expected = {"visual": [], "text": []}
    for b in batches:
        mask = b["attention_mask"]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor(b["input_ids"]), attention_mask=torch.tensor(mask),
                           position_ids=torch.tensor(np.where(mask == 1, np.cumsum(mask, 1) - 1, 0)),
                           output_hidden_states=True).hidden_states[1].numpy().astype(np.float64)
        visual, text = modality_masks(b)
        for r in np.nonzero(b["row_valid"])[0]:
            for m in expected:
                expected[m].append(official_vector(hidden[r], visual[r], text[r], m))
    for m in ("visual", "text"):
        vectors = got[m].vectors[site]
        assert vectors.shape == (5, 24) and got[m].metadata["examples"] == 5
        assert rel_error(vectors, np.stack(expected[m])) <= 1e-5
        stats = got[m].stats[site]
        assert rel_error(stats.covariance(), np.cov(np.stack(expected[m]).T)) <= 1e-4
    mean_pooled = collect_care(lm, batches, [site], "text", selection="mean", vectors=True, progress=False)
    assert not np.allclose(mean_pooled.vectors[site], got["text"].vectors[site])
    with pytest.raises(InputError, match="unknown modality"):
        collect_care(lm, batches, [site], "audio")
