"""Standard safety benchmarks read from their own published layouts: the vendored copies, or a user's local copy.

Every loader takes `root`: None for the copy vendored under precise_jax/data/vendored/ (where there is one), or a
user's folder (the benchmark's repository or its data folder) or file. Ids, categories, languages and image paths
are the benchmark's own; a file that does not match the published layout is an `InputError` naming the file and
the layout expected.
"""

from __future__ import annotations

import ast
import csv
import os
from pathlib import Path
from typing import Iterable, Sequence

from ports.errors import InputError
from precise_jax.data.examples import Example

VENDORED = Path(__file__).parent / "vendored"

MULTIJAIL_LANGUAGES = ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")
MULTIJAIL_LAYOUT = "MultiJail.csv with columns id, source, tags, " + ", ".join(MULTIJAIL_LANGUAGES)


def multijail(root: str | os.PathLike | None = None, languages: Iterable[str] | None = None) -> list[Example]:
    """MultiJail: 315 harmful prompts, each human-translated into 9 languages; one example per (prompt, language).

    id "multijail-007-it"; metadata["item"] ("multijail-007") pairs the languages of one prompt; category = the
    first tag; metadata: tags, source (anthropics / openai). Order: by prompt, then language.
    """
    path = _find(root, "multijail/MultiJail.csv", "MultiJail.csv", MULTIJAIL_LAYOUT)
    languages = _languages(languages, MULTIJAIL_LANGUAGES, path)
    examples = []
    for where, row in _csv_rows(path, ("id", "source", "tags", *languages), MULTIJAIL_LAYOUT):
        number = _integer(row["id"], where, "id")
        tags = _tag_list(row["tags"], where)
        item = f"multijail-{number:03d}"
        for language in languages:
            examples.append(_example(
                where, id=f"{item}-{language}", prompt=row[language], label="harmful", language=language,
                source="multijail", category=tags[0],
                metadata={"item": item, "tags": tags, "source": row["source"].strip()},
            ))
    return _unique(examples, path)


FIGSTEP_SUBSETS = {"full": ("safebench.csv", "SafeBench"), "tiny": ("SafeBench-Tiny.csv", "SafeBench-Tiny")}
FIGSTEP_COLUMNS = ("dataset", "category_id", "task_id", "category_name", "question", "instruction")
FIGSTEP_LAYOUT = ("data/question/{safebench.csv | SafeBench-Tiny.csv} with columns " + ", ".join(FIGSTEP_COLUMNS)
                  + " and data/images/{SafeBench | SafeBench-Tiny}/query_{dataset}_{category_id}_{task_id}_6.png")


def figstep(root: str | os.PathLike | None = None, *, subset: str = "tiny",
            modality: str = "typographic") -> list[Example]:
    """FigStep SafeBench: 500 harmful questions in 10 topics (subset "full") or its 50-question "tiny" subset, with
    the official typographic images; root None reads the vendored copy, which has the tiny subset's images only.

    modality "typographic": the official image with FigStep's fixed instruction (FIGSTEP_PROMPT), the attack;
    "text": the question alone, the attack in metadata["benchmark_conditions"]["typographic"] (build_conditions'
    typographic cell uses it). id "figstep-01-05" (category, task) in both; category = category_name.
    """
    from precise_jax.data.typography import FIGSTEP_PROMPT

    if subset not in FIGSTEP_SUBSETS:
        raise InputError(f"FigStep SafeBench has subsets {sorted(FIGSTEP_SUBSETS)}, not {subset!r}")
    if modality not in ("typographic", "text"):
        raise InputError(f"FigStep examples are 'typographic' (the attack) or 'text' (the question), not {modality!r}")
    name, folder = FIGSTEP_SUBSETS[subset]
    if root is None and subset == "full":
        raise InputError("the vendored FigStep copy has the tiny subset's images only; for the full SafeBench give "
                         f"a clone of ThuCCSLab/FigStep (or its data/ folder) as root: {FIGSTEP_LAYOUT}")
    path = _find(root, f"figstep/question/{name}", name, FIGSTEP_LAYOUT)
    images = _image_folder(path, root, folder, FIGSTEP_LAYOUT)
    examples = []
    for where, row in _csv_rows(path, FIGSTEP_COLUMNS, FIGSTEP_LAYOUT):
        category, task = _integer(row["category_id"], where, "category_id"), _integer(row["task_id"], where, "task_id")
        image = images / f"query_{row['dataset'].strip()}_{category}_{task}_6.png"
        if not image.is_file():
            raise InputError(f"{where}: its image {image} does not exist; expected the published layout: "
                             f"{FIGSTEP_LAYOUT}")
        attack = {"image": str(image), "prompt": FIGSTEP_PROMPT, "instruction": row["instruction"]}
        metadata = {"item": f"figstep-{category:02d}-{task:02d}", "dataset": row["dataset"].strip(),
                    "category_id": category, "task_id": task, "question": row["question"],
                    "instruction": row["instruction"], "subset": subset,
                    "benchmark_conditions": {"typographic": attack}}
        if modality == "typographic":
            fields = dict(prompt=FIGSTEP_PROMPT, images=(image,), modality="typographic")
        else:
            fields = dict(prompt=row["question"])
        examples.append(_example(where, id=metadata["item"], label="harmful", source="figstep",
                                 category=row["category_name"].strip(), metadata=metadata, **fields))
    return _unique(examples, path)


