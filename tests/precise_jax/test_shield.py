"""The Precise Shield pipeline end to end (locate -> causal check -> align -> evaluate) on a tiny random Llama with
SmolLM2's real tokenizer and real prompt sets: the mechanics, the bookkeeping, and bad input."""

import dataclasses
import json

import numpy as np
import pytest

from ports import InputError, load_pretrained
from precise_jax.data import split_examples
from precise_jax.shield import PipelineConfig, run_pipeline, within_length

SMALL = PipelineConfig(locate_examples=6, train_examples=4, eval_examples=5, max_tokens=96, ratio=0.1,
                       random_seeds=2, epochs=1, learning_rate=1e-2, baselines=("random",), max_new_tokens=4,
                       batch_size=4)


@pytest.fixture(scope="module")
def lm(tiny_chat_llama):
    return load_pretrained(tiny_chat_llama)


@pytest.fixture(scope="module")
def sets(prompt_sets):
    return prompt_sets["jbb"] + prompt_sets["harmbench"], prompt_sets["alpaca-eval"]


@pytest.fixture(scope="module")
def run(lm, sets):
    return run_pipeline(lm, *sets, SMALL, progress=False)


def test_held_out_prompts_are_never_fitted(lm, sets, run):
    for label, examples in zip(("harmful", "benign"), sets):
        fit, held_out = split_examples(examples, SMALL.held_out, seed=SMALL.seed)
        expected = [f"{e.id}:en:text" for e in within_length(held_out, lm, SMALL.max_tokens)[: SMALL.eval_examples]]
        for model in ("original", "aligned", "random neurons"):
            assert [r["id"] for r in run["responses"][model][label]] == expected
        assert not {e.id for e in fit} & {e.id for e in held_out}
    assert run["data"]["harmful_held_out"] == run["data"]["benign_held_out"] == SMALL.eval_examples


def test_rates_and_intervals_come_from_the_responses(sets, run):
    source_of = {e.id: e.source for e in sets[0] + sets[1]}
    for name, evaluation in run["evaluation"].items():
        for label in ("harmful", "benign"):
            responses = run["responses"][name][label]
            refused = np.array([r["refused"] for r in responses])
            rates = evaluation[f"{label}_refusal"]
            assert rates["all"]["value"] == pytest.approx(refused.mean()) and rates["all"]["n"] == refused.size
            assert rates["all"]["low"] <= rates["all"]["value"] <= rates["all"]["high"]
            sources = [source_of[r["id"].rsplit(":", 2)[0]] for r in responses]
            for source in set(sources):
                rows = np.array(sources) == source
                assert rates[f"en/text/{source}"]["value"] == pytest.approx(refused[rows].mean())
        assert evaluation["attack_success"]["all"]["value"] == pytest.approx(1 - evaluation["harmful_refusal"]["all"]
                                                                             ["value"])
        if name != "original":
            utility = evaluation["utility"]
            assert utility["next_token_kl"]["value"] > 0 and utility["perplexity"]["value"] > 1
            change = evaluation["harmful_refusal_change"]["all"]["value"]
            assert change == pytest.approx(evaluation["harmful_refusal"]["all"]["value"]
                                           - run["evaluation"]["original"]["harmful_refusal"]["all"]["value"])


def test_training_and_neuron_bookkeeping(lm, run):
    neurons = run["neurons"]
    assert neurons["count"] == sum(neurons["per_layer"]) > 0
    d = lm.config.hidden_size
    for name in ("aligned", "random neurons"):  # lean mode: gate and up rows and down columns of each neuron
        training = run["training"][name]
        assert training["neurons"] == neurons["count"] and training["trainable"] == 3 * d * neurons["count"]
        assert training["steps"] == -(-run["data"]["training_pairs"] // SMALL.batch_size)
    check = run["causal_check"]
    assert len(check["random"]) == SMALL.random_seeds and check["neurons"] == neurons["count"]
    assert check["refusal_drop"] == pytest.approx(check["unedited"]["refusal_rate"]
                                                  - check["safety_neurons"]["refusal_rate"])
    json.dumps({k: v for k, v in run.items() if not k.startswith("_")})  # plain data throughout
    assert set(run["_models"]) == {"original", "aligned", "random neurons"}


def test_bad_input(lm, sets):
    harmful, benign = sets
    with pytest.raises(InputError, match="benign prompt set is empty"):
        run_pipeline(lm, harmful, [], SMALL, progress=False)
    with pytest.raises(InputError, match="unknown baselines"):
        run_pipeline(lm, harmful, benign, dataclasses.replace(SMALL, baselines=("lora-ish",)), progress=False)
    with pytest.raises(InputError, match="translation"):
        run_pipeline(lm, harmful, benign, dataclasses.replace(SMALL, languages=("en", "de")), progress=False)
    with pytest.raises(InputError, match="max-tokens"):
        run_pipeline(lm, harmful, benign, dataclasses.replace(SMALL, max_tokens=8), progress=False)
