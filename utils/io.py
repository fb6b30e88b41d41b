"""Atomic file writes (a reader never sees a half-written file: write a temp file, then rename) and checksums."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import urllib.parse
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_binary_file(path: str) -> Iterator[BinaryIO]:
    """A binary handle whose contents replace ``path`` only if the block completes: a temporary file
    in the same folder (same filesystem, so the final rename is atomic), synced to disk, then renamed.
    On an error, or a kill, ``path`` keeps its previous contents."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_binary_file(path) as handle:
        handle.write(data)


def atomic_write_text(path: str, text: str, errors: str = "strict") -> None:
    """Write `text` as UTF-8. File names that are not UTF-8 reach Python as lone surrogates
    (os.fsdecode); `errors` says what becomes of them: "surrogateescape" writes their original
    bytes (a list of paths that reads back exactly with the same errors), "backslashreplace"
    a \\udcXX escape (valid inside a JSON string), "replace" a "?" (text for people)."""
    atomic_write_bytes(path, text.encode("utf-8", errors))


def url_path(relative_path: str) -> str:
    """The percent-encoded URL of a relative file path, byte-exact for any file name."""
    return urllib.parse.quote(os.fsencode(relative_path).replace(os.sep.encode(), b"/"))


def sha256_of(path: str, block: int = 1 << 22) -> str:
    """The hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()
