"""Vector stores with API keys, through the real `openai` SDK over the app: a key sees, searches, changes and
chats with only its own stores and attaches only its own files (another key's is a 404 naming the field, the
same answer as an unknown id); an admin key sees every store and shares one with another key (read only);
without keys the server stays open; a records file from before owners existed still opens."""

from __future__ import annotations

import sqlite3

import openai
import pytest
from fastapi.testclient import TestClient

from mmrag.serving.config import MmragConfig
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from mmrag.serving.vector_stores.access import key_id
from mmrag.serving.vector_stores.records import Records
from tests.batch.engines import RetrievalEchoEngine
from tests.vector_stores.conftest import MODEL, serve_application

ALICE, BOB, ADMIN = "sk-alice", "sk-bob", "sk-admin"
HERONS = b"# Herons\n\nThe grey heron of Vellmora nests in reed beds and eats mostly small fish.\n"
TRAINS = b"The Harrowgate funicular opened in 1898 and climbs 212 metres up the cliff.\n"
QUESTION = [{"role": "user", "content": "Which bird nests in reed beds?"}]


def keyed(config: MmragConfig) -> MmragConfig:
    return config.model_copy(
        update={"server": config.server.model_copy(update={"api_keys": [ALICE, BOB], "admin_api_keys": [ADMIN]})}
    )


@pytest.fixture
def keyed_http(config, make_stage):
    config = MmragConfig.model_validate(keyed(config).model_dump())  # validated, as a deployment gets it
    with TestClient(create_app(config, LocalBackend(RetrievalEchoEngine(config), make_stage(config)))) as http:
        yield http


