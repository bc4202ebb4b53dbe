"""Weight engine: strict loading, clear errors on bad checkpoints, and HF -> port -> HF round trips."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from ports import CheckpointError, UnsupportedArchitectureError, load_pretrained, save_pretrained
from ports.weights import CONV, LINEAR, Rule
from tests.parity import left_padded_batch, randomize, rel_error

CONFIG = dict(vocab_size=89, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    torch.manual_seed(0)
    model = randomize(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**CONFIG)), seed=3)
    model.save_pretrained(path)
    return path


def copy_of(hf_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(hf_dir, dst)
    return dst


def test_rules_read_both_ways():
    rule = Rule("model.layers.{i}.mlp.down_proj.weight", "lm/layers_{i}/mlp/down_proj/kernel", LINEAR)
    assert rule.match_hf("model.layers.17.mlp.down_proj.weight") == "lm/layers_17/mlp/down_proj/kernel"
    assert rule.match_port("lm/layers_17/mlp/down_proj/kernel") == "model.layers.17.mlp.down_proj.weight"
    assert rule.match_hf("model.layers.x.mlp.down_proj.weight") is None
    assert rule.match_hf("model.layers.1.mlp.down_proj.weight.extra") is None
    conv = np.random.default_rng(0).normal(size=(8, 3, 5, 4))  # torch (O, I, kh, kw)
    assert CONV.to_port(conv).shape == (5, 4, 3, 8)
    np.testing.assert_array_equal(CONV.to_hf(CONV.to_port(conv)), conv)


def test_round_trip_through_transformers(hf_dir, tmp_path):
    lm = load_pretrained(hf_dir)
    out = save_pretrained(lm, tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    for key, value in original.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)
    batch = left_padded_batch(np.random.default_rng(1), CONFIG["vocab_size"], [9, 5])
    with torch.no_grad():
        a = original(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
        b = reloaded(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
    np.testing.assert_array_equal(a, b)
    ours = np.asarray(load_pretrained(out).model.apply({"params": lm.params}, **batch).logits)
    valid = batch["attention_mask"].astype(bool)
    assert rel_error(ours[valid], a[valid]) <= 1e-5


def test_sharded_export_loads_in_both(hf_dir, tmp_path):
    from ports.pretrained import family_for
    from ports.weights import export_tensors, write_safetensors

    lm = load_pretrained(hf_dir)
    folder = tmp_path / "sharded"
    folder.mkdir()
    rules = family_for(lm.hf_config, "test").weight_rules(lm.config)
    write_safetensors(export_tensors(jax.device_get(lm.params), rules), folder, max_shard_bytes=20_000)
    shutil.copy(hf_dir / "config.json", folder)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2
    reloaded = load_pretrained(folder)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), lm.params,
                                                         reloaded.params))
    transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_save_refuses_existing_folder_and_leaves_it_alone(hf_dir, tmp_path):
    lm = load_pretrained(hf_dir)
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        save_pretrained(lm, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    save_pretrained(lm, target, overwrite=True)
    assert (target / "model.safetensors").exists() and not (target / "notes.txt").exists()


def test_failed_export_leaves_nothing(hf_dir, tmp_path):
    lm = load_pretrained(hf_dir)
    lm.params = {**lm.params, "stray": {"kernel": np.ones((2, 2), np.float32)}}
    with pytest.raises(CheckpointError, match="stray/kernel has no rule"):
        save_pretrained(lm, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def rewrite_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(hf_dir, tmp_path):
    folder = copy_of(hf_dir, tmp_path)
    rewrite_tensors(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(1\):\n\s+lm/layers_1/mlp/up_proj/kernel"):
        load_pretrained(folder)


def test_unexpected_tensor(hf_dir, tmp_path):
    folder = copy_of(hf_dir, tmp_path)
    extra = np.random.default_rng(0).normal(size=(3,)).astype(np.float32)
    rewrite_tensors(folder, lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", extra))
    with pytest.raises(CheckpointError, match=r"unexpected in the checkpoint \(1\):\n\s+model.layers.0.mlp.extra"):
        load_pretrained(folder)


def test_misshaped_tensor(hf_dir, tmp_path):
    folder = copy_of(hf_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(CheckpointError, match=r"mis-shaped \(6\):\n\s+model.layers.0.mlp.down_proj.weight: "
                                              r"checkpoint \(48, 32\) .* vs model \(40, 32\)"):
        load_pretrained(folder)


def test_unknown_model_type(hf_dir, tmp_path):
    folder = copy_of(hf_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "rwkv"}))
    with pytest.raises(UnsupportedArchitectureError, match="'rwkv' has no port; supported: .*llama.*qwen2"):
        load_pretrained(folder)


def test_remote_code_is_refused(hf_dir, tmp_path):
    folder = copy_of(hf_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="trust_remote_code"):
        load_pretrained(folder)


def test_pickle_only_folder(hf_dir, tmp_path):
    folder = copy_of(hf_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(CheckpointError, match="only pickle checkpoints .*pytorch_model.bin.*safe_serialization"):
        load_pretrained(folder)


@pytest.mark.parametrize("keep_bytes", [0, 100, -1000])
def test_empty_or_truncated_safetensors(hf_dir, tmp_path, keep_bytes):
    folder = copy_of(hf_dir, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:keep_bytes] if keep_bytes else b"")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(folder)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)
