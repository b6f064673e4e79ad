"""Documents in while the default server runs, as a user adds them: the real ``openai`` SDK uploads a PDF, an
HTML page, a Markdown file and a PNG to ``/v1/files``, attaches them to a vector store (indexed by the
retriever replica into Milvus Lite), searches it, and asks the served model (smol) about them."""

from __future__ import annotations

import io

import pytest

from tests.files.documents import pdf_bytes, png_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "smol"
# Invented facts (the model cannot know them): file name -> (bytes, question, words the answer must contain).
DOCUMENTS = {
    "harbour-rules.pdf": (
        pdf_bytes(["The tide gates of Velmora harbour open at 5:40 every morning."], title="Harbour rules"),
        "At what time do the tide gates of Velmora harbour open?",
        "5:40",
    ),
    "festival.html": (
        b"<html><head><title>Festival</title></head><body><p>The Quillon lantern festival is held in the town "
        b"of Ashgrove.</p><script>var hidden = 'not text';</script></body></html>",
        "In which town is the Quillon lantern festival held?",
        "Ashgrove",
    ),
    "moss-library.md": (
        b"# Moss library\n\nThe Dunmere moss library lends 312 living moss samples to its readers.\n",
        "How many living moss samples does the Dunmere moss library lend?",
        "312",
    ),
    "red-square.png": (png_bytes((16, 16), (220, 20, 20)), None, None),
}


@pytest.fixture(scope="module")
def store(default_client):
    client = default_client
    store = client.vector_stores.create(name="e2e-documents")
    files = {}
    for name, (data, _, _) in DOCUMENTS.items():
        uploaded = client.files.create(file=(name, io.BytesIO(data)), purpose="assistants")
        attached = client.vector_stores.files.create_and_poll(file_id=uploaded.id, vector_store_id=store.id)
        assert attached.status == "completed", (name, attached.last_error)
        files[name] = uploaded.id
    yield store, files
    client.vector_stores.delete(store.id)


def test_each_document_is_found_by_a_question_about_it(default_client, store):
    store, files = store
    for name, (_, question, _) in DOCUMENTS.items():
        if question is None:
            continue
        hits = default_client.vector_stores.search(store.id, query=question, max_num_results=2).data
        assert hits and hits[0].file_id == files[name], (name, [(h.filename, h.score) for h in hits])
        assert hits[0].filename == name


def test_the_model_answers_from_the_store_and_names_the_file(default_client, store):
    store, files = store
    for name, (_, question, expected) in DOCUMENTS.items():
        if question is None:
            continue
        response = default_client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": question}],
            max_tokens=48,
            temperature=0,
            extra_body={"retrieval": {"vector_store_ids": [store.id], "top_k": 2}},
        )
        documents = response.model_extra["retrieval"]["documents"]
        assert files[name] in [d["file_id"] for d in documents], documents
        assert expected.lower() in response.choices[0].message.content.lower(), (question, response.choices[0])


def test_a_corrupt_pdf_ends_failed_with_its_reason(default_client, store):
    store, _ = store
    broken = default_client.files.create(file=("broken.pdf", io.BytesIO(b"%PDF-1.7\n1 0 obj <<")), purpose="assistants")
    attached = default_client.vector_stores.files.create_and_poll(file_id=broken.id, vector_store_id=store.id)
    assert attached.status == "failed" and attached.last_error is not None
    assert "broken.pdf" in attached.last_error.message


def test_a_deleted_file_leaves_search(default_client, store):
    store, files = store
    question = DOCUMENTS["moss-library.md"][1]
    default_client.vector_stores.files.delete(file_id=files["moss-library.md"], vector_store_id=store.id)
    hits = default_client.vector_stores.search(store.id, query=question, max_num_results=5).data
    assert files["moss-library.md"] not in [h.file_id for h in hits]
