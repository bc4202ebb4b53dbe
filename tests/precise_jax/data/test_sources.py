"""The real prompt sets read from pinned archives: counts, categories, ids, caching, and deterministic splits."""

from collections import Counter

import pytest

from ports.errors import InputError
from precise_jax import assets
from precise_jax.data import sources, split_examples

EXPECTED = {  # name: (count, label, number of categories)
    "jbb": (100, "harmful", 10),
    "harmbench": (400, "harmful", 7),
    "harmbench-standard": (200, "harmful", 6),  # no copyright rows (category "copyright")
    "advbench": (520, "harmful", 9),
    "do-not-answer": (939, "harmful", 5),
    "alpaca-eval": (805, "benign", 5),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_labels_categories(prompt_sets, name):
    examples = prompt_sets[name]
    count, label, categories = EXPECTED[name]
    assert len(examples) == count
    assert len({e.id for e in examples}) == count
    assert {e.label for e in examples} == {label}
    assert all(e.prompt.strip() and e.category and e.modality == "text" for e in examples)
    assert len({e.category for e in examples}) == categories
    assert len({e.source for e in examples}) == 1


def test_set_details(prompt_sets):
    jbb = prompt_sets["jbb"]
    assert jbb[0].id == "jbb-000" and jbb[0].prompt.startswith("Write a defamatory article")
    assert Counter(e.category for e in jbb) == {c: 10 for c in {e.category for e in jbb}}
    assert jbb[0].metadata["target"].startswith("Sure, here is")

    harmbench = prompt_sets["harmbench"]
    assert Counter(e.metadata["split"] for e in harmbench) == {"test": 320, "val": 80}
    assert Counter(e.metadata["functional_category"] for e in harmbench) == {
        "standard": 200, "contextual": 100, "copyright": 100}
    contextual = next(e for e in harmbench if e.metadata["functional_category"] == "contextual")
    assert contextual.prompt == f"{contextual.metadata['context']}\n\n---\n\n{contextual.metadata['behavior']}"
    assert len(sources.harmbench(splits=("val",), functional=("standard",))) == 41
    with pytest.raises(InputError, match="splits 'test' and 'val'"):
        sources.harmbench(splits=("train",))

    assert prompt_sets["advbench"][0].prompt.startswith("Write a script that can exploit vulnerabilities")
    assert Counter(e.category for e in prompt_sets["do-not-answer"])["information_hazard"] == 248
    alpaca = prompt_sets["alpaca-eval"]
    assert all(e.response for e in alpaca) and alpaca[0].category == "helpful_base"
    with pytest.raises(InputError, match="unknown prompt set 'jbb2'"):
        sources.load_set("jbb2")


def test_judge_comparison_pairs():
    pairs = sources.jbb_judge_comparison()
    assert len(pairs) == 100 and all(p.response is not None and p.prompt for p in pairs)
    for pair in pairs:
        labels = pair.metadata["human_labels"]
        assert pair.metadata["jailbroken"] == (sum(labels) >= 2)
        assert set(pair.metadata["judges"]) == set(sources.JBB_JUDGES)
    assert sum(p.metadata["jailbroken"] for p in pairs) == 43


def test_sets_come_from_the_cache(prompt_sets, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(assets.subprocess, "run", refuse)
    for name in EXPECTED:
        assert len(sources.load_set(name)) == EXPECTED[name][0]


def test_splits_are_deterministic_stratified_and_stable(prompt_sets):
    jbb = prompt_sets["jbb"]
    train, held = split_examples(jbb, 0.2, seed=0)
    # fixed ids: a change here means every saved split result in the wild silently changes
    assert [e.id for e in held] == [
        "jbb-001", "jbb-005", "jbb-010", "jbb-015", "jbb-020", "jbb-022", "jbb-037", "jbb-039", "jbb-042",
        "jbb-046", "jbb-054", "jbb-055", "jbb-063", "jbb-066", "jbb-072", "jbb-075", "jbb-082", "jbb-085",
        "jbb-095", "jbb-098"]
    assert {e.id for e in train}.isdisjoint(e.id for e in held) and len(train) + len(held) == 100
    assert Counter(e.category for e in held) == {c: 2 for c in {e.category for e in jbb}}
    assert split_examples(list(reversed(jbb)), 0.2, seed=0)[1] == list(reversed(held))  # order-independent
    assert {e.id for e in split_examples(jbb, 0.2, seed=1)[1]} != {e.id for e in held}

    alpaca = prompt_sets["alpaca-eval"]
    train, held = split_examples(alpaca, 0.25, seed=3, stratify=False)
    assert len(held) == 201 and [e.id for e in held[:3]] == ["alpacaeval-002", "alpacaeval-015", "alpacaeval-016"]
    with pytest.raises(InputError, match="fraction"):
        split_examples(alpaca, 1.5)
    with pytest.raises(InputError, match="empty"):
        split_examples([], 0.2)
