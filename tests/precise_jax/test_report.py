"""Reports: files, decodable PNGs of the asked size, tables holding the numbers given, atomic and refusing writes."""

import json

import numpy as np
import pytest
from PIL import Image

from ports import InputError
from precise_jax.evaluate import Estimate, UtilityCost
from precise_jax.neurons import NeuronSet
from precise_jax.outputs import OutputDir, to_json
from precise_jax.report import (
    Report, before_after_rows, plot_before_after, plot_neurons_per_layer, plot_overlap, plot_spectrum, utility_rows,
)


@pytest.fixture
def comparison():
    rng = np.random.default_rng(0)
    out = {}
    for name in ("en/text/jbb", "zh/typographic/jbb", "all"):
        before, after = rng.random(2) * [0.5, 0.2] + [0.4, 0.0]
        out[name] = {"before": Estimate(before, before - 0.11, before + 0.07, 40),
                     "after": Estimate(after, max(after - 0.05, 0), after + 0.09, 40),
                     "change": Estimate(after - before, after - before - 0.1, after - before + 0.1, 40)}
    return out


@pytest.fixture
def neuron_sets():
    rng = np.random.default_rng(1)
    return {name: NeuronSet({layer: rng.choice(64, rng.integers(1, 12), replace=False) for layer in range(6)}, 64, 6)
            for name in ("en-text", "zh-text", "en-typographic")}


def test_report_folder(tmp_path, comparison, neuron_sets):
    cost = UtilityCost(Estimate(0.0123, 0.0101, 0.0150, 20), Estimate(8.5, 7.9, 9.2, 20), Estimate(8.9, 8.2, 9.7, 20),
                       Estimate(1.047, 1.02, 1.08, 20), tokens=812)
    report = Report(tmp_path / "run", title="Shield on tiny")
    report.text("Numbers from a made-up run.")
    asr_table = report.table("Attack success rate", *before_after_rows(comparison))
    report.table("Utility cost", *utility_rows(cost))
    report.figure("neurons", plot_neurons_per_layer, neuron_sets["en-text"], size=(5, 3), dpi=80)
    report.figure("overlap", plot_overlap, neuron_sets, size=(4, 4), dpi=50, caption="Jaccard overlap")
    report.figure("asr", plot_before_after, comparison, metric="ASR")
    report.figure("spectrum", plot_spectrum, np.random.default_rng(2).gamma(2, size=30), k=4, size=(3, 2))
    assert not (tmp_path / "run").exists()  # nothing under the final name before write
    results = {"asr": comparison, "utility": cost, "layers": np.arange(3), "nan": float("nan")}
    assert report.write(results) == tmp_path / "run"

    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["asr.png", "neurons.png", "overlap.png", "report.md",
                                                     "results.json", "spectrum.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no work folder left
    for name, size in (("neurons", (400, 240)), ("overlap", (200, 200)), ("asr", (640, 400)), ("spectrum", (300, 200))):
        with Image.open(run / f"{name}.png") as image:
            image.load()
            assert image.format == "PNG" and image.size == size, name
            assert np.asarray(image.convert("L")).std() > 5  # something was drawn
    md = (run / "report.md").read_text()
    assert md.startswith("# Shield on tiny\n") and asr_table in md and "![Jaccard overlap](overlap.png)" in md
    for name, parts in comparison.items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        for part in ("before", "after", "change"):
            e = parts[part]
            assert f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]" in row
    assert "| perplexity ratio (modified / original) | 1.047 [1.020, 1.080] |" in md and "| tokens scored | 812 |" in md
    saved = json.loads((run / "results.json").read_text())
    assert saved["asr"]["all"]["before"]["value"] == comparison["all"]["before"].value
    assert saved["utility"]["tokens"] == 812 and saved["layers"] == [0, 1, 2] and saved["nan"] is None
    assert before_after_rows(saved["asr"]) == before_after_rows(comparison)  # results.json's form renders the same


def test_refuses_to_overwrite(tmp_path, comparison):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("keep me")
    with pytest.raises(InputError, match="run exists and is not empty; choose another output folder or pass overwrite"):
        Report(tmp_path / "run")
    report = Report(tmp_path / "run", overwrite=True)
    report.table("t", ["a"], [[1]])
    report.write({"a": 1})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["report.md", "results.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    Report(tmp_path / "empty").write({})  # an empty existing folder counts as free
    (tmp_path / "late").mkdir()
    late = OutputDir(tmp_path / "late")
    (tmp_path / "late" / "other-run.txt").write_text("written meanwhile")
    with pytest.raises(InputError, match="late exists and is not empty"):
        late.commit({"x": 1})
    late.discard()
    assert [p.name for p in (tmp_path / "late").iterdir()] == ["other-run.txt"]


def test_interrupted_write_leaves_nothing(tmp_path, comparison, monkeypatch):
    def broken(ax, *_):
        ax.plot([1, 2])
        raise RuntimeError("plot failed halfway")

    with pytest.raises(RuntimeError, match="halfway"):
        with Report(tmp_path / "run") as report:
            report.table("ASR", *before_after_rows(comparison))
            report.figure("broken", broken)
    assert list(tmp_path.iterdir()) == []
    report = Report(tmp_path / "run")
    report.table("ASR", *before_after_rows(comparison))

    def killed(*_):
        raise KeyboardInterrupt  # interrupted at the last step, the rename

    monkeypatch.setattr("precise_jax.report.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        report.write({"asr": comparison})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(InputError, match="already committed or discarded"):
        report.write({})
    with pytest.raises(InputError, match="rows \\[1\\] do not have 2 cells"):
        Report(tmp_path / "x").table("t", ["a", "b"], [[1, 2], [3]])
    with pytest.raises(InputError, match="at least two neuron sets"):
        plot_overlap(None, {})
    assert to_json({1: (np.float32(0.5), np.int64(2)), "dtype": np.dtype("float32")}) == {"1": [0.5, 2],
                                                                                           "dtype": "float32"}