XSTEST_COLUMNS = ("id", "prompt", "type", "label", "focus", "note")
XSTEST_LAYOUT = "xstest_prompts.csv with columns " + ", ".join(XSTEST_COLUMNS) + " (label safe / unsafe)"


def xstest(root: str | os.PathLike | None = None, *, labels: Iterable[str] = ("safe", "unsafe")) -> list[Example]:
    """XSTest: 250 safe prompts that look unsafe (the over-refusal probe: label "benign") and 200 unsafe contrasts
    (label "harmful"), from a user's copy of xstest_prompts.csv; category = type (e.g. "homonyms",
    "contrast_homonyms"); metadata: xstest_label, focus, note, over_refusal (True for the safe prompts).
    """
    labels = tuple(labels)
    if not labels or set(labels) - {"safe", "unsafe"}:
        raise InputError(f"XSTest labels are 'safe' and 'unsafe', not {list(labels)}")
    path = _find(root, None, "xstest_prompts.csv", XSTEST_LAYOUT)
    examples = []
    for where, row in _csv_rows(path, XSTEST_COLUMNS, XSTEST_LAYOUT):
        label = (row["label"] or "").strip().lower()
        if label not in ("safe", "unsafe"):
            raise InputError(f"{where}: label {row['label']!r} is neither 'safe' nor 'unsafe' ({XSTEST_LAYOUT})")
        if label not in labels:
            continue
        number = (row["id"] or "").strip()
        number = f"{int(number):03d}" if number.isdigit() else number
        examples.append(_example(
            where, id=f"xstest-{number}", prompt=row["prompt"], label="benign" if label == "safe" else "harmful",
            source="xstest", category=(row["type"] or "").strip() or None,
            metadata={"xstest_label": label, "focus": (row["focus"] or "").strip(),
                      "note": (row["note"] or "").strip(), "over_refusal": label == "safe"},
        ))
    return _unique(examples, path)


# XSafety's folders; "sp" is its name for Spanish, read as language "es".
XSAFETY_FOLDERS = {"ar": "ar", "bn": "bn", "de": "de", "en": "en", "fr": "fr", "hi": "hi", "ja": "ja", "ru": "ru",
                   "es": "sp", "zh": "zh"}
XSAFETY_LANGUAGES = tuple(XSAFETY_FOLDERS)
XSAFETY_LAYOUT = ("one folder per language (" + ", ".join(XSAFETY_FOLDERS.values()) + "), one file per safety "
                  "category in each: {Category}.csv (or {Category}_n.csv, .xlsx), one prompt per row, no header")


