"""/v1/files over the real app (fake engine) with the real `openai` SDK as the client, and the FileStore
underneath: upload, list (pagination, purpose, order), retrieve, content, delete, limits and bad input."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import openai
import pytest
from fastapi.testclient import TestClient

from mmrag.serving.config import MmragConfig
from mmrag.serving.files.config import FilesConfig
from mmrag.serving.files.store import FileStore, safe_filename
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from tests.fake_engine import FakeEngine
from tests.files.documents import pdf_bytes

LIMIT = 4096


def make_app(tmp_path, files=None, **server):
    config = MmragConfig.model_validate(
        {
            "retrieval": {"default_mode": "none"},
            "files": {"directory": str(tmp_path / "files"), "max_file_bytes": LIMIT, **(files or {})},
            "server": server,
        }
    )
    return create_app(config, LocalBackend(FakeEngine(config)))


@pytest.fixture
def http(tmp_path):
    with TestClient(make_app(tmp_path)) as client:
        yield client


@pytest.fixture
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_upload_retrieve_content_list_delete_with_the_sdk(client, tmp_path):
    pdf = pdf_bytes(["The grey heron nests in reeds."])
    created = client.files.create(file=("herons.pdf", pdf), purpose="assistants")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.bytes, created.filename, created.purpose, created.status) == (
        len(pdf),
        "herons.pdf",
        "assistants",
        "processed",
    )
    assert abs(created.created_at - time.time()) < 600
    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).read() == pdf
    assert [f.id for f in client.files.list()] == [created.id]
    # Durable: the bytes and the sidecar are on disk under the configured directory.
    folder = tmp_path / "files" / created.id
    assert (folder / "content").read_bytes() == pdf
    assert json.loads((folder / "file.json").read_text())["file"]["filename"] == "herons.pdf"

    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "file")
    assert not folder.exists()
    assert list(client.files.list()) == []
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)


def test_list_pages_orders_and_filters(client):
    ids = [client.files.create(file=(f"f{i}.txt", b"x"), purpose="user_data").id for i in range(5)]
    batch = client.files.create(file=("b.jsonl", b"{}"), purpose="batch").id
    newest_first = [*ids, batch][::-1]
    page = client.files.list(limit=2)
    assert [f.id for f in page.data] == newest_first[:2] and page.has_more is True
    # The SDK follows `after` through every page.
    assert [f.id for f in client.files.list(limit=2)] == newest_first
    assert [f.id for f in client.files.list(order="asc")] == [*ids, batch]
    assert [f.id for f in client.files.list(purpose="batch")] == [batch]
    last = client.files.list(limit=10, after=newest_first[3])
    assert [f.id for f in last.data] == newest_first[4:] and last.has_more is False


def test_list_answers_openais_shape(http, client):
    created = client.files.create(file=("a.txt", b"hello"), purpose="user_data")
    body = http.get("/v1/files").json()
    assert body["object"] == "list" and body["has_more"] is False
    assert body["first_id"] == body["last_id"] == created.id
    assert body["data"][0] == created.model_dump()


def test_upload_past_the_size_limit_is_a_413_and_keeps_nothing(client, http, tmp_path):
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("big.bin", b"x" * (LIMIT + 1)), purpose="user_data")
    assert caught.value.status_code == 413
    error = caught.value.body
    assert error["param"] == "file" and error["code"] == "file_too_large" and str(LIMIT) in error["message"]
    # Exactly at the limit is accepted.
    assert client.files.create(file=("fits.bin", b"x" * LIMIT), purpose="user_data").bytes == LIMIT
    # A declared body far past the limit is refused before it is read.
    response = http.post(
        "/v1/files",
        content=b"x" * 10,
        headers={"content-type": "multipart/form-data; boundary=b", "content-length": str(LIMIT * 1000)},
    )
    assert response.status_code == 413 and error_of(response)["param"] == "file"
    assert list((tmp_path / "files" / ".staging").iterdir()) == []
    assert len([p for p in (tmp_path / "files").iterdir() if p.name.startswith("file-")]) == 1


def test_bad_purpose_and_missing_fields_are_400s_naming_the_field(client, http):
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("a.txt", b"x"), purpose="nonsense")
    assert caught.value.body["param"] == "purpose" and "user_data" in caught.value.body["message"]
    response = http.post("/v1/files", files={"file": ("a.txt", b"x")})
    assert response.status_code == 400 and error_of(response)["param"] == "purpose"
    response = http.post("/v1/files", data={"purpose": "user_data"}, files={"other": ("a.txt", b"x")})
    assert response.status_code == 400 and error_of(response)["param"] == "other"
    response = http.post("/v1/files", data={"purpose": "user_data"})
    assert response.status_code == 400 and error_of(response)["param"] == "file"
    response = http.post("/v1/files", json={"file": "x", "purpose": "user_data"})
    assert response.status_code == 400 and "multipart/form-data" in error_of(response)["message"]
    response = http.post(
        "/v1/files", content=b"--b\r\nnot a part", headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 400 and error_of(response)["param"] == "file"
    response = http.post("/v1/files", data={"purpose": "x" * 5000}, files={"file": ("a.txt", b"x")})
    assert response.status_code == 400 and error_of(response)["param"] == "purpose"


def test_bad_list_parameters_are_400s_naming_them(http):
    for params, param in [({"limit": "abc"}, "limit"), ({"limit": 0}, "limit"), ({"order": "up"}, "order")]:
        response = http.get("/v1/files", params=params)
        assert response.status_code == 400 and error_of(response)["param"] == param, response.text
    response = http.get("/v1/files", params={"after": "file-000000000000000000000000"})
    assert response.status_code == 400 and error_of(response)["param"] == "after"


@pytest.mark.parametrize("file_id", ["file-000000000000000000000000", "nope", "FILE-ABC", "file-" + "0" * 23 + "g"])
def test_unknown_id_is_a_404_naming_file_id(client, http, file_id):
    for call in (client.files.retrieve, client.files.delete, client.files.content):
        with pytest.raises(openai.NotFoundError) as caught:
            call(file_id)
        assert caught.value.body["param"] == "file_id" and caught.value.body["code"] == "file_not_found"


def test_encoded_traversal_in_the_id_finds_nothing(http, tmp_path):
    (tmp_path / "secret").write_text("do not serve")
    paths = ("/v1/files/..%2F..%2Fsecret/content", "/v1/files/%2E%2E/content", "/v1/files/.staging/content")
    for path in (*paths, "/v1/files/file-../../secret"):
        response = http.get(path)
        assert response.status_code == 404, (path, response.text)
        assert "do not serve" not in response.text


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\win.ini", "win.ini"),
        ("/abs/path/report.pdf", "report.pdf"),
        ("..", "upload"),
        ("é" * 200 + ".md", "é" * 126 + ".md"),  # 255 UTF-8 bytes, the extension kept
    ],
)
def test_client_file_names_are_sanitised_and_never_paths(client, tmp_path, sent, kept):
    created = client.files.create(file=(sent, b"data"), purpose="user_data")
    assert created.filename == kept
    assert sorted(p.name for p in (tmp_path / "files" / created.id).iterdir()) == ["content", "file.json"]
    assert not (tmp_path / "etc").exists() and not (tmp_path / "passwd").exists()


def test_control_characters_in_a_raw_file_name_are_dropped(http):
    body = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a\x01b\x7fc\tz.txt"\r\n\r\ndata\r\n--b--\r\n'
    )
    response = http.post("/v1/files", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "abcz.txt"


def test_content_download_names_the_file_and_survives_a_delete(http, client):
    created = client.files.create(file=("notes ü.md", b"# title\n" * 500), purpose="user_data")
    with http.stream("GET", f"/v1/files/{created.id}/content") as response:
        assert response.headers["content-disposition"] == "attachment; filename*=utf-8''notes%20%C3%BC.md"
        assert int(response.headers["content-length"]) == created.bytes
        client.files.delete(created.id)  # the open download keeps reading the bytes it started on
        assert response.read() == b"# title\n" * 500


def test_api_keys_scope_files_to_the_key_that_uploaded_them(tmp_path):
    with TestClient(make_app(tmp_path, api_keys=["key-a", "key-b"])) as http:
        a, b = (openai.OpenAI(base_url="http://testserver/v1", api_key=k, http_client=http) for k in ("key-a", "key-b"))
        mine = a.files.create(file=("a.txt", b"a's"), purpose="user_data")
        assert [f.id for f in a.files.list()] == [mine.id]
        assert list(b.files.list()) == []
        for call in (b.files.retrieve, b.files.content, b.files.delete):
            with pytest.raises(openai.NotFoundError):
                call(mine.id)
        assert a.files.retrieve(mine.id).id == mine.id
        anonymous = http.get("/v1/files")
        assert anonymous.status_code == 401
        # The sidecar keeps a digest of the key, never the key.
        assert "key-a" not in (tmp_path / "files" / mine.id / "file.json").read_text()


def test_expires_after_sets_expires_at_and_an_expired_file_is_gone(client, tmp_path):
    created = client.files.create(
        file=("t.txt", b"x"), purpose="user_data", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert created.expires_at == pytest.approx(created.created_at + 3600, abs=5)
    with pytest.raises(openai.BadRequestError) as caught:
        too_soon = {"anchor": "created_at", "seconds": 5}
        client.files.create(file=("t.txt", b"x"), purpose="user_data", expires_after=too_soon)
    assert caught.value.body["param"] == "expires_after.seconds"
    # Move the expiry into the past on disk: the file is then reported missing and removed.
    sidecar = tmp_path / "files" / created.id / "file.json"
    record = json.loads(sidecar.read_text())
    record["file"]["expires_at"] = int(time.time()) - 1
    sidecar.write_text(json.dumps(record))
    assert list(client.files.list()) == []
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    assert not sidecar.parent.exists()


def test_store_api_for_other_callers(tmp_path):
    store = FileStore(FilesConfig(directory=str(tmp_path / "store"), max_file_bytes=100))
    a = store.create("a.txt", "user_data", b"abc")
    b = store.create("b.txt", "assistants", iter([b"12", b"34"]))
    with (tmp_path / "c.bin").open("wb") as out:
        out.write(b"from a file object")
    with (tmp_path / "c.bin").open("rb") as source:
        c = store.create("c.bin", "user_data", source)
    assert store.read(a.id) == b"abc" and store.read(b.id) == b"1234" and store.read(c.id) == b"from a file object"
    assert store.path(b.id).read_bytes() == b"1234"
    assert store.get(a.id) == a
    assert store.sha256(a.id) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    files, more = store.list(order="asc")
    assert [f.id for f in files] == [a.id, b.id, c.id] and more is False
    assert store.delete(a.id) is True and store.delete(a.id) is False
    from mmrag.serving.errors import NotFoundError, PayloadTooLargeError

    with pytest.raises(NotFoundError):
        store.get(a.id)
    with pytest.raises(PayloadTooLargeError):
        store.create("big", "user_data", b"x" * 101)
    assert list((tmp_path / "store" / ".staging").iterdir()) == []


def test_store_sweeps_old_orphans_and_keeps_fresh_ones(tmp_path):
    config = FilesConfig(directory=str(tmp_path / "store"))
    FileStore(config)
    old = tmp_path / "store" / ".staging" / "upload-old"
    fresh = tmp_path / "store" / ".staging" / "upload-fresh"
    for folder in (old, fresh):
        folder.mkdir()
        (folder / "content").write_bytes(b"half")
    slow = tmp_path / "store" / ".staging" / "upload-slow"  # started long ago, still being written
    slow.mkdir()
    (slow / "content").write_bytes(b"still coming")
    two_hours_ago = (time.time() - 7200, time.time() - 7200)
    os.utime(old / "content", two_hours_ago)
    os.utime(old, two_hours_ago)
    os.utime(slow, two_hours_ago)
    store = FileStore(config)  # a crash left `old`; the others may be uploads in flight elsewhere
    assert not old.exists() and fresh.exists() and slow.exists()
    assert store.list() == ([], False)


def test_concurrent_uploads_and_deletes_keep_the_store_consistent(tmp_path):
    store = FileStore(FilesConfig(directory=str(tmp_path / "store")))
    created: list[str] = []

    def worker(n: int) -> None:
        for i in range(10):
            file = store.create(f"{n}-{i}.txt", "user_data", f"{n}-{i}".encode())
            created.append(file.id)
            if i % 2:
                assert store.delete(file.id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    files, _ = store.list()
    assert len(created) == 40 and len(files) == 20
    assert all(store.read(f.id) == f.filename.removesuffix(".txt").encode() for f in files)


def test_safe_filename_unit():
    assert safe_filename(None) == "upload"
    assert safe_filename(b"caf\xc3\xa9.txt") == "café.txt"
    assert safe_filename("x" * 300) == "x" * 255


def post_partial_upload(app, then: dict | None) -> list[dict]:
    """POST /v1/files straight to the ASGI app: the start of a file part, then ``then`` (a disconnect), or
    nothing more ever (``None``: the client stalls). Returns the messages the app sent."""
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\nthe first bytes'
    messages = [{"type": "http.request", "body": head, "more_body": True}]
    sent: list[dict] = []

    async def receive():
        if messages:
            return messages.pop(0)
        if then is not None:
            return then
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/files",
        "raw_path": b"/v1/files",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"content-type", b"multipart/form-data; boundary=b")],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    return sent


def test_a_stalled_upload_is_a_408_and_keeps_nothing(tmp_path):
    app = make_app(tmp_path, files={"upload_idle_timeout_s": 0.3})
    sent = post_partial_upload(app, then=None)
    assert sent[0]["status"] == 408
    error = json.loads(sent[1]["body"])["error"]
    assert error["param"] == "file" and "upload_idle_timeout_s" in error["message"]
    assert list((tmp_path / "files" / ".staging").iterdir()) == []


def test_a_client_that_hangs_up_mid_upload_leaves_nothing(tmp_path):
    app = make_app(tmp_path)
    post_partial_upload(app, then={"type": "http.disconnect"})
    assert list((tmp_path / "files" / ".staging").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [".staging", ".trash"]
