"""The CARE pipeline and its `precise-jax care` commands on a tiny random Llama with SmolLM2's real tokenizer."""

import json

import numpy as np
import pytest

from ports import InputError, load_pretrained
from precise_jax.care import COMPLIANT, by_layer, continuations, diagnose, evaluate_projection, fit
from precise_jax.cli import main
from precise_jax.data import Example
from precise_jax.evaluate import refusal_keyword_judge
from precise_jax.shield import REFUSALS
from precise_jax.subspace import load_subspaces

COMMON = ["--limit", "8", "--batch-size", "4", "--max-tokens", "96"]


@pytest.fixture(scope="module")
def runs(tiny_chat_llama, tmp_path_factory):
    """diagnose -> fit -> generate through the command line, into three folders."""
    root = tmp_path_factory.mktemp("care")
    model = ["--model", str(tiny_chat_llama)]
    assert main(["care", "diagnose", *model, *COMMON, "--components", "mlp", "--window", "1",
                 "--attribution-layer", "1", "--attribution-pairs", "2", "--out", str(root / "diagnose")]) == 0
    assert main(["care", "fit", *model, *COMMON, "--diagnosis", str(root / "diagnose" / "result.json"), "--k", "2",
                 "--out", str(root / "fit")]) == 0
    assert main(["care", "generate", *model, *COMMON, "--subspaces", str(root / "fit" / "subspaces.safetensors"),
                 "--alpha", "0", "3", "--max-new-tokens", "4", "--out", str(root / "generate")]) == 0
    return root, {step: json.loads((root / step / "result.json").read_text())
                  for step in ("diagnose", "fit", "generate")}


def test_diagnosis_chooses_the_layer_with_the_largest_effect(runs):
    _, results = runs
    d = results["diagnose"]
    assert set(d["patching"]) == {"resid", "mlp.out", "attn.out"} and all(len(v) == 2 for v in d["patching"].values())
    assert len(d["skip"]["mlp"]) == 1  # 2 layers skipped as a pair: one configuration
    effects = np.abs(d["patching"]["mlp.out"])
    assert d["layers"] == [int(np.argmax(effects))] and effects.max() > 0
    agreement = d["attribution"]
    assert agreement["site"] == "lm.layers.1.mlp.act" and agreement["neurons"] == 48
    assert -1 <= agreement["spearman"] <= 1 and agreement["pairs"] == 2
    assert d["examples"] == {"harmful": 8, "benign": 8, "patching_pairs": 8}


def test_fit_saves_subspaces_with_provenance(runs, tiny_chat_llama):
    root, results = runs
    subspaces, metadata = load_subspaces(root / "fit" / "subspaces.safetensors")
    layer = results["diagnose"]["layers"][0]
    assert list(subspaces) == [f"text/lm.layers.{layer}.resid"]  # no vision tower: text only
    s = subspaces[f"text/lm.layers.{layer}.resid"]
    assert s.basis.shape == (32, 2) and s.provenance["model"] == str(tiny_chat_llama)
    np.testing.assert_allclose(s.basis.T @ s.basis, np.eye(2), atol=1e-5)  # orthonormal mode
    assert s.provenance["malicious_examples"] == s.provenance["benign_examples"] == 8
    assert metadata["layers"] == [layer] and metadata["diagnosis"].endswith("diagnose/result.json")


def test_generate_reports_held_out_refusal_before_and_after(runs):
    _, results = runs
    g = results["generate"]
    assert not set(g["harmful_prompts"]) & set(results["fit"]["harmful_train_ids"])  # held out from fitting
    assert len(g["harmful_prompts"]) == len(g["benign_prompts"]) == 8
    for run in [g["baseline"], *g["projected"]]:
        for part in ("harmful", "benign"):
            flags = refusal_keyword_judge(run[part]["responses"])
            assert run[part]["refused"] == flags.tolist() and run[part]["refusal_rate"] == flags.mean()
    zero, strong = g["projected"]
    assert zero["alpha"] == 0 and zero["harmful"]["responses"] == g["baseline"]["harmful"]["responses"]
    assert zero["harmful"]["refusal_logit"] == pytest.approx(g["baseline"]["harmful"]["refusal_logit"], abs=1e-5)
    assert abs(strong["harmful"]["refusal_logit"] - g["baseline"]["harmful"]["refusal_logit"]) > 1e-3
    assert [row["alpha"] for row in g["summary"]] == [0.0, 0.0, 3.0] and g["apply_at"] == "resid"