def xsafety(root: str | os.PathLike | None = None, languages: Iterable[str] | None = None) -> list[Example]:
    """XSafety: prompts in 14 safety categories, translated into 10 languages, from a user's copy (the folder
    holding ar/ bn/ ... zh/). One example per (category, row, language): id "xsafety-Insult-0007-fr", category as
    the file names it (without the "_n" / "_en" suffix); metadata["item"] ("xsafety-Insult-0007") pairs the
    languages of one row (the published files are translated row for row). languages None: every language folder
    the copy has; "sp" and "es" both name Spanish.
    """
    if root is None:
        raise InputError(f"XSafety is not vendored: give the folder of your copy ({XSAFETY_LAYOUT})")
    root = Path(root).expanduser()
    if root.is_dir() and not any((root / f).is_dir() for f in XSAFETY_FOLDERS.values()):
        found = sorted({p.parent.parent for f in ("en", "zh") for p in root.rglob(f"{f}/*.csv")})
        root = found[0] if len(found) == 1 else root
    if not root.is_dir():
        raise InputError(f"{root} is not a folder; give the folder holding XSafety's {XSAFETY_LAYOUT}")
    if languages is None:  # every language folder the copy has
        languages = [language for language, folder in XSAFETY_FOLDERS.items() if (root / folder).is_dir()]
        if not languages:
            raise InputError(f"{root} has no language folder; expected XSafety's layout: {XSAFETY_LAYOUT}")
    languages = _languages(["es" if language == "sp" else language for language in languages], XSAFETY_LANGUAGES,
                           root)
    examples = []
    for language in languages:
        folder = root / XSAFETY_FOLDERS[language]
        files = sorted(p for p in folder.glob("*") if p.suffix in (".csv", ".xlsx") and p.is_file()) \
            if folder.is_dir() else []
        if not files:
            raise InputError(f"{folder} has no category files; expected XSafety's layout: {XSAFETY_LAYOUT}")
        seen: dict[str, Path] = {}
        for file in files:
            category = _xsafety_category(file.stem, XSAFETY_FOLDERS[language])
            if category in seen:
                raise InputError(f"{file} and {seen[category]} are both category {category!r}; keep one")
            seen[category] = file
            prompts = _xlsx_column(file) if file.suffix == ".xlsx" else _single_column_csv(file)
            for n, (where, prompt) in enumerate(prompts):
                item = f"xsafety-{category}-{n:04d}"
                examples.append(_example(
                    where, id=f"{item}-{language}", prompt=prompt, label="harmful", language=language,
                    source="xsafety", category=category, metadata={"item": item, "file": file.name},
                ))
    return _unique(examples, root)


MM_SAFETYBENCH_KINDS = {  # kind: (the question key its text uses, Example modality)
    "SD": ("Rephrased Question(SD)", "image+text"), "SD_TYPO": ("Rephrased Question", "image+text"),
    "TYPO": ("Rephrased Question", "typographic"), "text": ("Question", "text"),
}
MM_SAFETYBENCH_KEYS = ("Question", "Key Phrase", "Rephrased Question", "Rephrased Question(SD)")
MM_SAFETYBENCH_LAYOUT = ("data/processed_questions/{scenario}.json ({id: {" + ", ".join(MM_SAFETYBENCH_KEYS) +
                         "}}) and data/imgs/{scenario}/{SD,SD_TYPO,TYPO}/{id}.jpg")


