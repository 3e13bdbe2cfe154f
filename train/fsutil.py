"""Durable whole-file writes: one helper for checkpoints, the data cache, run files, reports and local caches.

`write_atomic(path, data)` writes `.<name>.tmp-<pid>` next to `path`, fsyncs it, renames it over `path` and fsyncs
the folder, so a reader (or a kill -9 at any moment) sees the old file or the new one, never a mix. A temp file of a
killed process keeps its pid in its name (`train/data/shards.py` removes those of dead pids). On any error the temp
file is removed and the old file is left as it was.

Lowest floor: imports nothing from train/ but the error family.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from train.errors import UserError


def os_cause(e: BaseException) -> str:
    """The short reason of an error, for one-line messages: `No space left on device`, not the errno tuple."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split()) or e.__class__.__name__


def write_error(cls: type[Exception] = UserError) -> Callable[[Path, OSError], Exception]:
    """A mapping of a failed write for `write_atomic(error=...)`: `cls("cannot write <path>: <cause>")`, one line
    naming the file (disk full, a read-only folder, a file-size limit are the user's environment, not a bug)."""
    return lambda path, e: cls(f"cannot write {path}: {os_cause(e)}")


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in folder `path` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_fsynced(path: Path, data: bytes) -> None:
    """Write `data` to `path` (created or truncated) and fsync it; no rename (see `write_atomic`)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def temp_path(path: Path) -> Path:
    """The temp file `write_atomic` writes before the rename: `.<name>.tmp-<pid>` in the same folder."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: str | Path, data: bytes | str, *,
                 error: Optional[Callable[[Path, OSError], Exception]] = write_error(),
                 write: Optional[Callable[[Path, bytes], None]] = None) -> None:
    """Replace `path` by `data` (str is written as UTF-8) atomically and durably: temp file, fsync, rename, fsync
    of the folder. On an OSError the temp file is removed, the old file is intact, and `error(path, e)` is raised
    (default `write_error()`: a one-line UserError naming the file; `error=None` re-raises the OSError).
    `write` is how the bytes reach the temp file (default `write_fsynced`); fault tests swap it to cut a write short."""
    path = Path(path)
    tmp = temp_path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        (write or write_fsynced)(tmp, payload)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError) and error is not None:
            raise error(path, e) from None
        raise
    fsync_dir(path.parent)