def sdk(http: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


@pytest.fixture
def alice(keyed_http):
    return sdk(keyed_http, ALICE)


@pytest.fixture
def bob(keyed_http):
    return sdk(keyed_http, BOB)


@pytest.fixture
def admin(keyed_http):
    return sdk(keyed_http, ADMIN)


def upload(client: openai.OpenAI, name: str, data: bytes) -> str:
    return client.files.create(file=(name, data), purpose="assistants").id


def filled_store(client: openai.OpenAI, name: str, data: bytes) -> tuple[str, str]:
    """A store of ``client``'s key with one indexed file of its own: (store id, file id)."""
    store = client.vector_stores.create(name=name)
    file_id = upload(client, name, data)
    attached = client.vector_stores.files.create_and_poll(file_id=file_id, vector_store_id=store.id)
    assert attached.status == "completed", attached.last_error
    return store.id, file_id


def refusal(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value.status_code, caught.value.body


def same_as_unknown(call_with, real_id: str) -> dict:
    """The 404 for another key's ``real_id`` is the 404 for an id that never existed (only the id differs)."""
    status, body = refusal(lambda: call_with(real_id))
    unknown_status, unknown = refusal(lambda: call_with("vs_" + "0" * 24))
    assert status == unknown_status == 404, body
    assert body["message"].replace(real_id, "ID") == unknown["message"].replace("vs_" + "0" * 24, "ID")
    assert {k: v for k, v in body.items() if k != "message"} == {k: v for k, v in unknown.items() if k != "message"}
    return body


def test_another_keys_store_is_a_404_for_every_operation(alice, bob):
    store_id, file_id = filled_store(alice, "herons.md", HERONS)
    bob_file = upload(bob, "trains.txt", TRAINS)
    bob_store = bob.vector_stores.create(name="bob's").id
    vs = bob.vector_stores
    calls = {
        "retrieve": lambda sid: vs.retrieve(sid),
        "search": lambda sid: vs.search(sid, query="heron"),
        "update": lambda sid: vs.update(sid, name="taken"),
        "delete": lambda sid: vs.delete(sid),
        "attach": lambda sid: vs.files.create(vector_store_id=sid, file_id=bob_file),
        "batch": lambda sid: vs.file_batches.create(vector_store_id=sid, file_ids=[bob_file]),
        "list files": lambda sid: vs.files.list(vector_store_id=sid),
        "get file": lambda sid: vs.files.retrieve(file_id, vector_store_id=sid),
        "file content": lambda sid: list(vs.files.content(file_id, vector_store_id=sid)),
        "update file": lambda sid: vs.files.update(file_id, vector_store_id=sid, attributes={"a": "b"}),
        "delete file": lambda sid: vs.files.delete(file_id, vector_store_id=sid),
    }
    for name, call in calls.items():
        body = same_as_unknown(call, store_id)
        assert (body["param"], body["code"]) == ("vector_store_id", "vector_store_not_found"), name
    assert [s.id for s in vs.list()] == [bob_store]
    assert [s.id for s in alice.vector_stores.list()] == [store_id]
    # Untouched by all of that: still alice's, named as she named it, with its file searchable.
    assert alice.vector_stores.retrieve(store_id).name == "herons.md"
    assert alice.vector_stores.search(store_id, query="reed beds").data[0].file_id == file_id


def test_a_key_attaches_only_its_own_files(alice, bob):
    alice_file = upload(alice, "herons.md", HERONS)
    store_id = bob.vector_stores.create(name="bob's").id
    unknown = "file-" + "0" * 24
    for file_id in (alice_file, unknown):  # another key's file is answered as a file that does not exist
        for call, param in [
            (lambda f=file_id: bob.vector_stores.files.create(vector_store_id=store_id, file_id=f), "file_id"),
            (
                lambda f=file_id: bob.vector_stores.file_batches.create(vector_store_id=store_id, file_ids=[f]),
                "file_ids[0]",
            ),
            (lambda f=file_id: bob.vector_stores.create(name="x", file_ids=[f]), "file_ids[0]"),
        ]:
            status, body = refusal(call)
            assert (status, body["param"], body["code"]) == (404, param, "file_not_found"), body
    assert bob.vector_stores.retrieve(store_id).file_counts.total == 0
    assert [s.name for s in bob.vector_stores.list()] == ["bob's"]  # the refused create made no store


def test_chat_and_responses_with_another_keys_store_are_404s(alice, bob):
    store_id, file_id = filled_store(alice, "herons.md", HERONS)
    retrieval = {"retrieval": {"vector_store_ids": [store_id]}}
    answer = alice.chat.completions.create(model=MODEL, messages=QUESTION, extra_body=retrieval)
    assert answer.model_extra["retrieval"]["documents"][0]["file_id"] == file_id
    status, body = refusal(lambda: bob.chat.completions.create(model=MODEL, messages=QUESTION, extra_body=retrieval))
    assert (status, body["param"], body["code"]) == (404, "retrieval.vector_store_ids", "vector_store_not_found")
    # A streamed request is refused before its first byte, the same way.
    status, body = refusal(
        lambda: bob.chat.completions.create(model=MODEL, messages=QUESTION, extra_body=retrieval, stream=True)
    )
    assert (status, body["param"]) == (404, "retrieval.vector_store_ids")
    # The owner is the ingress's to set: a client naming one is refused, whatever it names.
    spoofed = {"retrieval": {"vector_store_ids": [store_id], "owner": key_id(ALICE)}}
    status, body = refusal(lambda: bob.chat.completions.create(model=MODEL, messages=QUESTION, extra_body=spoofed))
    assert (status, body["param"]) == (400, "retrieval.owner"), body
    tools = [{"type": "file_search", "vector_store_ids": [store_id]}]
    assert alice.responses.create(model=MODEL, input="Which bird nests in reed beds?", tools=tools).output_text
    status, body = refusal(lambda: bob.responses.create(model=MODEL, input="Which bird?", tools=tools))
    assert (status, body["param"]) == (404, "tools[0].vector_store_ids"), body


def test_admin_sees_every_store_and_shares_one_read_only(alice, bob, admin):
    alice_store, alice_file = filled_store(alice, "herons.md", HERONS)
    bob_store = bob.vector_stores.create(name="bob's").id
    # The admin lists, reads and searches every key's store, and sees who owns each.
    listed = {s.id: s for s in admin.vector_stores.list()}
    assert set(listed) == {alice_store, bob_store}
    extra = listed[alice_store].model_extra
    assert (extra["mmrag_owner"], extra["mmrag_shared_with"]) == (key_id(ALICE), [])
    assert admin.vector_stores.search(alice_store, query="reed beds").data[0].file_id == alice_file
    assert "mmrag_owner" not in alice.vector_stores.retrieve(alice_store).model_extra  # an admin's view only
    # Only an admin shares; the ids must be this server's keys'.
    share = {"mmrag_shared_with": [key_id(BOB)]}
    status, body = refusal(lambda: alice.vector_stores.update(alice_store, extra_body=share))
    assert (status, body["param"], body["type"]) == (403, "mmrag_shared_with", "permission_error"), body
    for bad, param in [(["key-" + "f" * 32], "mmrag_shared_with[0]"), ([BOB], "mmrag_shared_with[0]")]:
        status, body = refusal(
            lambda b=bad: admin.vector_stores.update(alice_store, extra_body={"mmrag_shared_with": b})
        )
        assert (status, body["param"]) == (400, param), body
    shared = admin.vector_stores.update(alice_store, extra_body=share)
    assert shared.model_extra["mmrag_shared_with"] == [key_id(BOB)] and shared.name == "herons.md"
    # Bob now lists, reads, searches and chats with it...
    assert {s.id for s in bob.vector_stores.list()} == {alice_store, bob_store}
    assert bob.vector_stores.search(alice_store, query="reed beds").data[0].file_id == alice_file
    assert [f.id for f in bob.vector_stores.files.list(vector_store_id=alice_store)] == [alice_file]
    retrieval = {"retrieval": {"vector_store_ids": [alice_store, bob_store]}}
    answer = bob.chat.completions.create(model=MODEL, messages=QUESTION, extra_body=retrieval)
    assert answer.model_extra["retrieval"]["documents"][0]["file_id"] == alice_file
    # ...but changes nothing in it: a 403, not a 404 (he can see it).
    for call in [
        lambda: bob.vector_stores.delete(alice_store),
        lambda: bob.vector_stores.update(alice_store, name="mine"),
        lambda: bob.vector_stores.files.delete(alice_file, vector_store_id=alice_store),
    ]:
        status, body = refusal(call)
        assert (status, body["param"], body["code"]) == (403, "vector_store_id", "vector_store_read_only"), body
    # An admin attaches any key's file; unsharing (the whole list, here empty) hides the store again.
    assert admin.vector_stores.files.create(vector_store_id=bob_store, file_id=alice_file).id == alice_file
    admin.vector_stores.update(alice_store, extra_body={"mmrag_shared_with": []})
    assert refusal(lambda: bob.vector_stores.retrieve(alice_store))[0] == 404
    # An admin deletes any store.
    assert admin.vector_stores.delete(alice_store).deleted
    assert refusal(lambda: alice.vector_stores.retrieve(alice_store))[0] == 404


def test_without_keys_every_client_sees_every_store(client, http):
    other = sdk(http, "any-other-key")  # keys are not checked: this is the same anonymous caller
    store_id, file_id = filled_store(client, "herons.md", HERONS)
    assert [s.id for s in other.vector_stores.list()] == [store_id]
    assert other.vector_stores.search(store_id, query="reed beds").data[0].file_id == file_id
    assert other.vector_stores.files.create(vector_store_id=other.vector_stores.create().id, file_id=file_id)
    assert not {"mmrag_owner", "mmrag_shared_with"} & set(other.vector_stores.retrieve(store_id).model_extra)
    status, body = refusal(lambda: other.vector_stores.update(store_id, extra_body={"mmrag_shared_with": []}))
    assert (status, body["param"]) == (400, "mmrag_shared_with"), body
    assert other.vector_stores.delete(store_id).deleted


def test_key_id_is_the_files_api_owner():
    from starlette.requests import Request

    from mmrag.serving.openai.files_api import key_owner

    request = Request({"type": "http", "headers": [(b"authorization", f"Bearer {ALICE}".encode())]})
    assert key_owner(request) == key_id(ALICE) != key_id(BOB)


# The records schema before owners (a file written by an earlier release).
OLD_SCHEMA = """
CREATE TABLE stores (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, created_at INTEGER NOT NULL,
    last_active_at INTEGER NOT NULL, name TEXT, description TEXT, metadata TEXT NOT NULL, expires_after TEXT,
    removed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, vector_store_id TEXT NOT NULL REFERENCES stores(id) ON DELETE CASCADE,
    file_id TEXT NOT NULL, filename TEXT NOT NULL, created_at INTEGER NOT NULL, status TEXT NOT NULL,
    last_error TEXT, attributes TEXT NOT NULL, chunking TEXT NOT NULL, usage_bytes INTEGER NOT NULL DEFAULT 0,
    batch_id TEXT, removed INTEGER NOT NULL DEFAULT 0, cleanup INTEGER NOT NULL DEFAULT 0,
    UNIQUE (vector_store_id, file_id)
);
CREATE TABLE batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
    vector_store_id TEXT NOT NULL REFERENCES stores(id) ON DELETE CASCADE, created_at INTEGER NOT NULL
);
INSERT INTO stores (id, created_at, last_active_at, name, metadata) VALUES ('vs_old', 1, 1, 'from before', '{}');
"""


def test_a_records_file_from_before_owners_opens_and_its_stores_are_the_admins(config, make_stage):
    path = config.vector_stores.resolved_records_path(config.retrieval)
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
    records = Records(path)  # adds the column; opening again finds it there
    records.close()
    records = Records(path)
    assert records.one("SELECT name, owner FROM stores WHERE id = 'vs_old'") == {"name": "from before", "owner": None}
    assert records.one("SELECT name FROM sqlite_master WHERE type = 'index' AND name = 'stores_by_owner'")
    assert records.all("SELECT * FROM shares") == []  # the new table too
    records.close()
    config = MmragConfig.model_validate(keyed(config).model_dump())
    with TestClient(create_app(config, LocalBackend(RetrievalEchoEngine(config), make_stage(config)))) as http:
        # Made without keys, it has no owner: once keys are configured only an admin sees it.
        assert [s.id for s in sdk(http, ADMIN).vector_stores.list()] == ["vs_old"]
        assert sdk(http, ALICE).vector_stores.list().data == []
        assert refusal(lambda: sdk(http, ALICE).vector_stores.retrieve("vs_old"))[0] == 404
        new = sdk(http, ALICE).vector_stores.create(name="new")
        assert sdk(http, ADMIN).vector_stores.retrieve(new.id).model_extra["mmrag_owner"] == key_id(ALICE)


@pytest.mark.slow
def test_isolation_through_the_serve_application(tmp_path):
    """The key id crosses the deployment handles: the ingress's Vector Stores calls and a chat's retrieval
    options (``OwnedRetrievalOptions``, pickled to the retriever replica) both carry it."""
    with serve_application(tmp_path, "vector-stores-isolation", server={"api_keys": [ALICE, BOB]}) as (url, _):
        alice, bob = (openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60) for key in (ALICE, BOB))
        store_id, file_id = filled_store(alice, "herons.md", HERONS)
        retrieval = {"retrieval": {"vector_store_ids": [store_id]}}
        answer = alice.chat.completions.create(model=MODEL, messages=QUESTION, extra_body=retrieval)
        assert answer.model_extra["retrieval"]["documents"][0]["file_id"] == file_id
        status, body = refusal(
            lambda: bob.chat.completions.create(model=MODEL, messages=QUESTION, extra_body=retrieval)
        )
        assert (status, body["param"]) == (404, "retrieval.vector_store_ids"), body
        assert refusal(lambda: bob.vector_stores.search(store_id, query="heron"))[0] == 404
        assert bob.vector_stores.list().data == []
