"""The Vector Stores API through the real `openai` SDK: stores, attachments, polling, search, filters,
deletion, errors, restart after a crash mid-ingestion, and chat with `retrieval.vector_store_ids`."""

from __future__ import annotations

import openai
import pytest

from mmrag.serving.vector_stores.service import INTERRUPTED, VectorStoreService
from tests.vector_stores.conftest import MODEL, close_stage

DOCS = {
    "herons.md": b"# Herons\n\nThe grey heron of Vellmora nests in reed beds and eats mostly small fish.\n",
    "trains.txt": b"The Harrowgate funicular opened in 1898 and climbs 212 metres up the cliff.\n",
    "cheese.html": b"<html><body><p>Blue Gorse cheese ages for fourteen weeks in limestone caves.</p></body></html>",
}
ATTRIBUTES = {
    "herons.md": {"topic": "birds", "year": 2019, "public": True},
    "trains.txt": {"topic": "rail", "year": 1898, "public": True},
    "cheese.html": {"topic": "food", "year": 2023, "public": False},
}


def upload(client: openai.OpenAI, name: str, data: bytes | None = None) -> str:
    return client.files.create(file=(name, data if data is not None else DOCS[name]), purpose="assistants").id


@pytest.fixture
def filled(client):
    """A store with the three documents attached (and indexed), with attributes; returns (store id, file ids)."""
    store = client.vector_stores.create(name="facts", metadata={"team": "docs"})
    ids = {}
    for name in DOCS:
        ids[name] = upload(client, name)
        attached = client.vector_stores.files.create_and_poll(
            file_id=ids[name], vector_store_id=store.id, attributes=ATTRIBUTES[name]
        )
        assert attached.status == "completed", attached.last_error
    return store.id, ids


def search(client, store_id, query, **kwargs):
    return client.vector_stores.search(store_id, query=query, **kwargs).data


def test_create_attach_poll_and_search(client, filled):
    store_id, ids = filled
    store = client.vector_stores.retrieve(store_id)
    assert (store.name, store.metadata, store.status) == ("facts", {"team": "docs"}, "completed")
    assert store.file_counts.completed == store.file_counts.total == 3 and store.usage_bytes > 0
    attached = client.vector_stores.files.retrieve(ids["herons.md"], vector_store_id=store_id)
    assert attached.attributes == {"topic": "birds", "year": 2019, "public": True}
    assert attached.chunking_strategy.type == "static" and attached.usage_bytes > 0
    hits = search(client, store_id, "Which bird nests in reed beds?")
    assert hits[0].file_id == ids["herons.md"] and hits[0].filename == "herons.md"
    assert "grey heron" in hits[0].content[0].text and hits[0].content[0].type == "text"
    assert hits[0].attributes["topic"] == "birds"
    assert search(client, store_id, "cheese aged in caves")[0].filename == "cheese.html"  # parsed HTML
    # A list of queries, a result cap and a score threshold.
    hits = search(client, store_id, ["funicular opening year", "heron"], max_num_results=2)
    assert {h.filename for h in hits} == {"trains.txt", "herons.md"}
    assert search(client, store_id, "heron", ranking_options={"score_threshold": 0.99}) == []
    listed = client.vector_stores.files.list(store_id, order="asc")
    assert [f.id for f in listed.data] == list(ids.values())
    page = client.vector_stores.files.list(store_id, limit=2, order="asc")
    assert page.has_more and [f.id for f in page.get_next_page().data] == [ids["cheese.html"]]


