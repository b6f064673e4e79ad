"""Images as documents: an image file attached to a vector store is found by the text describing it and, when a
chat request's search hits it, shown to the model as an image (the fake engine records what it was given),
within the request's image limits; a text-only model gets none and the response says why. Real app, real
Milvus Lite, the real `openai` SDK."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from mmrag.serving.config import MmragConfig
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from mmrag.serving.retrieval.protocol import insert_retrieved_images
from mmrag.serving.vector_stores.service import image_description
from tests.batch.engines import RetrievalEchoEngine
from tests.files.documents import png_bytes

RED = (200, 30, 30)
TRAINS = b"The Harrowgate funicular opened in 1898 and climbs 212 metres up the cliff.\n"


@pytest.fixture
def serve(tmp_path: Path, make_stage):
    """``serve(engine_class, **overrides)`` -> (SDK client, fake engine) over the real app, the config's sections
    updated."""
    clients = []

    def make(engine_class=RetrievalEchoEngine, **overrides) -> tuple[openai.OpenAI, RetrievalEchoEngine]:
        sections = {
            "retrieval": {"uri": str(tmp_path / "milvus.db"), "ingest_demo_corpus": False, "default_mode": "none"},
            "files": {"directory": str(tmp_path / "files")},
            # The model's descriptions (their own tests below) would add the echo engine's words to every image.
            "vector_stores": {"poll_after_ms": 20, "image_descriptions": {"enabled": False}},
        }
        for name, values in overrides.items():
            sections[name] = {**sections.get(name, {}), **values}
        config = MmragConfig.model_validate(sections)
        engine = engine_class(config)
        http = TestClient(create_app(config, LocalBackend(engine, make_stage(config))))
        clients.append(http.__enter__())
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        return client, engine

    yield make
    for http in clients:
        http.__exit__(None, None, None)


def attach(client: openai.OpenAI, store_id: str, name: str, data: bytes, attributes=None) -> str:
    file_id = client.files.create(file=(name, data), purpose="assistants").id
    attached = client.vector_stores.files.create_and_poll(
        file_id=file_id, vector_store_id=store_id, attributes=attributes
    )
    assert attached.status == "completed", attached.last_error
    return file_id


def ask(client: openai.OpenAI, store_id: str, messages, top_k: int = 2):
    model = client.models.list().data[0].id
    response = client.chat.completions.create(
        model=model, messages=messages, extra_body={"retrieval": {"vector_store_ids": [store_id], "top_k": top_k}}
    )
    return response, response.model_extra["retrieval"]


def data_url(color: tuple[int, int, int]) -> dict:
    url = "data:image/png;base64," + base64.b64encode(png_bytes((8, 8), color)).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def test_a_retrieved_image_enters_the_prompt_as_an_image(serve):
    client, engine = serve()
    store = client.vector_stores.create(name="pictures")
    image_id = attach(client, store.id, "red-square.png", png_bytes((8, 8), RED), {"description": "a plain red tile"})
    text_id = attach(client, store.id, "trains.txt", TRAINS)
    # Indexed by the words of its name and its attributes' values; search names it as usual.
    (hit,) = client.vector_stores.search(store.id, query="red square", max_num_results=1).data
    assert hit.file_id == image_id and "red square" in hit.content[0].text and "a plain red tile" in hit.content[0].text

    _, info = ask(client, store.id, [{"role": "user", "content": "Show me the red square"}])
    image_doc, text_doc = info["documents"]
    assert (image_doc["file_id"], image_doc["kind"], image_doc["image_dropped"]) == (image_id, "image", None)
    assert (text_doc["file_id"], text_doc["kind"]) == (text_id, "text")
    assert info["context_images"] == 1
    (request,) = engine.seen
    (image,) = request.images
    assert image.size == (8, 8) and image.getpixel((0, 0)) == RED
    # The image, captioned, leads the user's message; the text chunks stay text chunks.
    assert request.messages[-1]["content"] == [
        {"type": "text", "text": "Retrieved image (source: red-square.png):"},
        {"type": "image"},
        {"type": "text", "text": "Show me the red square"},
    ]
    assert [c.metadata["file_id"] for c in request.retrieval.chunks] == [text_id]


def test_retrieved_images_sit_between_earlier_and_last_message_images(serve):
    client, engine = serve()
    store = client.vector_stores.create(name="pictures")
    attach(client, store.id, "red-square.png", png_bytes((8, 8), RED))
    blue, green = (20, 40, 220), (20, 200, 40)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "first"}, data_url(blue)]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [data_url(green), {"type": "text", "text": "and the red square?"}]},
    ]
    _, info = ask(client, store.id, messages, top_k=1)
    assert info["context_images"] == 1
    (request,) = engine.seen
    assert [image.getpixel((0, 0)) for image in request.images] == [blue, RED, green]  # the parts' order
    kinds = [p["type"] for p in request.messages[-1]["content"]]
    assert kinds == ["text", "image", "image", "text"]


def test_a_weak_image_match_stays_out(serve):
    client, engine = serve()
    store = client.vector_stores.create(name="pictures")
    image_id = attach(client, store.id, "red-square.png", png_bytes((8, 8), RED))
    attach(client, store.id, "trains.txt", TRAINS)
    # Two hits in a store of two: the image is the second, a poor match for this question.
    _, info = ask(client, store.id, [{"role": "user", "content": "When did the Harrowgate funicular open?"}])
    image_doc = info["documents"][1]
    assert (image_doc["file_id"], image_doc["kind"]) == (image_id, "image") and image_doc["score"] < 0.2
    assert "vector_stores.min_image_score" in image_doc["image_dropped"] and info["context_images"] == 0
    assert engine.seen[-1].images == []


def test_image_limits_keep_the_best_hits(serve):
    client, engine = serve(vector_stores={"max_retrieved_images": 2}, limits={"max_images_per_request": 3})
    store = client.vector_stores.create(name="squares")
    colors = {"red-square.png": RED, "blue-square.png": (20, 40, 220), "green-square.png": (20, 200, 40)}
    for name, color in colors.items():
        attach(client, store.id, name, png_bytes((8, 8), color))
    _, info = ask(client, store.id, [{"role": "user", "content": "a square"}], top_k=3)
    shown = [d for d in info["documents"] if d["image_dropped"] is None]
    left_out = [d for d in info["documents"] if d["image_dropped"] is not None]
    assert all(d["kind"] == "image" for d in info["documents"]) and info["context_images"] == 2
    assert len(shown) == 2 and info["documents"][:2] == shown  # best first
    assert len(left_out) == 1 and "vector_stores.max_retrieved_images" in left_out[0]["image_dropped"]
    assert len(engine.seen[-1].images) == 2
    # The request's own images count too: two of its own leave room for one retrieved.
    own = [data_url((0, 0, 0)), data_url((255, 255, 255)), {"type": "text", "text": "a square"}]
    _, info = ask(client, store.id, [{"role": "user", "content": own}], top_k=3)
    assert info["context_images"] == 1 and len(engine.seen[-1].images) == 3
    assert sum(d["image_dropped"] is not None for d in info["documents"]) == 2
    assert all("limits.max_images_per_request" in d["image_dropped"] for d in info["documents"][1:])


def test_a_text_only_model_gets_no_retrieved_image(serve):
    client, engine = serve(model={"name": "smol-lm"})  # registered as text only
    store = client.vector_stores.create(name="pictures")
    attach(client, store.id, "red-square.png", png_bytes((8, 8), RED))
    attach(client, store.id, "trains.txt", TRAINS)
    response, info = ask(client, store.id, [{"role": "user", "content": "Show me the red square"}])
    assert response.choices[0].message.content  # answered, not refused
    image_doc = next(d for d in info["documents"] if d["kind"] == "image")
    assert "reads text only" in image_doc["image_dropped"] and info["context_images"] == 0
    (request,) = engine.seen
    assert request.images == [] and request.messages[-1]["content"] == "Show me the red square"
    assert [c.metadata.get("kind") for c in request.retrieval.chunks] == [None]  # the text hit only


def test_a_retrieved_image_over_the_pixel_limit_is_left_out(serve):
    client, engine = serve(limits={"max_image_pixels": 32})  # the request's limits, not the file parser's
    store = client.vector_stores.create(name="pictures")
    attach(client, store.id, "red-square.png", png_bytes((8, 8), RED))
    _, info = ask(client, store.id, [{"role": "user", "content": "the red square"}], top_k=1)
    (doc,) = info["documents"]
    assert doc["kind"] == "image" and "more than the limit of 32" in doc["image_dropped"]
    assert info["context_images"] == 0 and engine.seen[-1].images == []


def test_new_attributes_rewrite_an_image_description(serve):
    client, _ = serve()
    store = client.vector_stores.create(name="pictures")
    image_id = attach(
        client, store.id, "IMG_0042.png", png_bytes(), {"description": "a lighthouse on a rocky coast at dusk"}
    )
    attach(client, store.id, "trains.txt", TRAINS)
    hits = client.vector_stores.search(store.id, query="lighthouse by the sea").data
    assert hits[0].file_id == image_id
    client.vector_stores.files.update(file_id=image_id, vector_store_id=store.id, attributes={"description": "ramen"})
    (hit,) = client.vector_stores.search(store.id, query="a bowl of ramen noodles", max_num_results=1).data
    assert hit.file_id == image_id and "ramen" in hit.content[0].text and "lighthouse" not in hit.content[0].text


def test_image_description_and_message_insertion():
    assert image_description("myHolidayPhoto_2021.JPG", {"a": "sunny", "b": 3, "c": True, "d": " "}) == (
        "Image: my Holiday Photo 2021 (myHolidayPhoto_2021.JPG)\na: sunny\nb: 3"
    )
    assert image_description("x.png", {}, "alt: a cat") == "Image: x (x.png)\nalt: a cat"
    messages, at = insert_retrieved_images([{"role": "system", "content": "s"}, {"role": "user", "content": ""}], ["c"])
    assert at == 0 and messages[1]["content"] == [{"type": "text", "text": "c"}, {"type": "image"}]
    with pytest.raises(ValueError):
        insert_retrieved_images([{"role": "system", "content": "s"}], ["c"])


class OneImageHit:
    """A retriever that finds one image document whose file is not in the Files API's store."""

    async def retrieve(self, options, query_text):
        from mmrag.serving.retrieval.protocol import RetrievalInfo, RetrievalResult, RetrievedChunk, RetrievedDocument

        metadata = {"kind": "image", "file_id": "file-0123456789abcdef01234567", "filename": "gone.png"}
        chunk = RetrievedChunk(id="c1", score=0.9, text="Image: gone (gone.png)", source="gone.png", metadata=metadata)
        document = RetrievedDocument(id="c1", score=0.9, source="gone.png", file_id=metadata["file_id"])
        return RetrievalResult(chunks=[chunk], info=RetrievalInfo(mode="text", documents=[document]))


