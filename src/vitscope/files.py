"""Files written whole or not at all: a reader, a later run or a parallel process sees the old file or the new
one, never half of one, whenever the writer is killed or fails."""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; when the block ends, one rename puts the file at
    `path`, and if the block raises, the temporary file is deleted and `path` is left as it was. The temporary
    name is unique to the call (process id and a random part): parallel processes may write the same cache file.
    `durable` (checkpoints, weights): the file is flushed to the disk before the rename and the rename after it,
    so a power cut cannot leave an empty or missing file either."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        if durable:
            _fsync(temporary, os.O_RDWR)  # Windows flushes only a file opened for writing
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        try:
            _fsync(path.parent, os.O_RDONLY)  # the rename is an entry in the folder
        except OSError:  # Windows cannot open a folder; its renames need no flush
            pass


def atomic_write(path: str | Path, data: bytes | str, durable: bool = False) -> None:
    """Write `data` (str as UTF-8) to `path` through `atomic_path`."""
    with atomic_path(path, durable) as temporary:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