def test_store_list_update_and_delete(client, filled):
    store_id, _ = filled
    other = client.vector_stores.create(name="empty", expires_after={"anchor": "last_active_at", "days": 7})
    assert other.status == "completed" and other.file_counts.total == 0 and other.expires_at is not None
    assert [s.id for s in client.vector_stores.list().data] == [other.id, store_id]
    updated = client.vector_stores.update(store_id, name="renamed", metadata={"team": "ops"})
    assert (updated.name, updated.metadata) == ("renamed", {"team": "ops"})
    deleted = client.vector_stores.delete(store_id)
    assert deleted.deleted and deleted.object == "vector_store.deleted"
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve(store_id)
    assert [s.id for s in client.vector_stores.list().data] == [other.id]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"type": "eq", "key": "topic", "value": "rail"}, {"trains.txt"}),
        ({"type": "ne", "key": "topic", "value": "rail"}, {"herons.md", "cheese.html"}),
        ({"type": "gte", "key": "year", "value": 2019}, {"herons.md", "cheese.html"}),
        ({"type": "lt", "key": "year", "value": 1900.5}, {"trains.txt"}),
        ({"type": "in", "key": "topic", "value": ["birds", "food"]}, {"herons.md", "cheese.html"}),
        ({"type": "nin", "key": "topic", "value": ["birds", "food"]}, {"trains.txt"}),
        ({"type": "eq", "key": "public", "value": False}, {"cheese.html"}),
        (
            {
                "type": "or",
                "filters": [
                    {
                        "type": "and",
                        "filters": [
                            {"type": "eq", "key": "public", "value": True},
                            {"type": "gt", "key": "year", "value": 2000},
                        ],
                    },
                    {"type": "eq", "key": "topic", "value": "food"},
                ],
            },
            {"herons.md", "cheese.html"},
        ),
        ({"type": "eq", "key": 'we"ird\\key', "value": 'x" or 1 == 1 or "'}, set()),  # quoted, not injected
    ],
)
def test_attribute_filters(client, filled, filters, expected):
    store_id, _ = filled
    hits = search(client, store_id, "what happened", filters=filters, max_num_results=10)
    assert {h.filename for h in hits} == expected
    assert all(h.attributes == ATTRIBUTES[h.filename] for h in hits)


def test_update_file_attributes_reach_filters(client, filled):
    store_id, ids = filled
    updated = client.vector_stores.files.update(
        ids["trains.txt"], vector_store_id=store_id, attributes={"topic": "history"}
    )
    assert updated.attributes == {"topic": "history"}
    hits = search(client, store_id, "funicular", filters={"type": "eq", "key": "topic", "value": "history"})
    assert [h.filename for h in hits] == ["trains.txt"] and hits[0].attributes == {"topic": "history"}


def test_deleting_a_file_removes_it_from_search(client, filled):
    store_id, ids = filled
    assert search(client, store_id, "funicular 1898")[0].file_id == ids["trains.txt"]
    deleted = client.vector_stores.files.delete(ids["trains.txt"], vector_store_id=store_id)
    assert deleted.deleted and deleted.object == "vector_store.file.deleted"
    hits = search(client, store_id, "funicular 1898", max_num_results=10)
    assert ids["trains.txt"] not in {h.file_id for h in hits} and len(hits) == 2
    assert client.vector_stores.retrieve(store_id).file_counts.total == 2
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.retrieve(ids["trains.txt"], vector_store_id=store_id)
    # Attached again, it is searchable again; the file itself (Files API) was never touched.
    again = client.vector_stores.files.create_and_poll(file_id=ids["trains.txt"], vector_store_id=store_id)
    assert again.status == "completed"
    assert search(client, store_id, "funicular 1898")[0].file_id == ids["trains.txt"]


def test_stores_do_not_see_each_other(client, filled):
    _, ids = filled
    other = client.vector_stores.create(name="other")
    client.vector_stores.files.create_and_poll(file_id=ids["herons.md"], vector_store_id=other.id)
    assert {h.filename for h in search(client, other.id, "funicular cheese heron", max_num_results=10)} == {"herons.md"}