def test_image_hits_only_from_vector_stores_and_a_missing_file_is_left_out(tmp_path):
    from mmrag.serving.pipeline import ChatPipeline, parse_chat_body
    from tests.fake_engine import FakeEngine

    config = MmragConfig.model_validate({"files": {"directory": str(tmp_path / "files")}})
    pipeline = ChatPipeline(config, LocalBackend(FakeEngine(config), OneImageHit()))

    def body(retrieval: dict) -> bytes:
        messages = [{"role": "user", "content": "the gone square"}]
        return json.dumps({"model": config.model.served_name, "messages": messages, "retrieval": retrieval}).encode()

    # A collection's chunk is text, whatever its metadata says: only vector-store files are image documents.
    prepared = asyncio.run(pipeline.prepare(parse_chat_body(body({"mode": "text"}))))
    assert [c.id for c in prepared.generation.retrieval.chunks] == ["c1"] and prepared.generation.images == []
    assert prepared.generation.retrieval.info.documents[0].kind == "text"
    # From a store: an image hit, left out (not an error) because its file is gone.
    prepared = asyncio.run(pipeline.prepare(parse_chat_body(body({"vector_store_ids": ["vs_1"]}))))
    (document,) = prepared.generation.retrieval.info.documents
    assert (document.kind, document.image_dropped) == ("image", "the file no longer exists")
    assert prepared.generation.retrieval.chunks == [] and prepared.generation.images == []
    assert prepared.generation.retrieval.info.context_images == 0


