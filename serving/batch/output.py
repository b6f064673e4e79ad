"""The output file: appended one whole line at a time and flushed, so a killed job loses only the
requests in flight; a rerun reads it back to skip what is already answered (resume)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import IO, Any

from mmrag.serving.batch.records import BatchInputError, LineKey, record_key

logger = logging.getLogger(__name__)


def recover_output(path: str | Path) -> set[LineKey]:
    """Keys of the lines an earlier run recorded in ``path`` (none if it does not exist).

    A kill can leave the last line half-written: it is cut off here (its request runs again). Any other
    unreadable line means the file is not ours, and the job refuses to append to it.
    """
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    keys: set[LineKey] = set()
    offset = 0
    for number, raw in enumerate(data.splitlines(keepends=True), 1):
        record = _parse_record(raw)
        if record is None:
            if offset + len(raw) < len(data):
                raise BatchInputError(f"{path}: line {number} is not an output record; not resuming into it")
            logger.warning("dropping a partially written last line of %s (%d bytes)", path, len(raw))
            with path.open("r+b") as f:
                f.truncate(offset)
            break
        keys.add(record_key(record))
        offset += len(raw)
    return keys


def _parse_record(raw: bytes) -> dict[str, Any] | None:
    if not raw.endswith(b"\n"):
        return None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "custom_id" in record else None


class OutputWriter:
    """Appends records as JSON lines; each line is one ``write`` followed by a flush."""

    def __init__(self, path: str | Path):
        self._path = Path(path)
        self._file: IO[str] | None = None

    def __enter__(self) -> OutputWriter:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._path.open("a", encoding="utf-8")
        return self

    def write(self, record: dict[str, Any]) -> None:
        assert self._file is not None, "use OutputWriter as a context manager"
        self._file.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._file.flush()

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
