"""The playground page (issue 34) in headless Chromium against the default server (smol through Ray Serve
and vLLM, the session's shared `default_client` server; no server of its own). The page creates a vector
store and uploads a document into it, then asks one question with an image and text retrieval over that
store, side by side with full images (A) and AIM 1/4 (B); it must show both streamed answers, the retrieved
source with its score and text, and the token figures, with no script error and no CSP refusal. The
screenshot goes to tests/artifacts/playground.png (docs/playground.png is a copy of one)."""

from __future__ import annotations

import re
import uuid

import pytest
from PIL import Image, ImageDraw

from tests.playground.browser import ARTIFACTS, chromium_page, needs_chromium

pytestmark = [pytest.mark.e2e, pytest.mark.slow, needs_chromium]

DOCUMENT_NAME = "observatory-flag.md"
DOCUMENT = (
    "# The Orrin observatory flag\n\n"
    "The flag of the Orrin observatory is a red square on a white field. It was designed by the astronomer "
    "Pell Okonkwo-Vance in 1903.\n"
)
QUESTION = "What colour is the square in the image?"  # the image below is that flag


def figure(answer, name: str) -> str:
    return answer.query_selector(f"[data-figure={name}] dd").text_content()


def test_the_page_answers_with_an_image_and_retrieval_and_shows_sources_and_costs(default_client, tmp_path):
    root = str(default_client.base_url).removesuffix("/").removesuffix("/v1")
    document = tmp_path / DOCUMENT_NAME
    document.write_text(DOCUMENT)
    image = tmp_path / "red-square.png"
    drawing = Image.new("RGB", (336, 336), "white")
    ImageDraw.Draw(drawing).rectangle((84, 84, 252, 252), fill=(210, 30, 30))
    drawing.save(image)
    store = f"playground-{uuid.uuid4().hex[:8]}"

    with chromium_page(tmp_path / "profile") as (page, problems):
        page.set_default_timeout(120_000)  # a shared 2-core CI machine: generous waits, no timing asserted
        streams: list[str] = []
        page.on(
            "response",
            lambda r: r.url.endswith("/v1/chat/completions") and streams.append(r.headers.get("content-type", "")),
        )
        page.goto(f"{root}/playground")
        page.wait_for_selector("#model:has-text('smol')")

        # Documents: a new vector store, one file uploaded and indexed through the Files + Vector Stores APIs.
        page.fill("#store-name", store)
        page.click("#create-store")
        page.wait_for_selector(f"#store option:has-text('{store}')", state="attached")
        page.set_input_files("#upload", str(document))
        page.wait_for_selector(f"#store-files li:has-text('{DOCUMENT_NAME}') .badge.completed")

        # Side by side: text retrieval over the store in both lanes, full images (A) vs AIM 1/4 (B).
        page.check("#compare")
        for lane, keep in (("A", "1"), ("B", "0.25")):
            settings = f".lane[data-lane={lane}]"
            page.select_option(f"{settings} [name=mode]", "text")
            page.select_option(f"{settings} [name=store]", label=f"store {store}")
            page.fill(f"{settings} [name=top_k]", "2")
            page.fill(f"{settings} [name=aim]", keep)
            page.fill(f"{settings} [name=max_tokens]", "24")
        page.fill("#question", QUESTION)
        page.set_input_files("#images", str(image))
        page.wait_for_selector("#attachments img")
        page.click("#send")
        page.wait_for_selector(".answer[data-lane=B][data-state=done], .answer[data-state=failed]", timeout=300_000)
        # Wait for the source texts the page fetches after the answer (a search of the store).
        page.wait_for_selector(".answer[data-lane=B] .sources pre.chunk")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

        answers = {a.get_attribute("data-lane"): a for a in page.query_selector_all(".answer")}
        visual_after = {}
        for lane, answer in answers.items():
            assert answer.get_attribute("data-state") == "done", answer.inner_text()
            assert answer.query_selector(".text").text_content().strip(), f"{lane}: no answer text"
            assert int(answer.get_attribute("data-chunks")) >= 1, f"{lane}: no content chunk"
            # The retrieved source: the uploaded file, its score and the chunk's text.
            first = answer.query_selector(".sources li")
            assert DOCUMENT_NAME in first.query_selector(".source").text_content()
            assert 0 < float(first.query_selector(".score").text_content()) <= 1
            assert "a red square on a white field" in first.query_selector("pre.chunk").text_content()
            assert "1 of" in figure(answer, "retrieval") or "2 of" in figure(answer, "retrieval")
            # The costs: prompt tokens, visual tokens before -> after AIM, KV entries kept, TTFT, tokens/s.
            assert int(figure(answer, "prompt_tokens")) > 0
            before, after = map(int, re.fullmatch(r"(\d+) → (\d+)", figure(answer, "visual_tokens")).groups())
            assert before > 0
            visual_after[lane] = (before, after)
            kept, prompt = map(int, re.match(r"(\d+) of (\d+)", figure(answer, "kv_kept")).groups())
            assert kept == prompt > 0  # the default server runs no KV compaction
            assert re.fullmatch(r"\d+ ms", figure(answer, "ttft"))
            assert re.fullmatch(r"[\d.]+|–", figure(answer, "tokens_per_s"))
        (a_before, a_after), (b_before, b_after) = visual_after["A"], visual_after["B"]
        assert a_before == a_after == b_before  # A keeps every visual token; both see the same image
        assert b_after < a_after  # B merged them: AIM 1/4
        # Both answers came as server-sent events, read by the page as they arrived.
        assert [t.partition(";")[0] for t in streams] == ["text/event-stream"] * 2
        assert problems.errors == []