def mm_safetybench(root: str | os.PathLike | None = None, *, kind: str = "SD_TYPO",
                   scenarios: Iterable[str] | None = None) -> list[Example]:
    """MM-SafetyBench from a user's copy: one example per question of each scenario (01-Illegal_Activitiy ...).

    kind SD / SD_TYPO / TYPO: that image with the benchmark's text for it (the rephrased question; SD's own for
    SD); "text": the original question, with the TYPO attack as its typographic condition and SD as its image+text
    condition (metadata["benchmark_conditions"]). id "mm-safetybench-01-Illegal_Activitiy-0"; category = scenario.
    """
    if kind not in MM_SAFETYBENCH_KINDS:
        raise InputError(f"MM-SafetyBench kinds are {sorted(MM_SAFETYBENCH_KINDS)}, not {kind!r}")
    if root is None:
        raise InputError(f"MM-SafetyBench is not vendored: give the folder of your copy ({MM_SAFETYBENCH_LAYOUT})")
    root = Path(root).expanduser()
    candidates = [root / "data" / "processed_questions", root / "processed_questions", root]
    questions = next((c for c in candidates if c.is_dir() and any(c.glob("*.json"))), None)
    if questions is None:
        raise InputError(f"{root} has no processed_questions/*.json; expected MM-SafetyBench's layout: "
                         f"{MM_SAFETYBENCH_LAYOUT}")
    files = {f.stem: f for f in sorted(questions.glob("*.json"))}
    chosen = list(files) if scenarios is None else list(scenarios)
    unknown = [name for name in chosen if name not in files]
    if unknown or not chosen:
        raise InputError(f"{questions} has no scenario {unknown or chosen}; its scenarios are {list(files)}")
    images = next((c for c in (questions.parent / "imgs", questions.parent / "MM-SafetyBench(imgs)",
                               root / "imgs", root / "data" / "imgs") if c.is_dir()), None)
    if images is None:
        raise InputError(f"no image folder imgs/ beside {questions}; expected MM-SafetyBench's layout: "
                         f"{MM_SAFETYBENCH_LAYOUT} (its images are a separate download)")
    text_key, modality = MM_SAFETYBENCH_KINDS[kind]
    examples = []
    for scenario in chosen:
        file = files[scenario]
        for qid, entry in _json_object(file).items():
            where = f"{file} question {qid!r}"
            missing = [key for key in MM_SAFETYBENCH_KEYS if not isinstance(entry, dict) or key not in entry]
            if missing:
                raise InputError(f"{where} has no {', '.join(map(repr, missing))}; expected {MM_SAFETYBENCH_LAYOUT}")
            picture = {k: images / scenario / k / f"{qid}.jpg" for k in ("SD", "SD_TYPO", "TYPO")}
            for k in ((kind,) if kind != "text" else ("SD", "TYPO")):
                if not picture[k].is_file():
                    raise InputError(f"{where}: its {k} image {picture[k]} does not exist; expected "
                                     f"MM-SafetyBench's layout: {MM_SAFETYBENCH_LAYOUT}")
            metadata = {"item": f"mm-safetybench-{scenario}-{qid}", "scenario": scenario, "kind": kind,
                        "question": entry["Question"], "key_phrase": entry["Key Phrase"],
                        "phrase_type": entry.get("Phrase Type"), "rephrased_question": entry["Rephrased Question"],
                        "rephrased_question_sd": entry["Rephrased Question(SD)"]}
            if kind == "text":
                metadata["benchmark_conditions"] = {
                    "typographic": {"image": str(picture["TYPO"]), "prompt": entry["Rephrased Question"],
                                    "instruction": entry["Key Phrase"]},
                    "image+text": {"image": str(picture["SD"]), "prompt": entry["Rephrased Question(SD)"]},
                }
            examples.append(_example(
                where, id=metadata["item"], prompt=entry[text_key], label="harmful", modality=modality,
                images=() if kind == "text" else (picture[kind],), source="mm-safetybench",
                category=scenario.split("-", 1)[-1], metadata=metadata,
            ))
    return _unique(examples, questions)


JAILBREAKV_SUBSETS = {"mini": "mini_JailBreakV_28K.csv", "full": "JailBreakV_28K.csv"}
JAILBREAKV_COLUMNS = ("id", "jailbreak_query", "redteam_query", "format", "policy", "image_path")
JAILBREAKV_LAYOUT = ("JailBreakV_28K/{JailBreakV_28K.csv | mini_JailBreakV_28K.csv} with columns "
                     + ", ".join(JAILBREAKV_COLUMNS) + " and image_path relative to the JailBreakV_28K folder")


