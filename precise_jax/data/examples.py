"""The example record, and loaders for prompt sets stored as JSONL / CSV / Parquet files or folders of them.

Every loader error is an `InputError` naming the file and the row (1-based, header not counted for CSV and
Parquet, lines for JSONL), so a bad prompt set is fixed at its source instead of surfacing later as a bad batch.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from ports.errors import InputError
from ports.processing import load_image
from precise_jax.data.images import ImageLike
from precise_jax.outputs import OutputDir

LABELS = ("harmful", "benign")
MODALITIES = ("text", "typographic", "image+text")
FORMATS = (".jsonl", ".csv", ".parquet")
# Example fields a file column can fill; anything else in a row goes to `metadata`.
FIELDS = ("id", "prompt", "images", "response", "language", "modality", "label", "source", "category")


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt (with optional images and reply) and what it is: label, language, modality, source, category."""

    id: str
    prompt: str
    label: str  # "harmful" | "benign"
    images: tuple[ImageLike, ...] = dataclasses.field(default=(), hash=False)  # paths or PIL images
    response: str | None = None
    language: str = "en"  # BCP-47-ish: "en", "zh", "pt-BR"
    modality: str = "text"  # "text" | "typographic" | "image+text"
    source: str = ""
    category: str | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id.strip():
            raise InputError(f"an example has an empty id ({self.id!r}); every example needs a unique id")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InputError(f"example {self.id!r} has an empty prompt; every example needs prompt text")
        if self.label not in LABELS:
            raise InputError(f"example {self.id!r} has label {self.label!r}; use one of {LABELS}")
        if self.modality not in MODALITIES:
            raise InputError(f"example {self.id!r} has modality {self.modality!r}; use one of {MODALITIES}")
        if not isinstance(self.language, str) or not self.language.strip():
            raise InputError(f"example {self.id!r} has no language; give a BCP-47 code such as 'en'")
        if self.response is not None and not isinstance(self.response, str):
            raise InputError(f"example {self.id!r} has a non-text response ({type(self.response).__name__})")
        object.__setattr__(self, "images", tuple(self.images))
        if self.modality != "text" and not self.images:
            raise InputError(f"example {self.id!r} has modality {self.modality!r} but no image")


def load_examples(
    path: str | os.PathLike,
    *,
    columns: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    check_images: bool = True,
) -> list[Example]:
    """Examples from a JSONL/CSV/Parquet file, or every such file under a folder (sorted, recursive).

    `columns` maps Example fields to the files' column names (default: the field's own name); `defaults` fills
    fields a file lacks (e.g. {"label": "harmful"}). Other columns go to `metadata`.
    """
    columns = dict(columns or {})
    defaults = dict(defaults or {})
    unknown = sorted(set(columns) - set(FIELDS)) + sorted(set(defaults) - set(FIELDS))
    if unknown:
        raise InputError(f"unknown example fields {unknown} in columns/defaults; the fields are {FIELDS}")
    examples: list[Example] = []
    seen: dict[str, str] = {}
    for file in data_files(path):
        for where, row in read_rows(file, required=_required(columns, defaults)):
            example = _example(file, where, row, columns, defaults, check_images)
            if example.id in seen:
                raise InputError(f"{where}: example id {example.id!r} was already used at {seen[example.id]}; "
                                 "ids must be unique across the whole prompt set")
            seen[example.id] = where
            examples.append(example)
    if not examples:
        raise InputError(f"{path} holds no examples: give a file with at least one row")
    return examples


