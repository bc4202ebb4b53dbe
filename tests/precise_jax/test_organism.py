"""The model-organism builder end to end on a tiny random Llama (real prompt sets, real tokenizer), the
validation rule of train.Validation, and the claims run's splits and controls."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from ports import InputError, load_pretrained
from precise_jax.claims import ClaimsConfig, overlap_against_random, run_claims, split_by_item
from precise_jax.data import Example, sources, split_examples
from precise_jax.organism import OrganismConfig, organism_data, organism_folder, read_record
from precise_jax.report import Report, claims_report
from precise_jax.train import TrainConfig, Validation, train

TINY = OrganismConfig(train_harmful=8, train_benign=8, validation=4, steps=4, validate_every=2, batch_size=4,
                      validation_tokens=4, max_tokens=128)


def test_organism_built_cached_and_recorded(tiny_chat_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("PRECISE_JAX_CACHE", str(tmp_path))
    folder = organism_folder(TINY, tiny_chat_llama, progress=False)
    assert folder.parent == tmp_path / "models" and TINY.digest() in folder.name
    record = read_record(folder)
    assert record["config"] == json.loads(json.dumps(TINY.__dict__)) and record["digest"] == TINY.digest()
    steps = [c["step"] for c in record["checks"]]
    assert steps[0] == 2 and steps == sorted(steps) and record["chosen_step"] in steps
    chosen = record["chosen"]
    met = chosen["harmful_refusal"] >= TINY.min_refusal and chosen["benign_refusal"] <= TINY.max_over_refusal
    assert record["met_targets"] == met
    if not met:  # the rule: the best margin, the earliest among equals
        margins = [c["harmful_refusal"] - c["benign_refusal"] for c in record["checks"]]
        assert record["chosen_step"] == steps[int(np.argmax(margins))]
    # nothing held out by the pipeline's split was trained on or validated on
    lm = load_pretrained(tiny_chat_llama, dtype=jnp.float32)
    held = set()
    for names in (TINY.harmful, TINY.benign):  # the pipeline's split of the plain sets, the claims' of MultiJail
        held |= {e.id for e in split_examples([x for n in names if n != "multijail" for x in sources.load_set(n)],
                                              TINY.held_out, seed=TINY.split_seed)[1]}
    held |= {e.id for e in split_by_item(sources.load_set("multijail"), TINY.held_out, TINY.split_seed)[1]}
    assert "multijail" in TINY.harmful
    used = set(record["data"]["train"]) | set(record["data"]["validation_harmful"]) | set(
        record["data"]["validation_benign"])
    assert used and not used & held
    assert len(record["data"]["train"]) == 16
    organism = load_pretrained(folder, dtype=jnp.float32)
    assert organism.processor is not None
    assert not np.allclose(organism.params["lm"]["layers_0"]["mlp"]["down_proj"]["kernel"],
                           lm.params["lm"]["layers_0"]["mlp"]["down_proj"]["kernel"])
    modified = (folder / "organism.json").stat().st_mtime_ns
    assert organism_folder(TINY, tiny_chat_llama, progress=False) == folder  # cached: not rebuilt
    assert (folder / "organism.json").stat().st_mtime_ns == modified
    data = organism_data(lm, TINY)
    assert {e.label for e in data["train"]} == {"harmful", "benign"}


def test_organism_errors(tiny_chat_llama, tmp_path):
    lm = load_pretrained(tiny_chat_llama, dtype=jnp.float32)
    with pytest.raises(InputError, match="not a model organism folder"):
        read_record(tmp_path)
    with pytest.raises(InputError, match="needs 4 for validation"):
        organism_data(lm, OrganismConfig(train_harmful=10_000, validation=4))


def test_validation_rule_stops_at_the_first_check_meeting_both_targets(tiny_chat_llama):
    lm = load_pretrained(tiny_chat_llama, dtype=jnp.float32)
    pairs = [("Say hi.", "Hi!"), ("Say bye.", "Bye!")] * 4
    script = iter([{"harmful_refusal": 0.5, "benign_refusal": 0.0}, {"harmful_refusal": 0.95, "benign_refusal": 0.2},
                   {"harmful_refusal": 0.92, "benign_refusal": 0.05}, {"harmful_refusal": 1.0, "benign_refusal": 0.0}])
    result = train(lm, pairs, None, TrainConfig(mode="full", steps=10, batch_size=2, learning_rate=1e-3),
                   validation=Validation(lambda model: next(script), every=2), progress=False)
    assert [c["step"] for c in result.checks] == [2, 4, 6] and result.chosen_step == 6 and len(result.losses) == 6
    script = iter([{"harmful_refusal": 0.5, "benign_refusal": 0.0}, {"harmful_refusal": 0.7, "benign_refusal": 0.1},
                   {"harmful_refusal": 0.8, "benign_refusal": 0.3}])
    result = train(lm, pairs, None, TrainConfig(mode="full", steps=5, batch_size=2, learning_rate=1e-3),
                   validation=Validation(lambda model: next(script), every=2), progress=False)
    assert [c["step"] for c in result.checks] == [2, 4, 5] and result.chosen_step == 4  # best margin 0.6
    with pytest.raises(InputError, match="at least 1 step"):
        Validation(lambda model: {}, every=0)


def test_split_by_item_keeps_every_language_of_an_item_together():
    examples = [e for e in sources.load_set("multijail") if e.language in ("en", "it", "zh")]
    fit, held = split_by_item(examples, 0.3, seed=0)
    fit_items, held_items = {e.metadata["item"] for e in fit}, {e.metadata["item"] for e in held}
    assert not fit_items & held_items and len(held_items) == pytest.approx(0.3 * 315, abs=8)
    assert len(fit) + len(held) == len(examples) == 3 * 315
    with pytest.raises(InputError, match="no metadata 'item'"):
        split_by_item([Example(id="x", prompt="p", label="harmful")], 0.3, 0)


def test_overlap_against_random_sets_of_the_same_sizes():
    from precise_jax.neurons import NeuronSet

    rng = np.random.default_rng()
    shared = rng.choice(100, 20, replace=False)
    sets = {name: NeuronSet({0: np.sort(np.union1d(shared[:15], rng.choice(100, 5, replace=False))),
                             3: np.sort(rng.choice(100, 10, replace=False))}, 100, 4) for name in ("en", "it")}
    out = overlap_against_random(sets, seeds=20)
    pair = out["pairs"]["en-it"]
    a, b = sets["en"].pairs(), sets["it"].pairs()
    assert pair["observed"] == pytest.approx(len(set(a) & set(b)) / len(set(a) | set(b)))
    # random sets of ~20 and 10 of 100 units per layer overlap by ~0.07; these share 15 units in layer 0
    assert pair["random_mean"] < 0.15 < pair["observed"]


def test_claims_end_to_end_on_a_tiny_model(tiny_chat_llama, tmp_path):
    lm = load_pretrained(tiny_chat_llama, dtype=jnp.float32)
    config = ClaimsConfig(languages=("en", "it"), train_languages=("en",), locate_examples=6, eval_examples=4,
                          ratio=0.1, random_seeds=2, max_new_tokens=4, direction_layers=(0, 1), direction_validation=3,
                          train_examples=4, train_steps=2, care_k=2, care_alphas=(4.0, 1.0), batch_size=4)
    results = run_claims(lm, config, progress=False)
    readability = results["readability"]
    assert set(readability) >= {"en", "it"} and readability["en"]["ratio"] == 1 and readability["en"]["readable"]
    assert all(v["nats"] > 0 for v in readability.values())
    assert set(results["behaviour"]["harmful"]) == {"en", "it"}
    assert results["direction"]["layer"] in (0, 1)
    assert set(results["overlap"]["pairs"]) == {"en-it"}
    for kind in ("zero", "amplify"):
        check = results["causal"][kind]
        assert len(check["random"]) == 2 and check["examples"] == 4
    transfer = results["transfer"]
    assert set(transfer["models"]) == {"neurons", "random neurons", "lora", "full"}
    assert transfer["held_out_languages"] == ["it"]
    assert transfer["models"]["neurons"]["trainable"] < transfer["models"]["full"]["trainable"]
    assert list(results["care"]["runs"]) == ["no projection", "projection α=4", "projection α=1"]
    assert all(isinstance(run["harmful"]["example"], str) for run in results["care"]["runs"].values())
    assert set(results["verdicts"]) >= {"refusal direction", "safety neurons are causal (zeroing)",
                                        "CARE projection restores refusal under jailbreaks"}
    results.pop("_located")
    with Report(tmp_path / "claims", title="claims") as report:  # the demo's report renders every section
        claims_report(report, results)
        final = report.write(results)
    text = (final / "report.md").read_text()
    for section in ("## Verdicts", "## Behaviour per language", "## Over-refusal", "## Refusal direction",
                    "## Causal check: zero", "## Causal check: amplify", "## Safety neurons shared", "## CARE",
                    "## Transfer", "projection α=1"):
        assert section in text, section
    with pytest.raises(InputError, match="proper subset"):
        ClaimsConfig(languages=("en",), train_languages=("en",))