def jailbreakv(root: str | os.PathLike | None = None, *, subset: str = "mini",
               modality: str = "image") -> list[Example]:
    """JailBreakV-28K (or its 280-row "mini" subset) from a user's copy: each jailbreak query with its image;
    id "jailbreakv-17"; category = policy; modality typographic for the FigStep format, else image+text;
    metadata: redteam_query (the plain harmful request), format, image_path and the remaining columns.
    modality "text": the redteam query alone, the attack as its condition (metadata["benchmark_conditions"]).
    """
    if modality not in ("image", "text"):
        raise InputError(f"JailBreakV-28K examples are 'image' (the attack) or 'text' (the query), not {modality!r}")
    if subset not in JAILBREAKV_SUBSETS:
        raise InputError(f"JailBreakV-28K has subsets {sorted(JAILBREAKV_SUBSETS)}, not {subset!r}")
    path = _find(root, None, JAILBREAKV_SUBSETS[subset], JAILBREAKV_LAYOUT)
    examples = []
    for where, row in _csv_rows(path, JAILBREAKV_COLUMNS, JAILBREAKV_LAYOUT):
        image = path.parent / (row["image_path"] or "").strip()
        if not (row["image_path"] or "").strip() or not image.is_file():
            raise InputError(f"{where}: its image {image} does not exist; expected the published layout: "
                             f"{JAILBREAKV_LAYOUT}")
        form = (row["format"] or "").strip()
        attack = "typographic" if form.lower() == "figstep" else "image+text"
        extra = {k: v for k, v in row.items() if k not in ("id", "jailbreak_query", "policy") and k is not None}
        if modality == "text":
            extra["benchmark_conditions"] = {attack: {"image": str(image), "prompt": row["jailbreak_query"]}}
            fields = dict(prompt=row["redteam_query"])
        else:
            fields = dict(prompt=row["jailbreak_query"], images=(image,), modality=attack)
        examples.append(_example(
            where, id=f"jailbreakv-{(row['id'] or '').strip()}", label="harmful", source="jailbreakv-28k",
            category=(row["policy"] or "").strip() or None, metadata=extra, **fields,
        ))
    return _unique(examples, path)


def parallel(examples: Sequence[Example], base: str = "en") -> tuple[list[Example], dict]:
    """(one example per item in the `base` language, {(its id, language): {"prompt"}} for the other languages):
    a multilingual benchmark (examples paired by metadata["item"], as multijail and xsafety give them) in the
    form build_conditions takes, so that a language is a condition and a split by id keeps an item's languages
    together. The base examples' ids are the item ids."""
    import dataclasses

    items: dict[str, dict[str, Example]] = {}
    for example in examples:
        item = example.metadata.get("item")
        if not item:
            raise InputError(f"example {example.id!r} has no metadata 'item' pairing it with its translations")
        if example.language in items.setdefault(item, {}):
            raise InputError(f"item {item!r} has two {example.language!r} examples ({example.id!r} and "
                             f"{items[item][example.language].id!r})")
        items[item][example.language] = example
    lacking = [item for item, versions in items.items() if base not in versions]
    if lacking:
        raise InputError(f"{len(lacking)} items have no {base!r} version (e.g. {lacking[:3]}); choose a base "
                         "language every item has")
    originals, translations = [], {}
    for item, versions in items.items():
        originals.append(dataclasses.replace(versions[base], id=item))
        for language, example in versions.items():
            if language != base:
                translations[(item, language)] = {"prompt": example.prompt}
    return originals, translations


def _json_object(path: Path) -> dict:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path} holds a JSON {type(value).__name__}, not an object of questions by id")
    return value


