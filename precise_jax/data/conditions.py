"""The conditions grid: every (language, modality) pair gets its own list of examples built from one prompt set.

Languages other than the set's own come from translation files the user supplies (JSONL/CSV/Parquet with columns
`id`, `language`, `prompt`, optionally `response`, keyed by example id), or from an offline translator such as
Debian's Apertium. Modalities: "text" (the prompt alone), "typographic" (the prompt rendered into a FigStep image,
with FIGSTEP_PROMPT as the text), "image+text" (a real benign photo, with the prompt as the text).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ports.errors import InputError
from precise_jax.data.examples import MODALITIES, Example, data_files, read_rows
from precise_jax.data.images import ImageLike, benign_photos
from precise_jax.data.splits import stable_hash
from precise_jax.data.typography import FIGSTEP, FIGSTEP_PROMPT, TypographyStyle, typographic_image

# translator(texts, language) -> the texts in `language`, one for one.
Translator = Callable[[Sequence[str], str], list[str]]
Translations = Mapping[tuple[str, str], Mapping[str, str]]  # (example id, language) -> {"prompt", ["response"]}


@dataclasses.dataclass(frozen=True, order=True)
class Condition:
    """One cell of the grid: a language and a modality."""

    language: str
    modality: str

    @property
    def name(self) -> str:
        return f"{self.language}-{self.modality}"


def load_translations(path: str | os.PathLike, *, columns: Mapping[str, str] | None = None) -> dict:
    """{(example id, language): {"prompt": ..., ["response": ...]}} from a translation file or folder of them.

    `columns` maps id / language / prompt / response to the files' column names.
    """
    columns = {"id": "id", "language": "language", "prompt": "prompt", "response": "response", **(columns or {})}
    translations: dict[tuple[str, str], dict[str, str]] = {}
    origin: dict[tuple[str, str], str] = {}
    for file in data_files(path):
        for where, row in read_rows(file, required=[columns[k] for k in ("id", "language", "prompt")]):
            key = (str(row[columns["id"]]).strip(), str(row[columns["language"]] or "").strip())
            prompt = row[columns["prompt"]]
            if not key[0] or not key[1]:
                raise InputError(f"{where}: a translation needs an example id and a language")
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f"{where}: empty translated prompt for example {key[0]!r} ({key[1]})")
            if key in origin:
                raise InputError(f"{where}: example {key[0]!r} already has a {key[1]} translation at {origin[key]}")
            origin[key] = where
            translations[key] = {"prompt": prompt}
            response = row.get(columns["response"])
            if isinstance(response, str) and response.strip():
                translations[key]["response"] = response
    if not translations:
        raise InputError(f"{path} holds no translations")
    return translations


class ApertiumTranslator:
    """Offline rule-based translation with Debian's `apertium` command (apt-get install apertium apertium-eng-spa)."""

    MODES = {"es": "eng-spa", "ca": "eng-cat", "gl": "en-gl", "eo": "en-eo"}

    def __init__(self, modes: Mapping[str, str] | None = None, command: str = "apertium"):
        self.modes = {**self.MODES, **(modes or {})}
        self.command = command

    def available(self, language: str | None = None) -> bool:
        """Whether the command is installed (and, given a language, whether its mode is: `apertium -l`)."""
        binary = shutil.which(self.command)
        if binary is None or language is None:
            return binary is not None
        if language not in self.modes:
            return False
        listed = subprocess.run([binary, "-l"], capture_output=True, text=True)
        return self.modes[language] in listed.stdout.split()

    def __call__(self, texts: Sequence[str], language: str) -> list[str]:
        binary = shutil.which(self.command)
        if binary is None:
            raise InputError(f"the {self.command!r} command is not installed: apt-get install apertium plus the "
                             "pair's data (e.g. apertium-eng-spa), or give translation files instead")
        if language not in self.modes:
            raise InputError(f"no Apertium mode for language {language!r}; known: {self.modes}. "
                             "Pass modes={language: 'eng-xxx'}")
        return [self._one(binary, self.modes[language], text) for text in texts]

    def _one(self, binary: str, mode: str, text: str) -> str:
        # One process per text: Apertium reflows blank lines, so joined texts could not be split back reliably.
        result = subprocess.run([binary, "-u", mode], input=text, capture_output=True, text=True)
        if result.returncode != 0 or not result.stdout.strip():
            raise InputError(f"apertium {mode} failed (exit {result.returncode}): {result.stderr.strip()[-300:]}. "
                             f"Is its language pair installed (apt-get install apertium-{mode})?")
        return re.sub(r"[ \t]+", " ", result.stdout).strip()  # it leaves runs of spaces where it drops words


