"""The output file: appended one whole line at a time and flushed, so a killed job loses only the
requests in flight; a rerun reads it back to skip what is already answered (resume)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import IO, Any

from mmrag.serving.batch.records import BatchInputError, LineKey, record_key

logger = logging.getLogger(__name__)

# How every line OutputWriter writes begins: json.dumps, compact, of a record whose first key is its id.
RECORD_START = b'{"id":"batch_req_'


def recover_output(path: str | Path) -> set[LineKey]:
    """Keys of the lines an earlier run recorded in ``path`` (none if it does not exist).

    A kill can leave the last line half-written: it is cut off here (its request runs again), but only when
    it is recognisably ours (it begins as every record we write begins). Any other line that is not an output
    record means the file is not ours: :class:`BatchInputError`, and nothing is cut or appended.
    """
    path = Path(path)
    if not path.exists():
        return set()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BatchInputError(f"cannot read the output file {path}: {exc}") from exc
    keys: set[LineKey] = set()
    offset = 0
    for number, raw in enumerate(data.splitlines(keepends=True), 1):
        if raw.isspace():  # a blank line (an editor's, say) holds no record and harms nothing
            offset += len(raw)
            continue
        record = _parse_record(raw)
        if record is None:
            if offset + len(raw) < len(data) or not _torn_record(raw, after_records=bool(keys)):
                raise BatchInputError(
                    f"{path}: line {number} is not a batch output record (an object with id, custom_id, response "
                    "and error); not resuming into a file that is not a batch output: name another output file"
                )
            logger.warning("dropping a partially written last line of %s (%d bytes)", path, len(raw))
            with path.open("r+b") as f:
                f.truncate(offset)
            break
        keys.add(record_key(record))
        offset += len(raw)
    return keys


def _parse_record(raw: bytes) -> dict[str, Any] | None:
    """The record on a complete line (newline-terminated), or None when the line is not one of ours."""
    if not raw.endswith(b"\n"):
        return None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if is_output_record(record) else None


def is_output_record(record: object) -> bool:
    """Whether ``record`` has the shape of an OpenAI batch output line (as :mod:`records` writes them)."""
    return (
        isinstance(record, dict)
        and isinstance(record.get("id"), str)
        and "custom_id" in record
        and isinstance(record["custom_id"], str | None)
        and isinstance(record.get("response", False), dict | None)
        and isinstance(record.get("error", False), dict | None)
    )


def _torn_record(raw: bytes, *, after_records: bool) -> bool:
    """Whether an unfinished last line is the start of a record this writer wrote (a kill mid-write): every
    line it writes begins with ``RECORD_START``. A line shorter than that prefix counts only after records
    of ours, so a one-line file of someone else's is never taken for a torn record and cut."""
    if raw.startswith(RECORD_START):
        return True
    return after_records and RECORD_START.startswith(raw)


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