@pytest.mark.parametrize(
    "filters",
    [
        {"type": "like", "key": "topic", "value": "x"},
        {"type": "eq", "key": "", "value": "x"},
        {"type": "gt", "key": "year", "value": "2000"},
        {"type": "in", "key": "topic", "value": "birds"},
        {"type": "in", "key": "topic", "value": [True]},
        {"type": "eq", "key": "topic", "value": "a\x00b"},
        {"type": "eq", "key": "topic", "value": {"nested": 1}},
        {"type": "and", "filters": []},
        {"type": "eq", "key": "topic", "value": "x", "extra": 1},
        "topic == 'x'",
    ],
)
def test_bad_filters_are_400_naming_filters(client, filled, filters):
    store_id, _ = filled
    with pytest.raises(openai.BadRequestError) as caught:
        search(client, store_id, "q", filters=filters)
    assert caught.value.body["param"] == "filters"


def test_deeply_nested_filter_is_400(client, filled):
    store_id, _ = filled
    node = {"type": "eq", "key": "topic", "value": "x"}
    for _ in range(50):
        node = {"type": "and", "filters": [node]}
    with pytest.raises(openai.BadRequestError) as caught:
        search(client, store_id, "q", filters=node)
    assert caught.value.body["param"] == "filters" and "nest" in caught.value.body["message"]


def test_bad_requests_are_400_naming_the_field(client, filled):
    store_id, ids = filled
    cases = [
        (lambda: search(client, store_id, "q", max_num_results=51), "max_num_results"),
        (lambda: search(client, store_id, "q", rewrite_query=True), "rewrite_query"),
        (lambda: search(client, store_id, ""), "query"),
        (lambda: client.vector_stores.create(metadata={f"k{i}": "v" for i in range(17)}), "metadata"),
        (
            lambda: client.vector_stores.files.create(
                vector_store_id=store_id,
                file_id=ids["herons.md"],
                chunking_strategy={
                    "type": "static",
                    "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 60},
                },
            ),
            "chunking_strategy.static",
        ),
        (lambda: client.vector_stores.files.list(store_id, limit=0), "limit"),
        (lambda: client.vector_stores.files.list(store_id, after="file-nope"), "after"),
        (lambda: client.vector_stores.create(extra_body={"colour": "red"}), "colour"),
    ]
    for call, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert caught.value.body["param"] == param, caught.value.body


def test_unknown_ids_are_404(client, filled):
    store_id, ids = filled
    calls = [
        (lambda: client.vector_stores.retrieve("vs_nope"), "vector_store_id"),
        (lambda: client.vector_stores.delete("vs_nope"), "vector_store_id"),
        (lambda: search(client, "vs_nope", "q"), "vector_store_id"),
        (lambda: client.vector_stores.files.retrieve("file-nope", vector_store_id=store_id), "file_id"),
        (lambda: client.vector_stores.files.create(vector_store_id=store_id, file_id="file-nope"), "file_id"),
        (lambda: client.vector_stores.create(file_ids=[ids["herons.md"], "file-nope"]), "file_ids[1]"),
        (lambda: client.vector_stores.file_batches.retrieve("vsfb_nope", vector_store_id=store_id), "batch_id"),
        (lambda: client.vector_stores.file_batches.create(store_id, file_ids=["file-nope"]), "file_ids[0]"),
    ]
    for call, param in calls:
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.body["param"] == param, caught.value.body
    assert [s.name for s in client.vector_stores.list().data] == ["facts"]  # the refused create made nothing


def test_file_batch_and_chunking_strategy(client):
    store = client.vector_stores.create(name="batch")
    file_ids = [upload(client, name) for name in DOCS]
    static = {"type": "static", "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400}}
    batch = client.vector_stores.file_batches.create_and_poll(
        store.id, file_ids=file_ids, attributes={"kind": "batch"}, chunking_strategy=static
    )
    assert (
        batch.status == "completed" and batch.file_counts.completed == 3 and batch.object == "vector_store.files_batch"
    )
    files = client.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id).data
    assert sorted(f.id for f in files) == sorted(file_ids)
    # 800 tokens do not fit MiniLM (256): scaled to what it embeds, overlap in proportion, and said so.
    sizes = files[0].chunking_strategy.static
    assert sizes.max_chunk_size_tokens < 800 and sizes.chunk_overlap_tokens == sizes.max_chunk_size_tokens // 2
    assert all(f.attributes == {"kind": "batch"} for f in files)
    # Created with file_ids, a store indexes them itself.
    direct = client.vector_stores.create(name="direct", file_ids=file_ids[:1])
    attached = client.vector_stores.files.poll(file_ids[0], vector_store_id=direct.id)
    assert attached.status == "completed"


