"""A safety-aligned model organism: a real chat model fine-tuned to refuse harmful requests in English only.

SmolLM2-135M-Instruct refuses about 2 % of harmful prompts, so it has no refusal behaviour for safety neurons to
carry. `build_organism` gives it one by supervised fine-tuning on English harmful prompts -> refusals and benign
prompts -> their reference answers, with the checkpoint chosen on a validation split by a stated rule
(`train.Validation`). Other languages are never trained, so their refusal rate measures how far English safety
carries over on its own: the gap Precise Shield claims to close.

The training prompts come from the *fitting* part of the same seeded split the pipeline uses (`held_out`,
`split_seed`), so the pipeline's held-out prompts stay unseen by the organism too. The result is cached like the
converted base model, under `<cache>/models/organism-<digest>/`, with its data ids, seed, hyper-parameters and
validation history in `organism.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ports.errors import InputError

if TYPE_CHECKING:
    from ports.pretrained import Pretrained
    from precise_jax.data import Example

ORGANISM_FILE = "organism.json"


@dataclasses.dataclass(frozen=True)
class OrganismConfig:
    """Everything that decides the organism (its cache key)."""

    # English harmful sets, interleaved one prompt from each in turn; of MultiJail only the English prompts of
    # the fitting items (the claims' held-out items, every language, stay unseen)
    harmful: tuple[str, ...] = ("multijail", "advbench", "jbb", "harmbench-standard")
    benign: tuple[str, ...] = ("alpaca-eval",)
    held_out: float = 0.3  # the pipeline's split: these held-out prompts are never trained on
    split_seed: int = 0
    train_harmful: int = 160  # harmful -> refusal pairs
    train_benign: int = 320  # benign -> reference-answer pairs (two per refusal, against over-refusal)
    validation: int = 24  # harmful and as many benign fitting prompts that choose the checkpoint
    max_tokens: int = 160  # training pairs longer than this are dropped
    mode: str = "full"  # "full" or "lora"
    learning_rate: float = 2e-5  # 5e-5 gave the same validation refusal with more over-refusal (results/organism.md)
    steps: int = 120  # at most; validation may stop earlier
    batch_size: int = 8
    validate_every: int = 20
    min_refusal: float = 0.9  # the validation rule: stop at the first check with harmful refusal >= this
    max_over_refusal: float = 0.1  # and benign refusal <= this
    validation_tokens: int = 32  # greedy tokens per validation reply
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def organism_data(lm: Pretrained, config: OrganismConfig) -> dict[str, list]:
    """{"train": SFT pairs, "validation_harmful", "validation_benign"} from the fitting parts of the prompt sets."""
    from precise_jax.claims import split_by_item
    from precise_jax.data import seeded_order, sources, split_examples
    from precise_jax.shield import alignment_examples, within_length

    parts = {}
    for label, names, count in (("harmful", config.harmful, config.train_harmful),
                                ("benign", config.benign, config.train_benign)):
        sets = {}
        for name in names:
            sets[name] = [e for e in sources.load_set(name) if e.language == "en"]
            if not sets[name]:
                raise InputError(f"the organism's {label} prompt set {name!r} has no English prompts")
        # the split of the pipeline (the plain sets together) and of the claims (a multilingual set by item)
        multilingual = {name for name, examples in sets.items() if "item" in examples[0].metadata}
        fitting = {e.id for e in split_examples([e for n in names if n not in multilingual for e in sets[n]],
                                                config.held_out, seed=config.split_seed)[0]}
        for name in multilingual:
            fitting |= {e.id for e in split_by_item(sets[name], config.held_out, config.split_seed)[0]}
        fit = interleave([within_length(seeded_order([e for e in sets[n] if e.id in fitting], config.seed), lm,
                                        config.max_tokens) for n in names])
        if len(fit) < config.validation + count:
            raise InputError(f"the {label} sets {names} leave {len(fit)} fitting prompts within {config.max_tokens} "
                             f"tokens; the organism needs {config.validation} for validation + {count} for training")
        parts[label] = (fit[: config.validation], fit[config.validation:])
    harmful_train, benign_train = parts["harmful"][1], parts["benign"][1]
    pairs = within_length(alignment_examples(harmful_train, benign_train), lm, config.max_tokens)
    harmful_pairs = [p for p in pairs if p.label == "harmful"][: config.train_harmful]
    benign_pairs = [p for p in pairs if p.label == "benign"][: config.train_benign]
    return {"train": seeded_order(harmful_pairs + benign_pairs, config.seed),
            "validation_harmful": parts["harmful"][0], "validation_benign": parts["benign"][0]}


def interleave(lists: Sequence[Sequence]) -> list:
    """One element of each list in turn (a, b, c, a, b, c, ...), the longer lists' rest at the end."""
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)]
    return out


