"""Files the tools write and read: output paths checked before any work, the temp files a killed write left
behind, and the sha256 of a set of files (the identity of a VAE's or a checkpoint's weights)."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ssm_tread.errors import UserError


class OutputPathError(UserError, ValueError):
    """An output path that cannot be written; the message names it and the fix."""


def check_output_path(path: str | os.PathLike, what: str, suffixes: tuple[str, ...] = ()) -> Path:
    """Raise :class:`OutputPathError` unless ``path`` can be written: it is not a folder, it ends in one of
    ``suffixes`` (when given), and its nearest existing ancestor is a writable folder (missing folders are
    created when it is written). ``what`` names the option, e.g. "--out"."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputPathError(f"{what} {str(path)!r} must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} is a folder; give a file path inside it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} lies under {str(parent)!r}, which is a file, not a folder; "
                              f"choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {str(path)!r}: the folder {str(parent)!r} is not writable; choose another path")
    return path


def remove_temp_files(folder: str | os.PathLike, pattern: str) -> list[str]:
    """Delete the files of ``folder`` whose names match the regular expression ``pattern`` in full (the temp
    files of atomic writes that a killed process left); returns their names. The caller makes sure that no
    live process is writing them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = sorted(p.name for p in folder.iterdir() if re.fullmatch(pattern, p.name) and p.is_file())
    for name in names:
        (folder / name).unlink(missing_ok=True)
    return names


def files_sha256(paths: list[str | os.PathLike], chunk: int = 1 << 24) -> str:
    """sha256 over the names and the bytes of ``paths``, in the order given."""
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def weights_sha256(folder: str | os.PathLike) -> str:
    """The identity of a diffusers model folder (e.g. the SD VAE): sha256 of its config.json and weight files."""
    folder = Path(folder)
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    return files_sha256([folder / "config.json", *weights])