def test_unreadable_files_fail_with_a_reason(client):
    store = client.vector_stores.create(name="bad")
    corrupt = upload(client, "report.pdf", b"%PDF-1.7\nthis is not really a pdf")
    binary = upload(client, "blob.bin", b"\x00\x01\x02binary")
    for file_id in (corrupt, binary):
        attached = client.vector_stores.files.create_and_poll(file_id=file_id, vector_store_id=store.id)
        assert attached.status == "failed" and attached.last_error.message
        assert attached.last_error.code in ("invalid_file", "unsupported_file")
    assert client.vector_stores.retrieve(store.id).file_counts.failed == 2
    assert client.vector_stores.files.list(store.id, filter="failed").data[0].status == "failed"


def test_an_interrupted_attachment_is_failed_at_restart(client, config, stage, make_stage, monkeypatch):
    """A crash after some chunks were written, before the file was marked completed: a new retriever marks it
    failed ("interrupted") and deletes its chunks; search never returns them, before or after."""
    store = client.vector_stores.create(name="crash")
    file_id = upload(client, "herons.md")

    def crash_after_writing(self, store_id, file_id, chunk_tokens, overlap):
        self._write_chunks(store_id, file_id, chunk_tokens, overlap)  # written and flushed, then the process "dies"

    monkeypatch.setattr(VectorStoreService, "_ingest", crash_after_writing)
    attached = client.vector_stores.files.create(file_id=file_id, vector_store_id=store.id)
    assert attached.status == "in_progress"
    service = stage.vector_stores
    service._pool.shutdown(wait=True)  # the chunks are in Milvus now
    expr = f'file_id == "{file_id}"'
    assert service._store().count_where(service.collection, expr) > 0
    assert search(client, store.id, "grey heron reed beds") == []  # an in-progress file is never searched
    monkeypatch.undo()
    close_stage(stage)  # the old process is gone (its job never finished)

    restarted = make_stage(config)  # records exist: swept at start
    service = restarted.vector_stores
    row = service.get_file(store.id, file_id)
    assert row["status"] == "failed" and row["last_error"] == {"code": "server_error", "message": INTERRUPTED}
    assert service._store().count_where(service.collection, expr) == 0
    assert service.get_store(store.id)["file_counts"]["failed"] == 1
    # Attaching it again indexes it whole.
    from mmrag.serving.vector_stores import protocol as p

    service.attach_file(store.id, p.AttachFile(file_id=file_id))
    service._pool.shutdown(wait=True)
    assert service.get_file(store.id, file_id)["status"] == "completed"
    assert service.search(store.id, p.Search(query="grey heron"))["data"][0]["file_id"] == file_id


def test_chat_with_vector_store_ids(client, filled, engine):
    store_id, ids = filled
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "When did the Harrowgate funicular open?"}],
        extra_body={"retrieval": {"vector_store_ids": [store_id], "top_k": 2}},
    )
    documents = response.model_extra["retrieval"]["documents"]
    assert documents[0]["file_id"] == ids["trains.txt"] and documents[0]["filename"] == "trains.txt"
    assert documents[0]["source"] == "trains.txt" and len(documents) == 2
    (request,) = engine.seen
    assert "funicular opened in 1898" in request.retrieval.chunks[0].text
    # The request's own filter narrows the stores' search further.
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "When did the Harrowgate funicular open?"}],
        extra_body={
            "retrieval": {"vector_store_ids": [store_id], "filter": 'metadata["attributes"]["topic"] == "food"'}
        },
    )
    assert {d["filename"] for d in response.model_extra["retrieval"]["documents"]} == {"cheese.html"}


