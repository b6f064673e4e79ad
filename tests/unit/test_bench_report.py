"""The results summary in docs/results.md is generated from the committed JSONs and must match them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmrag.benchmarks.report import END, START, markdown, read_rows, replace_section

DOC = Path(__file__).resolve().parents[2] / "docs" / "results.md"


def test_the_summary_in_docs_matches_the_committed_results():
    section = DOC.read_text().partition(START)[2].partition(END)[0]
    assert section.strip() == markdown(read_rows()).strip(), (
        "docs/results.md's summary is stale: run `python -m mmrag.benchmarks.report --write docs/results.md`"
    )


def test_every_committed_result_gets_a_summary():
    rows = read_rows()
    assert rows
    for row in rows:
        assert not row.headline.startswith("("), f"{row.file}: {row.headline}"


def _write(directory: Path, name: str, payload: dict) -> None:
    (directory / name).write_text(json.dumps(payload))


def test_provenance_is_shown_or_said_missing_and_training_records_are_skipped(tmp_path):
    figures = {"batch_over_llm_chat": 0.9, "batch_over_server": 30.0, "outputs_match": True}
    machine = {"commit": "0123456789abcdef", "load_average": [1.25, 1.0, 1.0]}
    _write(
        tmp_path,
        "batch.json",
        {"benchmark": "batch", "figures": figures, "machine": machine, "timestamp": "2026-12-08T01:00:00Z"},
    )
    _write(tmp_path, "old.json", {"benchmark": "batch", "figures": figures, "timestamp": "2026-11-28T01:00:00Z"})
    _write(tmp_path, "training.json", {"history": []})
    rows = {row.file: row for row in read_rows(tmp_path)}
    assert set(rows) == {"batch.json", "old.json"}
    assert (rows["batch.json"].commit, rows["batch.json"].load) == ("0123456789ab", "1.2")
    assert (rows["old.json"].commit, rows["old.json"].load) == ("not recorded", "not recorded")
    assert "0.90x vLLM LLM.chat" in rows["batch.json"].headline


def test_replace_section_swaps_only_the_marked_text():
    document = f"intro\n{START}\nold table\n{END}\noutro\n"
    assert replace_section(document, "new\n") == f"intro\n{START}\nnew\n{END}\noutro\n"
    with pytest.raises(ValueError, match="section"):
        replace_section("no markers here", "new\n")
