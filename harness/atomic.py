"""Atomic outputs: a file or a folder appears complete or not at all.

Everything wsolbench writes for the user goes through here, so an error or a kill half-way never
leaves a half-written metrics file, score-map folder or checkpoint behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_sibling(path: Path, is_dir: bool) -> Path:
    """A new temporary file or folder next to `path`, with the permissions a plain create gives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        return tmp
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def write_with(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call `writer(tmp_path)` to write a temporary sibling, then rename it onto `path`."""
    path = Path(path)
    tmp = _temp_sibling(path, is_dir=False)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def directory(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it is renamed onto `path`.

    With `replace`, an existing `path` is swapped out (and removed) only after the new one is
    complete; without it an existing non-empty `path` is an error.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not replace:
        raise FileExistsError(f"{path}: exists and is not empty")
    tmp = _temp_sibling(path, is_dir=True)
    try:
        yield tmp
        if path.exists():
            old = _temp_sibling(path, is_dir=True)
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
