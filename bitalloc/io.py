"""Every file bitalloc writes goes through here: temporary file in the same folder, then rename."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputPathError


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse, before any slow work, a file target that is not a regular file or cannot be created.

    A device node, FIFO or socket would be replaced by os.replace (as root, /dev/null itself); a
    folder cannot be; a missing parent folder must be creatable and writable.
    """
    path = Path(path).expanduser()
    try:
        st = os.stat(path)  # follows symlinks: a link to /dev/null is judged by /dev/null
    except (FileNotFoundError, NotADirectoryError):  # the parent check below says which
        st = None
    except OSError as e:
        raise OutputPathError(f"{flag} {str(path)!r} cannot be used: {e.strerror}; choose another path") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputPathError(f"{flag} {str(path)!r} is a folder, but a file is written there; "
                              "give the path of a file (e.g. one inside that folder)")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputPathError(f"{flag} {str(path)!r} exists and is not a regular file ({_kind(st.st_mode)}); "
                              "bitalloc would replace it: choose a path to a regular file")
    _check_parent(path, flag)
    return path


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse, before any slow work, a folder target that exists as something else or cannot be created."""
    path = Path(path).expanduser()
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # the parent check below says which
        st = None
    except OSError as e:
        raise OutputPathError(f"{flag} {str(path)!r} cannot be used: {e.strerror}; choose another path") from None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise OutputPathError(f"{flag} {str(path)!r} exists and is not a folder ({_kind(st.st_mode)}), but a folder "
                              "is written there; remove it or choose another path")
    _check_parent(path, flag)
    return path


def _check_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor must be a folder we may create entries in."""
    parent = path.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{flag} {str(path)!r}: {str(parent)!r} is not a folder; choose a path inside a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {str(path)!r}: folder {str(parent)!r} is not writable; choose another path "
                              "or fix its permissions")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed to `path`, on error removed.

    For writers that stream a large file themselves (a GGUF); small files use atomic_write_bytes."""
    path = check_output_file(path, "output")  # defence in depth: every writer, whichever command called it
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory so os.replace is a rename on one filesystem, never a copy.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the permissions a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        check_output_file(path, "output")  # again: something may have appeared there while we wrote
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def canonical_json(obj: Any) -> str:
    """Sorted keys, fixed separators, trailing newline: same object -> same bytes."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