def _xsafety_category(stem: str, folder: str) -> str:
    for suffix in ("_n", f"_{folder}"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _single_column_csv(path: Path) -> list[tuple[str, str]]:
    """(location, prompt) per non-empty row of a header-less CSV with one prompt a row (unquoted commas kept)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not UTF-8 text ({error}); expected one prompt per row") from None
    return [(f"{path} row {n}", ",".join(row).strip()) for n, row in enumerate(rows, 1) if ",".join(row).strip()]


def _xlsx_column(path: Path) -> list[tuple[str, str]]:
    """(location, text) per non-empty cell of column A of the first sheet of an .xlsx file (no openpyxl needed)."""
    import zipfile
    from xml.etree import ElementTree

    main = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
    try:
        with zipfile.ZipFile(path) as book:
            names = set(book.namelist())
            shared = []
            if "xl/sharedStrings.xml" in names:
                for item in ElementTree.fromstring(book.read("xl/sharedStrings.xml")).iter(f"{main}si"):
                    shared.append("".join(t.text or "" for t in item.iter(f"{main}t")))
            sheets = sorted(n for n in names if n.startswith("xl/worksheets/sheet") and n.endswith(".xml"))
            if not sheets:
                raise InputError(f"{path} has no worksheet; expected one prompt per row in column A")
            sheet = ElementTree.fromstring(book.read(sheets[0]))
    except (zipfile.BadZipFile, ElementTree.ParseError, KeyError) as error:
        raise InputError(f"{path} is not a readable .xlsx workbook ({error}); re-save it or export it as CSV") from None
    out = []
    for row in sheet.iter(f"{main}row"):
        for cell in row.iter(f"{main}c"):
            if "".join(ch for ch in cell.get("r", "A") if ch.isalpha()) != "A":
                continue
            kind, value = cell.get("t"), cell.find(f"{main}v")
            text: str = ""
            if kind == "s" and value is not None and value.text is not None:
                text = shared[int(value.text)]
            elif kind == "inlineStr":
                text = "".join(t.text or "" for t in cell.iter(f"{main}t"))
            elif value is not None:
                text = value.text or ""
            if text.strip():
                out.append((f"{path} row {row.get('r')}", text.strip()))
    return out


def _image_folder(table: Path, root, folder: str, layout: str) -> Path:
    """The benchmark's image folder `images/{folder}`: beside the table's folder (data/question/ ~ data/images/),
    beside the table, or under root or root/data."""
    candidates = [table.parent.parent / "images" / folder, table.parent / "images" / folder]
    if root is not None and Path(root).is_dir():
        candidates += [Path(root) / "images" / folder, Path(root) / "data" / "images" / folder]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise InputError(f"no image folder images/{folder} for {table} (looked in {candidates[0]} and beside it); "
                     f"expected the published layout: {layout}")


def _find(root, vendored: str | None, name: str, layout: str) -> Path:
    """The benchmark file: the vendored copy (root None), `root` itself, or the one file `name` under a folder."""
    if root is None:
        if vendored is None:
            raise InputError(f"{name} is not vendored in precise-jax: give the path of your copy ({layout})")
        return VENDORED / vendored
    root = Path(root).expanduser()
    if root.is_file():
        return root
    if not root.is_dir():
        raise InputError(f"{root} does not exist; give the benchmark's folder or its {name} ({layout})")
    if (root / name).is_file():
        return root / name
    found = sorted(p for p in root.rglob(name) if p.is_file())
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} files named"
        raise InputError(f"{root} has {what} {name}; expected the published layout: {layout}. "
                         "Give the file's path to choose one")
    return found[0]


def _languages(wanted: Iterable[str] | None, known: Sequence[str], path: Path) -> tuple[str, ...]:
    if wanted is None:
        return tuple(known)
    wanted = tuple(wanted)
    unknown = [language for language in wanted if language not in known]
    if unknown or not wanted:
        raise InputError(f"{path} has no language {unknown or wanted}; its languages are {list(known)}")
    return wanted


def _csv_rows(path: Path, required: Sequence[str], layout: str) -> list[tuple[str, dict]]:
    """(location, row) for every row of a CSV file (with or without a BOM), after checking the header."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            have = reader.fieldnames or []
            missing = [name for name in required if name not in have]
            if missing:
                raise InputError(f"{path} has no column {', '.join(map(repr, missing))} (its columns: {have}); "
                                 f"expected the published layout: {layout}")
            return [(f"{path} row {number}", row) for number, row in enumerate(reader, 1)]
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; expected the published layout: {layout}") from None
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not UTF-8 text ({error}); expected the published layout: {layout}") from None


def _integer(value, where: str, column: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise InputError(f"{where}: column {column!r} is {value!r}, not a whole number") from None


def _tag_list(value: str, where: str) -> tuple[str, ...]:
    """MultiJail's tags column: a Python list literal of category names, e.g. "['Theft', 'Violence']"."""
    try:
        tags = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        tags = None
    if not isinstance(tags, list) or not tags or not all(isinstance(t, str) and t.strip() for t in tags):
        raise InputError(f"{where}: tags {value!r} is not a list of category names such as \"['Theft']\"")
    return tuple(t.strip() for t in tags)


def _example(where: str, **fields) -> Example:
    """An Example whose validation error names the row it came from."""
    try:
        return Example(**fields)
    except InputError as error:
        raise InputError(f"{where}: {error}") from None


def _unique(examples: list[Example], path: Path) -> list[Example]:
    seen = set()
    for example in examples:
        if example.id in seen:
            raise InputError(f"{path}: example id {example.id!r} appears twice; the benchmark's ids must be unique")
        seen.add(example.id)
    if not examples:
        raise InputError(f"{path} holds no examples")
    return examples