def test_chat_with_unknown_vector_store_is_404(client, filled):
    store_id, _ = filled
    for retrieval, status, param in [
        ({"vector_store_ids": [store_id, "vs_nope"]}, 404, "retrieval.vector_store_ids"),
        ({"vector_store_ids": []}, 400, "retrieval.vector_store_ids"),
        ({"vector_store_ids": [store_id], "collection": "mmrag_docs"}, 400, "retrieval"),
    ]:
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "q"}], extra_body={"retrieval": retrieval}
            )
        assert (caught.value.status_code, caught.value.body["param"]) == (status, param), caught.value.body


def test_pdf_and_image_files_and_a_file_content(client):
    from tests.files.documents import pdf_bytes, png_bytes

    store = client.vector_stores.create(name="formats")
    pdf = upload(
        client, "atlas.pdf", pdf_bytes(["The Kessel Span bridge is 412 metres long.", "Its toll is two silver coins."])
    )
    png = upload(client, "red-square-diagram.png", png_bytes((16, 16)))
    locked = upload(client, "locked.pdf", pdf_bytes(["secret"], password="pw"))
    for file_id, status in [(pdf, "completed"), (png, "completed"), (locked, "failed")]:
        attached = client.vector_stores.files.create_and_poll(file_id=file_id, vector_store_id=store.id)
        assert attached.status == status, attached.last_error
    assert "encrypt" in attached.last_error.message.lower()
    assert search(client, store.id, "toll of the Kessel Span")[0].file_id == pdf
    # Found by its name (the echo engine's "description" repeats the question it was asked).
    assert search(client, store.id, "red square diagram")[0].file_id == png
    pages = [part.text for part in client.vector_stores.files.content(pdf, vector_store_id=store.id)]
    assert pages == ["The Kessel Span bridge is 412 metres long.", "Its toll is two silver coins."]
    assert list(client.vector_stores.files.content(locked, vector_store_id=store.id)) == []


def test_malformed_bodies_are_4xx_in_openai_shape(http, filled):
    store_id, ids = filled
    routes = [
        "/v1/vector_stores",
        f"/v1/vector_stores/{store_id}",
        f"/v1/vector_stores/{store_id}/files",
        f"/v1/vector_stores/{store_id}/files/{ids['herons.md']}",
        f"/v1/vector_stores/{store_id}/file_batches",
        f"/v1/vector_stores/{store_id}/search",
    ]
    bodies = [
        b"not json",
        b"[1, 2]",
        b'{"no_such_field": 1}',
        b'{"a": ' * 3000 + b"1" + b"}" * 3000,
        b'{"query": "\\ud800", "file_id": "\\ud800", "name": "\\ud800"}',
        b'{"query": ["q"], "filters": ' + b'{"type": "and", "filters": [' * 300 + b"]}" * 300 + b"}",
        b"x" * (2 << 20),
    ]
    for route in routes:
        for body in bodies:
            response = http.post(route, content=body, headers={"content-type": "application/json"})
            assert 400 <= response.status_code < 500, (route, body[:40], response.status_code, response.text[:300])
            error = response.json()["error"]
            assert error["message"] and error["type"] == "invalid_request_error", (route, body[:40], error)
    # Nothing above changed the store.
    assert http.get(f"/v1/vector_stores/{store_id}").json()["file_counts"]["completed"] == 3