def test_file_search_lists_and_cites_a_retrieved_image(serve):
    from tests.responses.conftest import RagEchoEngine  # builds the text-RAG prompt as the vLLM engine does

    client, engine = serve(RagEchoEngine)
    store = client.vector_stores.create(name="pictures")
    image_id = attach(client, store.id, "red-square.png", png_bytes((8, 8), RED))
    text_id = attach(client, store.id, "trains.txt", TRAINS)
    model = client.models.list().data[0].id
    tool = {"type": "file_search", "vector_store_ids": [store.id], "max_num_results": 2}
    response = client.responses.create(
        model=model, input="Show me the red square", tools=[tool], include=["file_search_call.results"]
    )
    call, message = response.output
    assert [r.file_id for r in call.results] == [image_id, text_id]  # the search's order, the image included
    assert [a.file_id for a in message.content[0].annotations] == [image_id, text_id]  # both entered the prompt
    assert len(engine.seen[-1].images) == 1


def test_which_models_read_images(tmp_path):
    from mmrag.serving.models.registry import model_reads_images

    assert model_reads_images("smol", None) and not model_reads_images("smol-lm", None)  # the registry says
    llava, text = tmp_path / "llava", tmp_path / "text"
    for folder, checkpoint in ((llava, {"vision_config": {}, "text_config": {}}), (text, {"hidden_size": 64})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(checkpoint))
    assert model_reads_images("smol", str(llava)) and not model_reads_images("smol", str(text))
    assert model_reads_images("smol", str(tmp_path / "elsewhere"))  # not readable here: the engine decides


# -- the served model's own description, asked at ingestion --------------------------------------------------

DESCRIBE = {"image_descriptions": {"questions": ["zanzibar periwinkle"]}}  # the echo engine answers these words


