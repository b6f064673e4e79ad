"""What a run reports: a progress bar while it runs (rate, ETA) and a summary when it ends."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from mmrag.serving.batch.output import OutputWriter

logger = logging.getLogger(__name__)


@dataclass
class BatchSummary:
    """Counts of this run; ``skipped`` lines were already answered in the output by an earlier run."""

    done: int = 0
    failed: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def add(self, record: dict[str, Any]) -> None:
        if record["error"] is not None:
            self.failed += 1
            return
        self.done += 1
        usage = record["response"]["body"].get("usage") or {}
        self.prompt_tokens += usage.get("prompt_tokens", 0)
        self.completion_tokens += usage.get("completion_tokens", 0)

    def describe(self) -> str:
        return " ".join(
            f"{name}={value:.1f}" if name == "seconds" else f"{name}={value}" for name, value in self.as_dict().items()
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Recorder:
    """Where every finished line goes: the output file, the summary and the progress bar.

    The bar starts at :meth:`start_progress` (once the engine is up) or at the first answer, so its rate
    and ETA measure answering, not the engine's start.
    """

    def __init__(self, writer: OutputWriter, summary: BatchSummary, *, show_progress: bool):
        self.writer = writer
        self.summary = summary
        self.show_progress = show_progress
        self.started = time.perf_counter()
        self._progress: Any = None  # a tqdm bar
        self._progress_total = 0

    def expect(self, total: int) -> None:
        """The number of lines the bar will count (those sent to the chain)."""
        self._progress_total = total

    def start_progress(self) -> None:
        if self._progress is None:
            self._progress = progress_bar(self._progress_total, enabled=self.show_progress)

    def record(self, record: dict[str, Any], *, counted: bool = True) -> None:
        self.writer.write(record)
        self.summary.add(record)
        error = record["error"]
        if error is not None:
            logger.warning("line %s (custom_id %r): %s", error["line"], record["custom_id"], error["message"])
        if counted:
            self.start_progress()
            self._progress.update(1)
            if error is not None:
                self._progress.set_postfix(failed=self.summary.failed, refresh=False)

    def finish(self) -> BatchSummary:
        if self._progress is not None:
            self._progress.close()
        self.summary.seconds = time.perf_counter() - self.started
        return self.summary


def progress_bar(total: int, *, enabled: bool):
    from tqdm import tqdm

    # tqdm's default format shows done/total, the rate (req/s) and the ETA.
    return tqdm(total=total, unit="req", desc="batch", file=sys.stderr, mininterval=1.0, disable=not enabled)
