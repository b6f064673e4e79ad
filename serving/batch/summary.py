"""What a run reports: a progress bar while it runs (rate, ETA) and a summary when it ends."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
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


@dataclass
class Recorder:
    """Where every finished line goes: the output file, the summary and the progress bar."""

    writer: OutputWriter
    summary: BatchSummary
    progress: Any  # a tqdm bar
    started: float = field(default_factory=time.perf_counter)

    def record(self, record: dict[str, Any]) -> None:
        self.writer.write(record)
        self.summary.add(record)
        self.progress.update(1)
        error = record["error"]
        if error is not None:
            logger.warning("line %s (custom_id %r): %s", error["line"], record["custom_id"], error["message"])
            self.progress.set_postfix(failed=self.summary.failed, refresh=False)

    def finish(self) -> BatchSummary:
        self.progress.close()
        self.summary.seconds = time.perf_counter() - self.started
        return self.summary


def progress_bar(total: int, *, enabled: bool):
    from tqdm import tqdm

    # tqdm's default format shows done/total, the rate (req/s) and the ETA.
    return tqdm(total=total, unit="req", desc="batch", file=sys.stderr, mininterval=1.0, disable=not enabled or total == 0)