def save_translations(examples: Sequence[Example], language: str, translator: Translator,
                      path: str | os.PathLike) -> Path:
    """Translate the examples' prompts once and write a JSONL translation file (whole or not at all)."""
    path = Path(path)
    texts = translator([e.prompt for e in examples], language)
    if len(texts) != len(examples):
        raise InputError(f"the translator returned {len(texts)} texts for {len(examples)} prompts")
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            for example, text in zip(examples, texts):
                out.write(json.dumps({"id": example.id, "language": language, "prompt": text},
                                     ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def build_conditions(
    examples: Sequence[Example],
    languages: Sequence[str] = ("en",),
    modalities: Sequence[str] = ("text",),
    *,
    translations: Translations | None = None,
    translator: Translator | None = None,
    photos: Sequence[ImageLike] | None = None,
    style: TypographyStyle = FIGSTEP,
    figstep_prompts: Mapping[str, str] | None = None,
    seed: int = 0,
) -> dict[Condition, list[Example]]:
    """{Condition(language, modality): examples}: every example of `examples` in every cell of the grid.

    Condition example ids are "<id>:<language>:<modality>" (metadata["base_id"] keeps the original). A language
    missing from `translations` is asked of `translator`; without one, the missing ids are reported.
    An example whose metadata["benchmark_conditions"][modality] is {"image", "prompt"[, "instruction"]} (the
    benchmark loaders' official images) gets those in its own language instead of a rendered image or a photo.
    """
    if not examples:
        raise InputError("cannot build conditions from an empty prompt set")
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise InputError(f"unknown modalities {unknown}; use some of {MODALITIES}")
    if any(e.modality != "text" for e in examples):
        raise InputError("build conditions from text examples; the grid adds the images itself")
    if "image+text" in modalities:
        photos = list(photos) if photos is not None else benign_photos()
        if not photos:
            raise InputError("the image+text modality needs at least one benign photo")
    figstep_prompts = dict(figstep_prompts or {})
    grid: dict[Condition, list[Example]] = {}
    for language in languages:
        texts = _in_language(examples, language, translations or {}, translator)
        for modality in modalities:
            cell = []
            for example, (prompt, response) in zip(examples, texts):
                common: dict = dict(
                    id=f"{example.id}:{language}:{modality}", label=example.label, response=response,
                    language=language, modality=modality, source=example.source, category=example.category,
                    metadata={**example.metadata, "base_id": example.id, "instruction": prompt},
                )
                # a benchmark's own image and text for this modality (FigStep's typographic images, MM-SafetyBench's
                # SD images), in its own language only: other languages get ours, made from the translation
                official = (example.metadata.get("benchmark_conditions") or {}).get(modality)
                if official and language == example.language:
                    common["metadata"]["instruction"] = official.get("instruction", prompt)
                    cell.append(Example(prompt=official["prompt"], images=(Path(official["image"]),), **common))
                elif modality == "text":
                    cell.append(Example(prompt=prompt, **common))
                elif modality == "typographic":
                    carrier = figstep_prompts.get(language, FIGSTEP_PROMPT)
                    cell.append(Example(prompt=carrier, images=(typographic_image(prompt, style),), **common))
                else:
                    photo = photos[stable_hash(seed, example.id) % len(photos)]  # type: ignore[index, arg-type]
                    cell.append(Example(prompt=prompt, images=(photo,), **common))
            grid[Condition(language, modality)] = cell
    return grid


def _in_language(examples: Sequence[Example], language: str, translations: Translations,
                 translator: Translator | None) -> list[tuple[str, str | None]]:
    """(prompt, response) of each example in `language`: itself, a supplied translation, or the translator's."""
    out: list[tuple[str, str | None] | None] = []
    missing = []
    for n, example in enumerate(examples):
        if example.language == language:
            out.append((example.prompt, example.response))
        elif (example.id, language) in translations:
            entry = translations[(example.id, language)]
            out.append((entry["prompt"], entry.get("response")))
        else:
            out.append(None)
            missing.append(n)
    if missing and translator is None:
        ids = [examples[n].id for n in missing]
        raise InputError(f"{len(ids)} examples have no {language!r} translation (e.g. {ids[:5]}); give a "
                         "translation file (columns id, language, prompt) or a translator such as "
                         "ApertiumTranslator()")
    if missing:
        assert translator is not None  # refused above
        texts = translator([examples[n].prompt for n in missing], language)
        if len(texts) != len(missing):
            raise InputError(f"the translator returned {len(texts)} texts for {len(missing)} prompts")
        for n, text in zip(missing, texts):
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"the translator returned an empty {language} text for {examples[n].id!r}")
            out[n] = (text, None)  # a reply is not machine-translated: it stays absent
    return out  # type: ignore[return-value]  # every None is filled by now
