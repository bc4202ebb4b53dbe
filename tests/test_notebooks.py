"""The worked examples in notebooks/ run end to end (nbclient, small parameters) and compute what they claim.

Each notebook has a cell tagged "parameters" (papermill's convention); a cell injected after it overrides them with
small values, and a cell appended at the end reports the variables the assertions read, as JSON.
"""

import json
import os
from pathlib import Path

import nbclient  # nbformat, nbclient and ipykernel come with the `test` extra
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
MARK = "__notebook_result__"


def run_notebook(name: str, parameters: dict, report: list[str], timeout: int = 300) -> dict:
    """Execute notebooks/<name>.ipynb with `parameters` injected; return {variable: value} for `report`."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters', found {len(tagged)}"
    unknown = [key for key in parameters if f"{key} =" not in nb.cells[tagged[0]].source]
    assert not unknown, f"{name}: the parameters cell defines no {unknown}"
    injected = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(injected))
    nb.cells.append(nbformat.v4.new_code_cell(
        f"import json as _json, numpy as _np\nprint({MARK!r} + _json.dumps({{k: globals()[k] for k in {report!r}}}, "
        "default=lambda o: _np.asarray(o).tolist()))"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=env)  # a failing cell raises CellExecutionError with its traceback
    for output in nb.cells[-1].outputs:
        for line in output.get("text", "").splitlines():
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
    raise AssertionError(f"{name}: the report cell printed nothing: {nb.cells[-1].outputs}")


def test_committed_notebooks_have_no_outputs():
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert [p.name for p in paths] == ["01_quickstart.ipynb", "02_precise_shield.ipynb", "03_care.ipynb",
                                       "04_parity_with_pytorch.ipynb"]
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} cell {i} has outputs"


def test_quickstart():
    result = run_notebook("01_quickstart", {"N_PROMPTS": 8, "BATCH_SIZE": 8, "MAX_NEW_TOKENS": 8, "PROGRESS": False},
                          ["sites", "separation", "best_layer", "strength_zero_is_identity", "answers"])
    assert len(result["sites"]) == 4 * 30
    assert len(result["separation"]) == 30 and all(s > 0 for s in result["separation"])
    assert result["strength_zero_is_identity"]
    assert result["answers"]["1.0"] != result["answers"]["0.0"]  # steering changes the generations


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory, smollm2_dir) -> str:
    """A 4-layer random Llama with SmolLM2's tokenizer and chat template: the training and sweep notebooks'
    mechanics in seconds (on the real model they take minutes; their defaults stay on it)."""
    import torch
    import transformers

    from tests.parity import randomize

    path = tmp_path_factory.mktemp("tiny-chat-llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=2048, tie_word_embeddings=True,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    randomize(transformers.LlamaForCausalLM(config), seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_precise_shield(tiny_chat_model):
    result = run_notebook(
        "02_precise_shield",
        {"MODEL_DIR": tiny_chat_model, "N_PROMPTS": 8, "N_HELD_OUT": 4, "MAX_TOKENS": 96, "RATIO": 0.05,
         "RANDOM_SEEDS": 2, "MAX_NEW_TOKENS": 6, "STEPS": 3, "BATCH_SIZE": 4, "PROGRESS": False},
        ["per_layer", "fraction", "overlap", "check", "losses", "changed_inside", "changed_outside", "evaluation"])
    assert len(result["per_layer"]) == 4 and sum(result["per_layer"]) > 0
    assert 0 < result["fraction"] < 0.05
    overlap = result["overlap"]
    assert overlap[0][0] == overlap[1][1] == 1.0 and overlap[0][1] == overlap[1][0]
    assert len(result["check"]["random"]) == 2 and result["check"]["examples"] == 4
    assert len(result["losses"]) == 3
    # only the safety neurons' weights moved, and they did (gate and up columns, down rows)
    assert result["changed_outside"] == 0 and result["changed_inside"] > 0
    assert set(result["evaluation"]) == {"before", "after"}
    assert result["evaluation"]["before"]["harmful_logit"] != result["evaluation"]["after"]["harmful_logit"]


def test_care(tiny_chat_model):
    result = run_notebook(
        "03_care",
        {"MODEL_DIR": tiny_chat_model, "N_PROMPTS": 8, "N_HELD_OUT": 4, "K": 3, "MAX_NEW_TOKENS": 6, "BATCH_SIZE": 4,
         "PROGRESS": False},
        ["mlp_delta", "indirect", "target_layers", "eigenvalue_error", "max_angle", "norms", "evaluation"])
    assert len(result["mlp_delta"]) == 3  # pairs of layers (0, 1), (1, 2), (2, 3)
    assert len(result["indirect"]) == 8 and any(v != 0 for v in result["indirect"].values())
    assert len(result["target_layers"]) == 2
    # the generalized eigen-decomposition agrees with scipy's float64 solver
    assert result["eigenvalue_error"] < 1e-4 and result["max_angle"] < 0.5
    assert len(result["norms"]["comply"]) == len(result["norms"]["refuse"]) == 4
    before, after = result["evaluation"]["before"], result["evaluation"]["after"]
    assert before["harmful_logit"] != after["harmful_logit"]  # the projection acts during the forward


def test_parity_with_pytorch():
    result = run_notebook("04_parity_with_pytorch", {"N_PROMPTS": 4, "MAX_NEW_TOKENS": 8},
                          ["logit_rel_error", "kl_mean", "top1_agreement", "site_rel_error", "same_generation",
                           "bf16_kl_mean", "bf16_top1"])
    assert result["logit_rel_error"] < 1e-4 and result["kl_mean"] < 1e-6 and result["top1_agreement"] == 1.0
    assert all(error < 1e-4 for error in result["site_rel_error"].values()) and len(result["site_rel_error"]) == 3
    assert sum(result["same_generation"]) >= len(result["same_generation"]) - 1  # near-ties may part ways
    assert result["bf16_kl_mean"] < 0.05 and result["bf16_top1"] > 0.8