def test_command_errors_leave_nothing(runs, tmp_path, smollm2_dir, capsys):
    root, _ = runs
    out = tmp_path / "generate"
    code = main(["care", "generate", "--model", str(smollm2_dir), *COMMON, "--subspaces",
                 str(root / "fit" / "subspaces.safetensors"), "--out", str(out)])
    assert code == 2 and "fit subspaces on this model first" in capsys.readouterr().err
    code = main(["care", "fit", "--model", str(smollm2_dir), *COMMON, "--out", str(tmp_path / "fit")])
    assert code == 2 and "--diagnosis" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_continuations_pair_each_prompt_with_a_compliant_and_a_refusing_reply(prompt_sets):
    jbb, harmbench = prompt_sets["jbb"][:3], prompt_sets["harmbench"][:3]
    compliant, refusing = continuations(jbb + harmbench)
    assert [c.prompt for c in compliant] == [r.prompt for r in refusing] == [e.prompt for e in jbb + harmbench]
    assert [c.response for c in compliant[:3]] == [e.metadata["target"] for e in jbb]  # JBB's "Sure, here is ..."
    assert all(c.response in COMPLIANT for c in compliant[3:])
    assert all(r.response in REFUSALS["en"] for r in refusing)
    assert refusal_keyword_judge([r.response for r in refusing]).all()
    assert not refusal_keyword_judge([c.response for c in compliant]).any()


def test_bad_input(tiny_chat_llama, prompt_sets):
    lm = load_pretrained(tiny_chat_llama)
    harmful, benign = prompt_sets["jbb"][:4], prompt_sets["alpaca-eval"][:4]
    with pytest.raises(InputError, match="window"):
        diagnose(lm, harmful, benign, window=3)
    with pytest.raises(InputError, match="choose_by"):
        diagnose(lm, harmful, benign, components=(), window=1, choose_by="skip-mlp")
    with pytest.raises(InputError, match="at least 2"):
        fit(lm, harmful[:1], [0])
    with pytest.raises(InputError, match="within the model's 2 layers"):
        fit(lm, harmful, [2])
    with pytest.raises(InputError, match="no subspaces"):
        evaluate_projection(lm, {}, harmful, benign)
    with pytest.raises(InputError, match="exceeds the rank"):
        fit(lm, harmful, [0], k=4)  # 4 examples: rank <= 3
    subspaces = fit(lm, harmful, [1, 0], k=2)
    assert sorted(by_layer(subspaces)) == [0, 1]
    with pytest.raises(InputError, match="unknown fusion"):
        evaluate_projection(lm, subspaces, harmful, benign, fusion="mean")


def test_visual_subspace_on_a_tiny_llava(tmp_path_factory):
    """A model with a vision tower also gets the visual subspace: harmful prompts rendered as typographic images vs
    benign prompts with real photos, at the same layers."""
    from tests.ports.test_llava import build

    llava = build("llava-1.5", 5, tmp_path_factory).lm  # a 300-piece vocabulary and a 256-token context: short prompts
    harmful = [Example(id=f"h{i}", prompt=p, label="harmful") for i, p in enumerate(
        ["Pick a lock.", "Make a fake ID.", "Steal a car.", "Hack an email."])]
    benign = [Example(id=f"b{i}", prompt=p, label="benign", response="Sure.") for i, p in enumerate(
        ["Name a fruit.", "Say hello.", "Count to three.", "Name a colour."])]
    subspaces = fit(llava, harmful, [1], benign=benign, k=2, batch_size=4)  # visual=None: the tower decides
    assert sorted(subspaces) == ["text/lm.layers.1.resid", "visual/lm.layers.1.resid"]
    text, visual = subspaces["text/lm.layers.1.resid"], subspaces["visual/lm.layers.1.resid"]
    assert visual.modality == "visual" and visual.basis.shape == (64, 2)
    np.testing.assert_allclose(visual.basis.T @ visual.basis, np.eye(2), atol=1e-5)
    assert visual.provenance["malicious"] == "harmful prompt as a typographic image"
    assert visual.provenance["malicious_examples"] == visual.provenance["benign_examples"] == 4
    assert visual.provenance["malicious_data"] != text.provenance["malicious_data"]
    overlap = np.linalg.svd(visual.basis.T @ text.basis, compute_uv=False)
    assert overlap.max() < 0.999  # another contrast, another subspace
    with pytest.raises(InputError, match="visual subspace needs benign prompts"):
        fit(llava, harmful, [1], benign=benign[:1], k=2, visual=True)
