"""Folders as ``{relative path: bytes}`` bundles, so a job's files travel through Ray's object store.

No node shares a filesystem with another: the head packs a job's input files (and the clips an earlier
attempt finished) into a bundle for the group that takes it, and the group's leader packs the finished
files back. ``unpack`` refuses paths that would leave the target folder, and writes every file
atomically (``common.files.atomic_write_bytes``), so a reader never sees half a file.

``FolderMirror`` follows a folder that grows while a job renders (its ``.frames/`` spill): each
``changed()`` returns only the files added or rewritten since the last call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath

from common.files import atomic_write_bytes

logger = logging.getLogger(__name__)

Bundle = dict[str, bytes]  # POSIX path relative to the folder -> file content


class BundleError(ValueError):
    """A bundle entry that cannot be written where it claims to belong."""


def pack(folder: Path, *, keep: Callable[[str], bool] | None = None) -> Bundle:
    """Every regular file under ``folder`` (recursively; ``keep(relpath)`` filters). Empty when the
    folder does not exist. Temporary files of ``atomic_write`` (``.name.*.tmp``) are left out."""
    bundle: Bundle = {}
    if not folder.is_dir():
        return bundle
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.is_symlink() or _is_temporary(path):
            continue
        rel = path.relative_to(folder).as_posix()
        if keep is None or keep(rel):
            bundle[rel] = path.read_bytes()
    return bundle


def unpack(bundle: Mapping[str, bytes], folder: Path) -> list[Path]:
    """Write every entry under ``folder`` (created as needed); returns the written paths."""
    root = folder.resolve()
    written = []
    for rel, data in bundle.items():
        target = _inside(root, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
        written.append(target)
    return written


def _inside(root: Path, rel: str) -> Path:
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or ".." in path.parts or "\\" in rel:
        raise BundleError(f"bundle path {rel!r} is not a plain relative path")
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise BundleError(f"bundle path {rel!r} leaves {root}")
    return target


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


class FolderMirror:
    """The files of one folder that changed since the last ``changed()`` (by size and mtime)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._seen: dict[str, tuple[int, int]] = {}

    def changed(self) -> Bundle:
        out: Bundle = {}
        if not self.folder.is_dir():
            return out
        for path in sorted(self.folder.rglob("*")):
            if not path.is_file() or _is_temporary(path):
                continue
            rel = path.relative_to(self.folder).as_posix()
            try:
                st = path.stat()
                key = (st.st_size, st.st_mtime_ns)
                if self._seen.get(rel) == key:
                    continue
                data = path.read_bytes()
            except OSError:  # replaced or removed between the listing and the read: next time
                continue
            out[rel] = data
            self._seen[rel] = key
        return out
