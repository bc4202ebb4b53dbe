"""The `precise-jax` command on the real SmolLM2 with a few real prompts."""

import json

import pytest

from precise_jax.cli import main
from precise_jax.neurons import NeuronSet


def test_locate_writes_a_complete_folder_and_refuses_to_overwrite(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "locate"
    args = ["locate", "--model", str(smollm2_dir), "--limit", "8", "--ratio", "0.01", "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "result.json").read_text())
    neurons = NeuronSet.load(out / "neurons.json")
    assert result["neurons"] == len(neurons) > 0 and result["per_layer"] == neurons.per_layer()
    assert neurons.metadata["harmful_examples"] == neurons.metadata["benign_examples"] == 8
    assert 0 < result["parameter_fraction"] < 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locate"]  # no partial folders left behind

    before = sorted(p.name for p in out.iterdir())
    assert main(args) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_failed_command_leaves_nothing(smollm2_dir, tmp_path, capsys):
    wrong = NeuronSet({0: [1, 2]}, 99, 3, {"model": "another-model"})
    wrong.save(tmp_path / "wrong")
    out = tmp_path / "ablate"
    code = main(["ablate", "--model", str(smollm2_dir), "--neurons", str(tmp_path / "wrong.json"), "--limit", "4",
                 "--out", str(out)])
    assert code == 2
    assert "Locate neurons on this model first" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ablate")]


def test_every_command_has_help_with_examples_and_defaults_equal_the_configs(capsys):
    import argparse

    from precise_jax.claims import ClaimsConfig
    from precise_jax.cli import build_parser, config_from
    from precise_jax.organism import OrganismConfig
    from precise_jax.shield import PipelineConfig

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    paths = [[name] for name in commands if name != "care"] + [["care", s] for s in ("diagnose", "fit", "generate")]
    for path in paths:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([*path, "--help"])
        assert exit_.value.code == 0
        assert "example" in capsys.readouterr().out, path
    assert config_from(parser.parse_args(["demo"]), ClaimsConfig) == ClaimsConfig()
    assert config_from(parser.parse_args(["shield"]), PipelineConfig) == PipelineConfig()
    changed = config_from(parser.parse_args(["demo", "--languages", "en", "it", "vi", "--ratio", "0.02"]), ClaimsConfig)
    assert changed.languages == ("en", "it", "vi") and changed.ratio == 0.02
    assert config_from(parser.parse_args(["organism"]), OrganismConfig) == OrganismConfig()
    older = config_from(parser.parse_args(["organism", "--harmful", "advbench", "jbb", "--learning-rate", "5e-5"]),
                        OrganismConfig)
    assert older.harmful == ("advbench", "jbb") and older.learning_rate == 5e-5 and older.digest() != \
        OrganismConfig().digest()
    with pytest.raises(SystemExit):  # the step commands name their output folder
        parser.parse_args(["locate"])


def test_a_multilingual_benchmark_gives_languages_as_conditions():
    """`--harmful multijail --languages en it vi`: one example per item, each language its human translation."""
    from precise_jax.cli import languages_as_conditions
    from precise_jax.data import Example, build_conditions, sources

    multijail = sources.load_set("multijail")
    plain = [Example(id="own-1", prompt="Describe a lock.", label="harmful")]
    examples, translations = languages_as_conditions(multijail + plain, {("own-1", "it"): {"prompt": "Descrivi."},
                                                                          ("own-1", "vi"): {"prompt": "Mô tả."}})
    assert len(examples) == 315 + 1 and {e.language for e in examples} == {"en"}
    grid = build_conditions(examples, ("en", "it", "vi"), translations=translations)
    by_id = {e.id: e for e in multijail}
    for condition, cell in grid.items():
        for example in [e for e in cell if e.metadata["base_id"] != "own-1"]:
            assert example.prompt == by_id[f"{example.metadata['base_id']}-{condition.language}"].prompt
    assert [next(e.prompt for e in c if e.metadata["base_id"] == "own-1") for c in grid.values()] == [
        "Describe a lock.", "Descrivi.", "Mô tả."]
    assert languages_as_conditions(plain, None) == (plain, None)


def test_a_plan_that_cannot_fit_is_refused_before_loading(tmp_path, capsys):
    """LLaVA-1.5-7B's config.json alone (no weights): the plan is printed and refused before anything is read."""
    from ports.presets import load_preset

    folder = tmp_path / "llava-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(load_preset("llava-1.5-7b-hf")))
    out = tmp_path / "locate"
    assert main(["locate", "--model", str(folder), "--device-memory", "8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "memory plan:" in err and "does NOT fit" in err and "Nothing was loaded" in err
    assert "--dtype bfloat16" in err and "a larger mesh" in err
    assert not out.exists()
    # In bfloat16 on 16 GiB it fits, and only then does loading find the weights missing.
    assert main(["locate", "--model", str(folder), "--dtype", "bfloat16", "--device-memory", "16",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "  fits" in err and "does not fit" not in err and "safetensors" in err.lower()