def test_lone_surrogates_are_400(http, filled):
    store_id, ids = filled
    for route, body in [
        ("/v1/vector_stores", b'{"name": "\\ud800"}'),
        (f"/v1/vector_stores/{store_id}/search", b'{"query": "\\ud800"}'),
        (f"/v1/vector_stores/{store_id}/search", b'{"query": ["ok", "\\udfffx"]}'),
        (f"/v1/vector_stores/{store_id}/files/{ids['herons.md']}", b'{"attributes": {"\\ud800": 1}}'),
    ]:
        response = http.post(route, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, (route, body, response.text)
        assert "surrogate" in response.json()["error"]["message"]
    # A pair is one character, and fine.
    response = http.post(f"/v1/vector_stores/{store_id}/search", json={"query": "heron \U0001f426"})
    assert response.status_code == 200


def test_deleting_a_file_or_store_while_it_is_indexed(client, stage, monkeypatch):
    """A delete during indexing hides the file at once; the job stops, and its chunks and records go."""
    import threading

    from mmrag.serving.vector_stores.sources import FileSource

    release = threading.Event()
    sections = FileSource.sections

    def held(self, file_id):
        release.wait(30)
        return sections(self, file_id)

    monkeypatch.setattr(FileSource, "sections", held)
    service = stage.vector_stores
    store = client.vector_stores.create(name="race")
    file_id = upload(client, "herons.md")
    assert client.vector_stores.files.create(file_id=file_id, vector_store_id=store.id).status == "in_progress"
    client.vector_stores.files.delete(file_id, vector_store_id=store.id)
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.retrieve(file_id, vector_store_id=store.id)
    other = client.vector_stores.create(name="race-store")
    client.vector_stores.files.create(file_id=file_id, vector_store_id=other.id)
    client.vector_stores.delete(other.id)
    release.set()
    service._pool.shutdown(wait=True)
    assert service._store().count_where(service.collection, f'file_id == "{file_id}"') == 0
    assert service.records.all("SELECT * FROM files") == []
    assert [s["id"] for s in service.records.all("SELECT id FROM stores")] == [store.id]


def test_a_second_process_on_the_records_only_reads(client, config, stage, make_stage, monkeypatch):
    """A batch job (or any second retriever) on the same records must not fail the server's in-progress files
    as interrupted, nor index: it reads (chat scopes, listings) and answers 503 to writes."""
    import threading

    from mmrag.serving.errors import ServiceUnavailableError
    from mmrag.serving.vector_stores import protocol as p
    from mmrag.serving.vector_stores.sources import FileSource

    release = threading.Event()
    sections = FileSource.sections
    monkeypatch.setattr(FileSource, "sections", lambda self, file_id: release.wait(30) and sections(self, file_id))
    store = client.vector_stores.create(name="owned")
    file_id = upload(client, "herons.md")
    client.vector_stores.files.create(file_id=file_id, vector_store_id=store.id)

    reader = make_stage(config).vector_stores  # the records exist: made at start, and not their owner
    assert stage.vector_stores.owner and not reader.owner
    assert reader.get_file(store.id, file_id)["status"] == "in_progress"  # not "interrupted"
    assert reader.chat_scope([store.id])[0] == reader.collection
    with pytest.raises(ServiceUnavailableError):
        reader.create_store(p.CreateStore(name="no"))
    release.set()
    stage.vector_stores._pool.shutdown(wait=True)
    assert reader.get_file(store.id, file_id)["status"] == "completed"


def test_a_huge_unbroken_word_is_indexed_cut(client):
    """One 'token' 100,000 characters long (an unknown word) would overflow Milvus's text field: it is cut."""
    store = client.vector_stores.create(name="long")
    file_id = upload(client, "long.txt", b"start " + b"a" * 100_000 + b" end " + "\u00e9t\u00e9 ".encode() * 20_000)
    attached = client.vector_stores.files.create_and_poll(file_id=file_id, vector_store_id=store.id)
    assert attached.status == "completed", attached.last_error
    texts = [part.text for part in client.vector_stores.files.content(file_id, vector_store_id=store.id)]
    assert texts and max(len(t.encode()) for t in texts) <= 60_000