def build_organism(lm: Pretrained, config: OrganismConfig = OrganismConfig(), *, progress: bool = True,
                   ) -> tuple[Pretrained, dict]:
    """(the fine-tuned model, its record): SFT of `lm` on English refusals and benign answers, the checkpoint
    chosen by the validation rule of `config`."""
    from precise_jax.shield import refusal_validation
    from precise_jax.train import TrainConfig, Validation, train

    if config.mode not in ("full", "lora"):
        raise InputError(f"the organism trains in mode 'full' or 'lora', got {config.mode!r}")
    started = time.perf_counter()
    data = organism_data(lm, config)
    validation = Validation(
        refusal_validation(data["validation_harmful"], data["validation_benign"], batch_size=config.batch_size,
                           max_new_tokens=config.validation_tokens, progress=False),
        every=config.validate_every, min_harmful_refusal=config.min_refusal,
        max_benign_refusal=config.max_over_refusal)
    train_config = TrainConfig(mode=config.mode, steps=config.steps, batch_size=config.batch_size,
                               learning_rate=config.learning_rate, weight_decay=0.0, max_length=config.max_tokens,
                               seed=config.seed)
    result = train(lm, data["train"], None, train_config, validation=validation, progress=progress)
    chosen = next(c for c in result.checks if c["step"] == result.chosen_step)
    record = {
        "base_model": lm.model_id,
        "config": dataclasses.asdict(config),
        "digest": config.digest(),
        "rule": f"stop at the first validation check with harmful refusal >= {config.min_refusal} and benign "
                f"refusal <= {config.max_over_refusal}; otherwise keep the check with the largest margin",
        "chosen_step": result.chosen_step,
        "chosen": chosen,
        "met_targets": validation.meets_targets(chosen),
        "checks": result.checks,
        "losses": result.losses,
        "trainable": result.trainable,
        "data": {"train": [e.id for e in data["train"]],
                 "validation_harmful": [e.id for e in data["validation_harmful"]],
                 "validation_benign": [e.id for e in data["validation_benign"]]},
        "seconds": round(time.perf_counter() - started, 1),
    }
    return result.model, record


def organism_folder(config: OrganismConfig = OrganismConfig(), base: str | Path | None = None, *,
                    progress: bool = True) -> Path:
    """The cached organism folder for `config` (built from `base`, default the real SmolLM2-135M-Instruct, on first
    use; a Hugging Face folder with `organism.json`)."""
    import jax.numpy as jnp

    from ports import load_pretrained, save_pretrained
    from precise_jax.assets import cache_root, smollm2_135m_instruct
    from precise_jax.outputs import OutputDir

    base = Path(base) if base is not None else smollm2_135m_instruct()
    name = f"organism-{base.name}-{config.digest()}"
    target = cache_root() / "models" / name
    if (target / ORGANISM_FILE).is_file():  # it only ever appears complete
        return target
    if progress:
        print(f"precise-jax: building the model organism {target} (once; cached) …", file=sys.stderr)
    lm = load_pretrained(base, dtype=jnp.float32)
    model, record = build_organism(lm, config, progress=progress)
    out = OutputDir(target, overwrite=True)
    try:
        save_pretrained(model, out.path, overwrite=True)
        out.commit(record, ORGANISM_FILE)
    finally:
        out.discard()
    return target


def read_record(folder: str | Path) -> dict:
    """The `organism.json` of an organism folder."""
    path = Path(folder) / ORGANISM_FILE
    if not path.is_file():
        raise InputError(f"{folder} is not a model organism folder (no {ORGANISM_FILE}); build one with "
                         "`precise-jax organism`")
    return json.loads(path.read_text())


READABLE_RATIO = 2.0  # a language is readable when its translations cost at most this many times English's nats


def languages_readable(lm: Pretrained, items: Sequence[Example], *, batch_size: int = 8,
                       ) -> dict[str, dict[str, float | bool]]:
    """{language: {"nats": mean total NLL of its prompts, "ratio": that over English's, "readable"}}: whether the
    model reads a language at all. The prompts are human translations of the same items, so their totals compare
    across languages and scripts (a model that cannot read a language pays for it byte by byte); the rule:
    readable when ratio <= READABLE_RATIO."""
    from precise_jax.evaluate import text_nll

    by_language: dict[str, list[str]] = {}
    for example in items:
        by_language.setdefault(example.language, []).append(example.prompt)
    if "en" not in by_language:
        raise InputError("languages_readable compares with English: the items need their English prompts")
    nats = {lang: float(text_nll(lm, texts, batch_size=batch_size)[0].mean())
            for lang, texts in sorted(by_language.items())}
    return {lang: {"nats": value, "ratio": value / nats["en"], "readable": value / nats["en"] <= READABLE_RATIO}
            for lang, value in nats.items()}
