"""The Milvus side: one collection schema, written and searched through ``pymilvus.MilvusClient`` only.

Schema (one row per chunk):

=============== ========================= ==========================================================
field           type                      what
=============== ========================= ==========================================================
id              VARCHAR(64), primary      content hash of (source, text, metadata): re-ingesting the
                                          same content writes nothing new
text            VARCHAR, analyzer on      the chunk; input of the BM25 function (no analyzer when dense-only)
source          VARCHAR                   the file (relative path); filters and delete-by-source use it
metadata        JSON                      ``chunk_index`` + user metadata; ``metadata["k"] == v``
dense           FLOAT_VECTOR(dim)         the encoder's vector, index per ``retrieval.index``
sparse          SPARSE_FLOAT_VECTOR       BM25 of ``text``, computed by Milvus (function output); only
                                          with ``retrieval.full_text`` (the default)
xrag_vector     FLOAT_VECTOR(xdim), opt.  xRAG's retrieval-space vector; only with ``xrag_encoder``
=============== ========================= ==========================================================

NOTE: the xRAG field is a separate, non-nullable vector present only when an xRAG encoder is configured:
Milvus Lite 3.2.2 accepts a nullable vector field in the schema but rejects a batch where it is all null
and reads nulls back as zero vectors, so "always there, mostly null" is not an option on Lite.

The encoder that filled a collection is recorded in its properties (``mmrag.encoder``,
``mmrag.encoder_dim``, and the same for xRAG); :meth:`MilvusStore.check_encoder` refuses any other.

Dense-only layout (``retrieval.full_text: false``, for Milvus 2.3 and 2.4, which have no BM25 function): no
analyzer, no ``sparse`` field, ``mmrag.full_text: "false"`` in the properties, and a hybrid search on such a
collection is a 400 on ``retrieval.hybrid``. Milvus 2.3 also has a single vector field per collection, so no
``xrag_encoder`` there. Before 2.3.10, Milvus's upsert hashed the wrong field into a partition key
(milvus-io/milvus#30607: the rows land in other partitions than a filter on the key searches, so a
store-scoped search finds almost nothing); on such a server the vector stores' collection is created with
``vector_store_id`` as a plain scalar field (filtered, not pruned; ``mmrag.partition_key: "false"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mmrag.serving.errors import clip
from mmrag.serving.retrieval.config import RetrievalConfig
from mmrag.serving.retrieval.errors import (
    CollectionNotFoundError,
    EncoderMismatchError,
    InvalidFilterError,
    RetrievalRequestError,
    RetrievalTimeoutError,
    RetrievalUnavailableError,
    StoreUnreachableError,
)

if TYPE_CHECKING:
    from mmrag.serving.retrieval.encoders import Encoder

SCHEMA_VERSION = "1"
OUTPUT_FIELDS = ["text", "source", "metadata"]
_SPARSE_INDEX = {"index_type": "SPARSE_INVERTED_INDEX", "metric_type": "BM25"}
# Milvus answers a bad expression with IllegalArgument (6, Lite) or ParameterInvalid (1100, server).
_ARGUMENT_ERROR_CODES = {6, 1100}
_NOT_FOUND_CODES = {4, 100}
# A Milvus server reads with bounded staleness by default (a write shows within `common.gracefulTime`, 5 s;
# a deleted file is found for a second more): for this long after this connection wrote to a collection, its
# reads ask for Strong consistency, so a client sees its own upload, update or delete at once. Milvus Lite
# reads its writes anyway and is left as it was.
_READ_YOUR_WRITES_S = 10.0
# Milvus server versions ("v2.3.5", "v2.5.4-..."); Milvus Lite says "milvus_lite-3.2.2" and never matches.
_SERVER_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")


@dataclass
class Hit:
    id: str
    score: float
    text: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)
    vector: list[float] | None = None  # the field a search asked for (`vectors`)


@dataclass(frozen=True)
class ChunkRow:
    text: str
    source: str
    metadata: dict[str, Any]

    @property
    def id(self) -> str:
        canonical = json.dumps([self.source, self.text, self.metadata], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class MilvusStore:
    """A connection to Milvus with mmrag's collection operations: a server URI; a Lite path served by a Milvus
    Lite server process (``lite_server.py``), which it then connects to; or a Lite path opened in-process."""

    def __init__(self, config: RetrievalConfig) -> None:
        from pymilvus import MilvusClient

        # NOTE: pymilvus logs every failed RPC with a traceback at ERROR; our typed errors carry the
        # message, and a rejected user filter is not a server error.
        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
        self.config = config
        self.uri = config.resolved_uri()
        self._loaded: set[str] = set()
        self._full_text: dict[str, bool] = {}  # collection -> whether it has the BM25 field (its properties)
        self._written: dict[str, float] = {}  # collection -> monotonic time of this connection's last write
        self._lite_path = config.lite_path()
        self.lite_server = _lite_server_uri(config)  # the Lite path served by a Milvus Lite server process
        if self.lite_server is not None:
            self.uri, self._lite_path = self.lite_server, None
        self._server = self._lite_path is None and self.lite_server is None  # a Milvus server, not Lite
        if self._lite_path is not None:
            self._lite_path.parent.mkdir(parents=True, exist_ok=True)
            _lite_acquire(self._lite_path)
        try:
            with self._translate("connect"):
                self.client = MilvusClient(
                    uri=self.uri,
                    token=config.resolved_token() or "",
                    db_name=config.db_name,
                    timeout=config.connect_timeout_s,
                    # A Lite server listens on a free port that a later Lite server may be given again;
                    # pymilvus shares connections by address and never closes shared ones, so a shared
                    # channel would outlive its server and be handed to the next one on that port.
                    dedicated=self._lite_path is not None or self.lite_server is not None,
                )
        except Exception:
            self._release_lite()
            raise

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self._release_lite()

    def _release_lite(self) -> None:
        if self._lite_path is not None:
            _lite_release(self._lite_path)
            self._lite_path = None

    # -- collections ---------------------------------------------------------------------------

    def list_collections(self) -> list[str]:
        with self._translate("list collections"):
            return sorted(self.client.list_collections(timeout=self.config.write_timeout_s))

    def has_collection(self, name: str) -> bool:
        with self._translate("has_collection"):
            return bool(self.client.has_collection(name, timeout=self.config.write_timeout_s))

    def properties(self, name: str) -> dict[str, str]:
        with self._translate("describe", collection=name):
            described = self.client.describe_collection(name, timeout=self.config.write_timeout_s)
        return {str(k): str(v) for k, v in (described.get("properties") or {}).items()}

    def create_collection(
        self,
        name: str,
        encoder: Encoder,
        xrag_encoder: Encoder | None = None,
        *,
        vector_store_partitions: int | None = None,
    ) -> None:
        """``vector_store_partitions``: the vector stores' collection, with two more scalar fields,
        ``vector_store_id`` (the partition key, hashed into that many partitions) and ``file_id``."""
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        full_text = self.config.full_text
        partition_key = vector_store_partitions is not None and not self._upsert_misroutes_partition_key()
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        if vector_store_partitions is not None:
            schema.add_field("vector_store_id", DataType.VARCHAR, max_length=64, is_partition_key=partition_key)
            schema.add_field("file_id", DataType.VARCHAR, max_length=64)
        schema.add_field("text", DataType.VARCHAR, max_length=65535, **({"enable_analyzer": True} if full_text else {}))
        schema.add_field("source", DataType.VARCHAR, max_length=4096)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=encoder.dim)
        index = self.config.index
        params = self.client.prepare_index_params()
        params.add_index("dense", index_type=index.type, metric_type=index.metric, params=index.build_params())
        if full_text:
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(
                Function(
                    name="text_bm25",
                    function_type=FunctionType.BM25,
                    input_field_names=["text"],
                    output_field_names=["sparse"],
                )
            )
            params.add_index("sparse", **_SPARSE_INDEX)
        properties = {
            "mmrag.schema_version": SCHEMA_VERSION,
            "mmrag.encoder": encoder.name,
            "mmrag.encoder_dim": str(encoder.dim),
        }
        if not full_text:  # absent means full text: every collection made before this option had it
            properties["mmrag.full_text"] = "false"
        if vector_store_partitions is not None and not partition_key:
            properties["mmrag.partition_key"] = "false"
        if xrag_encoder is not None:
            schema.add_field("xrag_vector", DataType.FLOAT_VECTOR, dim=xrag_encoder.dim)
            # xRAG's projector was trained on raw inner products (research/xrag_milvus.md): exact IP.
            params.add_index("xrag_vector", index_type="FLAT", metric_type="IP")
            properties |= {"mmrag.xrag_encoder": xrag_encoder.name, "mmrag.xrag_dim": str(xrag_encoder.dim)}
        partitions = {"num_partitions": vector_store_partitions} if partition_key else {}
        with (
            self._translate("create collection", collection=name),
            self._explain_layout(name, xrag_encoder is not None),
        ):
            self.client.create_collection(
                name,
                schema=schema,
                index_params=params,
                properties=properties,
                **partitions,
                description=f"mmrag chunks embedded by {encoder.name} ({encoder.dim}-d)",
                timeout=self.config.write_timeout_s,
            )
        self._full_text[name] = full_text

    def server_version(self) -> str | None:
        """What the server says it runs ("v2.3.5-lite", "milvus_lite-3.2.2"); None if it cannot say."""
        try:
            return str(self.client.get_server_version(timeout=self.config.connect_timeout_s))
        except Exception:  # an old or unusual server: the version only refines messages and one workaround
            return None

    def _upsert_misroutes_partition_key(self) -> bool:
        """Milvus before 2.3.10 (milvus-io/milvus#30607) hashes the wrong field into the partition key on upsert."""
        version = self.server_version()
        match = _SERVER_VERSION.match(version or "")
        if match is None:
            return False
        misroutes = tuple(int(x) for x in match.groups()) < (2, 3, 10)
        if misroutes:
            logging.getLogger(__name__).warning(
                "Milvus %s misroutes upserts by partition key (milvus-io/milvus#30607, fixed in 2.3.10): the vector "
                "stores' collection keeps vector_store_id as a plain filtered field",
                version,
            )
        return misroutes

    @contextmanager
    def _explain_layout(self, name: str, xrag: bool) -> Iterator[None]:
        """A server that cannot build the layout (Milvus 2.3/2.4: no BM25 function, sparse vectors or second
        vector field) refuses it with a message about field types; say which setting makes one it can build.
        Milvus 2.3 creates the collection and then refuses its sparse index: the half-made one is dropped, or
        the next start would take it for a finished one."""
        from pymilvus.exceptions import MilvusException

        try:
            yield
        except MilvusException as exc:
            if not (self.config.full_text or xrag) or "support" not in str(exc.message).lower():
                raise
            try:
                self.client.drop_collection(name, timeout=self.config.write_timeout_s)
            except MilvusException:
                logging.getLogger(__name__).warning("could not drop the half-created collection %r", name)
            hints = (
                ["retrieval.full_text: false (a dense-only layout, no hybrid search)"] if self.config.full_text else []
            )
            hints += ["no retrieval.xrag_encoder (one vector field)"] if xrag else []
            version = self.server_version() or "of unknown version"
            raise RetrievalUnavailableError(
                f"Milvus {version} cannot create mmrag's collection layout ({exc.message}); this Milvus needs "
                + " and ".join(hints)
                + "; BM25 full text needs Milvus 2.5 or Milvus Lite"
            ) from exc

    def check_encoder(self, name: str, encoder: Encoder, xrag_encoder: Encoder | None = None) -> None:
        """Refuse a collection that another encoder filled (or that mmrag did not create)."""
        props = self.properties(name)
        recorded = (props.get("mmrag.encoder"), props.get("mmrag.encoder_dim"))
        if recorded[0] is None:
            raise EncoderMismatchError(
                f"collection {name!r} records no encoder (not created by mmrag); refusing to mix vectors"
            )
        if recorded != (encoder.name, str(encoder.dim)):
            raise EncoderMismatchError(
                f"collection {name!r} was filled by encoder {recorded[0]} ({recorded[1]}-d), but this "
                f"server encodes with {encoder.name} ({encoder.dim}-d): use the same encoder, or ingest "
                "into another collection"
            )
        if xrag_encoder is not None:
            xrecorded = (props.get("mmrag.xrag_encoder"), props.get("mmrag.xrag_dim"))
            if xrecorded != (xrag_encoder.name, str(xrag_encoder.dim)):
                raise EncoderMismatchError(
                    f"collection {name!r} has xRAG vectors from {xrecorded[0]} ({xrecorded[1]}-d), not "
                    f"{xrag_encoder.name} ({xrag_encoder.dim}-d)"
                )

    def drop(self, name: str) -> None:
        with self._translate("drop", collection=name):
            if not self.client.has_collection(name, timeout=self.config.write_timeout_s):
                raise CollectionNotFoundError(f"collection {name!r} does not exist")
            self.client.drop_collection(name, timeout=self.config.write_timeout_s)
        self._loaded.discard(name)
        self._full_text.pop(name, None)

    def count(self, name: str) -> int:
        with self._translate("count", collection=name):
            self._ensure_loaded(name)
            rows = self.client.query(
                name, filter="", output_fields=["count(*)"], timeout=self.config.write_timeout_s, **self._fresh(name)
            )
        return int(rows[0]["count(*)"])

    def source_counts(self, name: str, batch_size: int = 1000) -> Counter[str]:
        """Chunks per source (reads every row's source: fine for a CLI, not for a request path)."""
        counts: Counter[str] = Counter()
        with self._translate("query sources", collection=name):
            self._ensure_loaded(name)
            iterator = self.client.query_iterator(name, batch_size=batch_size, filter="", output_fields=["source"])
            try:
                while batch := iterator.next():
                    counts.update(row["source"] for row in batch)
            finally:
                iterator.close()
        return counts

    # -- writes ----------------------------------------------------------------------------------

    def existing_ids(self, name: str, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        with self._translate("get", collection=name):
            self._ensure_loaded(name)
            rows = self.client.get(
                name, ids=list(ids), output_fields=["id"], timeout=self.config.write_timeout_s, **self._fresh(name)
            )
        return {row["id"] for row in rows}

    def upsert(self, name: str, rows: list[dict[str, Any]]) -> int:
        with self._translate("upsert", collection=name):
            result = self.client.upsert(name, rows, timeout=self.config.write_timeout_s)
        self._wrote(name)
        return int(result["upsert_count"])

    def flush(self, name: str) -> None:
        """Persist and seal what was written, so searches use the built index (not a scan of new rows)."""
        with self._translate("flush", collection=name):
            self.client.flush(name, timeout=self.config.write_timeout_s)

    def delete_source(self, name: str, source: str) -> int:
        with self._translate("delete", collection=name):
            result = self.client.delete(
                name, filter=f"source == {quote_string(source)}", timeout=self.config.write_timeout_s
            )
        self._wrote(name)
        return int(result["delete_count"]) if isinstance(result, dict) else len(result)

    def delete_where(self, name: str, filter: str) -> int:
        """Delete every row matching a server-built expression (a vector store's file, or a whole store)."""
        with self._translate("delete", collection=name):
            result = self.client.delete(name, filter=filter, timeout=self.config.write_timeout_s)
        self._wrote(name)
        return int(result["delete_count"]) if isinstance(result, dict) else len(result)

    def get_rows(self, name: str, ids: Sequence[str], fields: list[str]) -> list[dict[str, Any]]:
        """The rows with these ids (those that exist), with ``fields``."""
        if not ids:
            return []
        with self._translate("get", collection=name):
            self._ensure_loaded(name)
            return self.client.get(
                name, ids=list(ids), output_fields=fields, timeout=self.config.write_timeout_s, **self._fresh(name)
            )

    def count_where(self, name: str, filter: str) -> int:
        with self._translate("count", collection=name):
            self._ensure_loaded(name)
            rows = self.client.query(
                name,
                filter=filter,
                output_fields=["count(*)"],
                timeout=self.config.write_timeout_s,
                **self._fresh(name),
            )
        return int(rows[0]["count(*)"])

    # -- search ----------------------------------------------------------------------------------

    def search(
        self,
        name: str,
        vector: Sequence[float],
        query_text: str,
        top_k: int,
        filter: str | None = None,
        hybrid: bool = False,
        vectors: Literal["xrag", "dense"] | None = None,
    ) -> list[Hit]:
        """Dense search, or dense + BM25 fused with RRF when ``hybrid``; best first. ``vectors``: also
        return each hit's vector from that field (``Hit.vector``)."""
        from pymilvus import AnnSearchRequest, RRFRanker

        index = self.config.index
        dense_params = {"metric_type": index.metric, "params": index.search_params(top_k)}
        output = OUTPUT_FIELDS + ([_VECTOR_FIELDS[vectors]] if vectors else [])
        timeout = self.config.search_timeout_s
        with self._translate("search", collection=name, filter=filter):
            self._ensure_loaded(name)
            if hybrid:
                self._require_full_text(name)
                requests = [
                    AnnSearchRequest([list(vector)], "dense", dense_params, top_k, expr=filter or None),
                    AnnSearchRequest([query_text], "sparse", {}, top_k, expr=filter or None),
                ]
                result = self.client.hybrid_search(
                    name,
                    requests,
                    RRFRanker(self.config.rrf_k),
                    limit=top_k,
                    output_fields=output,
                    timeout=timeout,
                    **self._fresh(name),
                )
            else:
                result = self.client.search(
                    name,
                    data=[list(vector)],
                    anns_field="dense",
                    filter=filter or "",
                    limit=top_k,
                    search_params=dense_params,
                    output_fields=output,
                    timeout=timeout,
                    **self._fresh(name),
                )
        return [_hit(raw) for raw in result[0]]

    def _wrote(self, name: str) -> None:
        if self._server:
            self._written[name] = time.monotonic()

    def _fresh(self, name: str) -> dict[str, str]:
        """The consistency a read of ``name`` needs to see this connection's recent writes (see above)."""
        written = self._written.get(name)
        if written is None or time.monotonic() - written > _READ_YOUR_WRITES_S:
            return {}
        return {"consistency_level": "Strong"}

    def _require_full_text(self, name: str) -> None:
        if name not in self._full_text:
            self._full_text[name] = self.properties(name).get("mmrag.full_text", "true") != "false"
        if not self._full_text[name]:
            raise RetrievalRequestError(
                f"hybrid search needs BM25 full text, and collection {name!r} has a dense-only layout "
                "(created with retrieval.full_text: false); search without hybrid",
                field="retrieval.hybrid",
            )

    def _ensure_loaded(self, name: str) -> None:
        """Load a collection into memory once per connection (a reopened Lite file starts released)."""
        if name not in self._loaded:
            self.client.load_collection(name, timeout=self.config.write_timeout_s)
            self._loaded.add(name)

    # -- errors ----------------------------------------------------------------------------------

    @contextmanager
    def _translate(self, op: str, collection: str | None = None, filter: str | None = None) -> Iterator[None]:
        """Turn pymilvus/gRPC exceptions into the typed errors of ``errors.py``."""
        import grpc
        from pymilvus.exceptions import ConnectionConfigException, MilvusException

        where = f"Milvus at {_redact(self.uri)}"
        try:
            yield
        except grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise RetrievalTimeoutError(f"{op} on {where} timed out") from exc
            raise StoreUnreachableError(f"{op}: {where} is unreachable ({code})") from exc
        except ConnectionConfigException as exc:
            hint = ""
            if self._lite_path is not None:
                hint = (
                    f" (is another process holding the Lite directory {self._lite_path}, e.g. `mmrag ingest`, or "
                    "`mmrag serve` with retrieval.milvus_lite_server false? Opened in-process, Milvus Lite allows "
                    "one process per file; `mmrag serve` on the default shares it through a Lite server, which "
                    "other mmrag commands then use)"
                )
            raise StoreUnreachableError(f"{op}: cannot open {where}: {exc.message}{hint}") from exc
        except MilvusException as exc:
            message = str(exc.message)
            missing = exc.code in _NOT_FOUND_CODES or "not exist" in message or "not found" in message
            if missing and collection is not None and "collection" in message.lower():
                raise CollectionNotFoundError(f"collection {collection!r} does not exist") from exc
            if filter and "recursion" in message.lower():  # Milvus Lite parses filters recursively
                raise InvalidFilterError("the filter is nested too deeply") from exc
            if filter and exc.code in _ARGUMENT_ERROR_CODES:
                raise InvalidFilterError(f"Milvus rejected the filter {clip(filter)}: {clip_milvus(message)}") from exc
            if "deadline" in message.lower() or "timeout" in message.lower():
                raise RetrievalTimeoutError(f"{op} on {where} timed out: {message}") from exc
            if exc.code == 2 or "unavailable" in message.lower() or "connect" in message.lower():
                raise StoreUnreachableError(f"{op}: {where} is unreachable: {message}") from exc
            raise RetrievalUnavailableError(f"{op} failed on {where}: {message}") from exc


def clip_milvus(message: str, limit: int = 600) -> str:
    """Milvus's explanation of a rejected filter (it quotes the filter back), bounded."""
    return message if len(message) <= limit else message[:limit] + "..."


def _redact(uri: str) -> str:
    """The URI without credentials (error messages reach HTTP clients)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def quote_string(value: str) -> str:
    """A Milvus expression string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


_VECTOR_FIELDS = {"xrag": "xrag_vector", "dense": "dense"}


def _hit(raw: dict[str, Any]) -> Hit:
    entity = raw.get("entity", {})
    return Hit(
        id=str(raw["id"]),
        score=float(raw["distance"]),
        text=entity.get("text", ""),
        source=entity.get("source", ""),
        metadata=entity.get("metadata") or {},
        vector=next(([float(x) for x in entity[f]] for f in _VECTOR_FIELDS.values() if f in entity), None),
    )


def _lite_server_uri(config: RetrievalConfig) -> str | None:
    """The Milvus Lite server to use for the Lite path of ``config``: the one it names, else (in the shared
    mode) the one running on that path (``lite_server.find_running``); None: open the path in-process."""
    path = config.lite_path()
    if path is None:
        return None
    if config.lite_server_uri is not None:
        return config.lite_server_uri
    if not config.milvus_lite_server:
        return None
    from mmrag.serving.retrieval.lite_server import find_running

    running = find_running(path.resolve())
    if running is not None:
        logging.getLogger(__name__).info(
            "using the Milvus Lite server at %s (pid %d) for %s", running.uri, running.pid, path
        )
    return running.uri if running is not None else None


# Milvus Lite runs in this process, one embedded server per file, shared by every client on that file;
# it is stopped (releasing the file lock for other processes) when the last store on it closes.
_lite_lock = threading.Lock()
_lite_users: Counter[Path] = Counter()


def _lite_acquire(path: Path) -> None:
    with _lite_lock:
        _lite_users[path.resolve()] += 1


def _lite_release(path: Path) -> None:
    from milvus_lite.server_manager import server_manager_instance

    key = path.resolve()
    with _lite_lock:
        _lite_users[key] -= 1
        if _lite_users[key] > 0:
            return
        del _lite_users[key]
    server_manager_instance.release_server(str(path))