def data_files(path: str | os.PathLike) -> list[Path]:
    """The prompt-set files at `path`: the file itself, or every JSONL/CSV/Parquet file under a folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in FORMATS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise InputError(f"folder {path} has no {'/'.join(FORMATS)} files: put the prompt set there")
        return files
    if not path.is_file():
        raise InputError(f"prompt set {path} does not exist")
    if path.suffix not in FORMATS:
        raise InputError(f"{path} is not a prompt-set file: use one of {FORMATS}")
    return [path]


def read_rows(file: Path, *, required: Iterable[str] = ()) -> Iterator[tuple[str, dict]]:
    """(location, row dict) for every row of a JSONL/CSV/Parquet file; a missing required column names the file."""
    file = Path(file)
    required = list(required)
    if file.suffix == ".jsonl":
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{file} line {number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(f"{where} is not valid JSON ({error}); each line must be one JSON "
                                     "object") from error
                if not isinstance(row, dict):
                    raise InputError(f"{where} is a JSON {type(row).__name__}, not an object with named fields")
                _check_columns(where, row.keys(), required)
                yield where, row
    elif file.suffix == ".csv":
        with open(file, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: spreadsheet exports start with a BOM
            reader = csv.DictReader(f)
            _check_columns(str(file), reader.fieldnames or [], required)
            for number, row in enumerate(reader, 1):
                yield f"{file} row {number}", row
    elif file.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(file)
        except Exception as error:  # pyarrow raises several unrelated types for a damaged file
            raise InputError(f"{file} cannot be read as Parquet ({error})") from error
        _check_columns(str(file), table.column_names, required)
        for number, row in enumerate(table.to_pylist(), 1):
            yield f"{file} row {number}", row
    else:
        raise InputError(f"{file} is not a prompt-set file: use one of {FORMATS}")


def save_examples(examples: Sequence[Example], folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write examples to `folder`/examples.jsonl, images as PNG files under `folder`/images/ (loadable again).

    The folder appears whole or not at all: it is built aside and renamed into place.
    """
    if not examples:
        raise InputError(f"no examples to save to {folder}")
    output = OutputDir(folder, overwrite)
    try:
        (output.path / "images").mkdir()
        with open(output.path / "examples.jsonl", "w", encoding="utf-8") as out:
            for n, example in enumerate(examples):
                images = []
                for k, image in enumerate(example.images):
                    name = f"images/{n:06d}-{k}.png"
                    load_image(image, where=f"example {example.id!r} image {k}").save(output.path / name)
                    images.append(name)
                record = {f.name: getattr(example, f.name) for f in dataclasses.fields(Example)}
                record["images"] = images
                record["metadata"] = dict(example.metadata)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        return output.commit()
    finally:
        output.discard()


def _required(columns: Mapping[str, str], defaults: Mapping[str, Any]) -> list[str]:
    """The columns every file must have: the prompt, the label unless defaulted, and every mapped column."""
    needed = {"prompt"} | ({"label"} if "label" not in defaults else set()) | set(columns)
    return [columns.get(name, name) for name in FIELDS if name in needed]


def _check_columns(where: str, have: Iterable[str], required: Sequence[str]) -> None:
    have = list(have)
    missing = [name for name in required if name not in have]
    if missing:
        raise InputError(f"{where} has no column {', '.join(map(repr, missing))}; its columns are {have}. "
                         "Rename the column or map it with columns={field: column}.")


def _example(file: Path, where: str, row: dict, columns, defaults, check_images: bool) -> Example:
    """One row -> Example; any problem is re-raised naming the row."""
    values: dict[str, Any] = {}
    used = set()
    for name in FIELDS:
        column = columns.get(name, name)
        value = row.get(column)
        if column in row:
            used.add(column)
        if value is None or (isinstance(value, str) and not value.strip() and name != "prompt"):
            value = defaults.get(name)
        if value is not None:
            values[name] = value
    if "metadata" in row and isinstance(row["metadata"], dict):  # what save_examples wrote
        used.add("metadata")
        metadata = {**row["metadata"], **{k: v for k, v in row.items() if k not in used}}
    else:
        metadata = {k: v for k, v in row.items() if k not in used}
    number = where.rsplit(" ", 1)[-1]
    values.setdefault("id", f"{file.stem}:{number}")
    values.setdefault("source", file.stem)
    prompt = values.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: empty prompt (column {columns.get('prompt', 'prompt')!r}); "
                         "every row needs prompt text: fill it in or drop the row")
    values["id"] = str(values["id"])
    values["images"] = _image_paths(file, where, values.get("images"), check_images)
    values.setdefault("modality", "image+text" if values["images"] else "text")
    if isinstance(values.get("label"), str):
        values["label"] = values["label"].strip().lower()
    try:
        return Example(**values, metadata=metadata)
    except InputError as error:
        raise InputError(f"{where}: {error}") from None
    except TypeError as error:  # a field of the wrong type, e.g. a number where text belongs
        raise InputError(f"{where}: {error}") from None


def _image_paths(file: Path, where: str, value, check: bool) -> tuple[Path, ...]:
    """The row's image paths (a list, a JSON list string or one path), resolved against the file's folder."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.lstrip().startswith("[") else [value]
        except json.JSONDecodeError as error:
            raise InputError(f"{where}: the images column {value!r} is not a JSON list of paths ({error})") from error
    if isinstance(value, (str, os.PathLike)) or not isinstance(value, Sequence):
        value = [value]
    paths = []
    for item in value:
        path = Path(item)
        path = path if path.is_absolute() else file.parent / path
        if check:
            load_image(path, where=where)
        paths.append(path)
    return tuple(paths)
