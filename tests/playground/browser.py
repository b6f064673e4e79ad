"""Debian's Chromium, driven headless through Playwright, for the playground's browser tests.

Playwright's own browser downloads are never used (no network in CI): the tests launch
``/usr/bin/chromium`` (``apt-get install chromium``, done by scripts/setup.sh) and skip, saying so, where
it is absent. Each launch gets a fresh profile directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox will not start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).parents[1] / "artifacts"  # ignored by git; CI keeps it as a build artefact

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is not installed (scripts/setup.sh installs Debian's chromium package)",
)


@dataclass
class PageProblems:
    """What the page reported that a working page never does: uncaught errors, CSP refusals."""

    errors: list[str] = field(default_factory=list)

    def watch(self, page) -> None:
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("console", self._console)

    def _console(self, message) -> None:
        if "Content Security Policy" in message.text or "Refused to" in message.text:
            self.errors.append(f"CSP: {message.text}")


@contextmanager
def chromium_page(profile_dir: Path, width: int = 1440, height: int = 960) -> Iterator[tuple[object, PageProblems]]:
    """A page in a fresh headless Chromium, and the problems it reports."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile_dir),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": width, "height": height},
        )
        try:
            page = context.new_page()
            problems = PageProblems()
            problems.watch(page)
            yield page, problems
        finally:
            context.close()