class SlowToDescribe(RetrievalEchoEngine):
    """Answers chats at once and never finishes a description (until cancelled, which it records)."""

    cancelled = 0

    async def generate(self, request):
        if request.request_id.startswith("describe-"):
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                type(self).cancelled += 1
                raise
        async for delta in super().generate(request):
            yield delta


class BrokenDescriber(RetrievalEchoEngine):
    async def generate(self, request):
        if request.request_id.startswith("describe-"):
            raise RuntimeError("the engine fell over")
        async for delta in super().generate(request):
            yield delta


def test_the_model_describes_an_image_and_search_finds_it_by_that(serve):
    client, engine = serve(vector_stores=DESCRIBE)
    store = client.vector_stores.create(name="pictures")
    image_id = attach(client, store.id, "IMG_0042.png", png_bytes((8, 8), RED), {"place": "studio"})
    attach(client, store.id, "trains.txt", TRAINS)
    # The engine was asked once, greedy and bounded, with the image after "Image 1:" and the question.
    (asked,) = engine.seen
    assert asked.messages == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Image 1:"},
                {"type": "image"},
                {"type": "text", "text": "zanzibar periwinkle"},
            ],
        }
    ]
    assert asked.images[0].getpixel((0, 0)) == RED and asked.retrieval is None
    assert (asked.sampling.temperature, asked.sampling.max_tokens) == (0.0, 24)
    # Indexed by the answer too: a word only the model's description has finds the image.
    (hit,) = client.vector_stores.search(store.id, query="periwinkle", max_num_results=1).data
    assert hit.file_id == image_id
    assert hit.content[0].text.splitlines() == [
        "Image: IMG 0042 (IMG_0042.png)",
        "Model description: Image 1: zanzibar periwinkle",
        "place: studio",
    ]
    # New attributes rewrite the indexed text and keep the description, without asking the model again.
    client.vector_stores.files.update(file_id=image_id, vector_store_id=store.id, attributes={"place": "harbour"})
    (content,) = client.vector_stores.files.content(file_id=image_id, vector_store_id=store.id).data
    assert "zanzibar periwinkle" in content.text and "place: harbour" in content.text and len(engine.seen) == 1


def test_a_text_file_is_not_described(serve):
    client, engine = serve(vector_stores=DESCRIBE)
    store = client.vector_stores.create(name="notes")
    attach(client, store.id, "trains.txt", TRAINS)
    assert engine.seen == []


@pytest.mark.parametrize(
    ("engine_class", "settings", "logged"),
    [
        (SlowToDescribe, {"timeout_s": 0.5}, "no answer within 0.5 s (vector_stores.image_descriptions.timeout_s)"),
        (BrokenDescriber, {}, "RuntimeError: the engine fell over"),
    ],
)
def test_a_failed_description_leaves_the_name_and_says_why(serve, caplog, engine_class, settings, logged):
    caplog.set_level("WARNING", logger="mmrag.serving.vector_stores.describe")
    descriptions = {**DESCRIBE["image_descriptions"], **settings}
    client, _ = serve(engine_class, vector_stores={"image_descriptions": descriptions})
    store = client.vector_stores.create(name="pictures")
    image_id = attach(client, store.id, "red-square.png", png_bytes((8, 8), RED))  # completed all the same
    (hit,) = client.vector_stores.search(store.id, query="red square", max_num_results=1).data
    assert hit.file_id == image_id and hit.content[0].text == "Image: red square (red-square.png)"
    assert f"image red-square.png indexed without the model's description: {logged}" in caplog.text
    if engine_class is SlowToDescribe:
        assert SlowToDescribe.cancelled == 1  # the engine's request was cancelled, not left running


def test_a_text_only_model_is_not_asked(serve, caplog):
    caplog.set_level("INFO", logger="mmrag.serving.vector_stores.describe")
    client, engine = serve(model={"name": "smol-lm"}, vector_stores=DESCRIBE)
    store = client.vector_stores.create(name="pictures")
    attach(client, store.id, "red-square.png", png_bytes((8, 8), RED))
    assert engine.seen == [] and "the served model (smol-lm) reads text only" in caplog.text


def test_description_questions_by_model():
    from mmrag.serving.vector_stores.config import ImageDescriptionsConfig
    from mmrag.serving.vector_stores.describe import clean_answer

    default = ImageDescriptionsConfig()
    assert default.resolved_questions("smol") == ("What colour is the shape in Image 1?", "What shape is in Image 1?")
    assert default.resolved_questions("tiny-llava") == ("Describe Image 1 in one short sentence.",)
    assert ImageDescriptionsConfig(questions=["What is it?"]).resolved_questions("smol") == ("What is it?",)
    assert clean_answer("  A red\n circle.  ") == "A red circle" and clean_answer(" . ") == ""
    with pytest.raises(ValueError):
        MmragConfig.model_validate({"vector_stores": {"image_descriptions": {"questions": []}}})
