"""Output folders that appear whole or not at all, and the plain JSON form of results.

Low level on purpose: data, report and the CLI all write through `OutputDir`, and it imports nothing of theirs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ports.errors import InputError


class OutputDir:
    """An output folder that appears complete or not at all: files go to `path` (hidden, beside the final folder)
    until `commit` renames it to `final`. An existing non-empty folder is refused unless overwrite=True."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.final = Path(path)
        self.overwrite = overwrite
        self._check_free()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.final.parent))

    def _check_free(self) -> None:
        if self.final.exists() and not self.overwrite and (not self.final.is_dir() or any(self.final.iterdir())):
            raise InputError(f"{self.final} exists and is not empty; choose another output folder or pass "
                             "overwrite=True (--overwrite on the command line)")

    def commit(self, result: Mapping | None = None, name: str = "result.json") -> Path:
        """Write `result` as JSON (if given), then move the folder into place (replacing an old one if allowed)."""
        self.check_open()
        if result is not None:
            (self.path / name).write_text(json.dumps(to_json(result), indent=2, ensure_ascii=False))
        self._check_free()  # another run may have written it meanwhile
        old = None
        if self.final.exists():
            # Aside first, so the final name never points at a half-deleted folder.
            old = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.old-", dir=self.final.parent))
            os.replace(self.final, old / "previous")
        os.replace(self.path, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def check_open(self) -> None:
        if not self.path.exists():
            raise InputError(f"the output for {self.final} was already committed or discarded; start a new one")

    def discard(self) -> None:
        """Remove the work folder (a no-op after commit)."""
        shutil.rmtree(self.path, ignore_errors=True)


def to_json(value: Any) -> Any:
    """Plain JSON data from results holding dataclasses (e.g. Estimate), numpy arrays and scalars, paths; other
    objects as their str()."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, np.generic):
        return to_json(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)  # JSON has no NaN / Infinity
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)  # anything else (a dtype, an enum, ...) as its printed form, rather than lose the run
