"""``mmrag bench retrieval``: ingestion rate, search latency and HNSW recall on Milvus Lite.

On a generated corpus (seeded sentences, one chunk each; 100k chunks, or 5k with ``--quick``):

- ``ingest_chunks_per_s``: the real ingestion path (hash, dedupe check, MiniLM embedding, upsert) into
  an HNSW collection; ``upsert_chunks_per_s``: the same rows into a FLAT collection with the vectors
  already computed (the store's share of the cost).
- ``search_ms_p50/p99`` (dense, HNSW), ``flat_search_ms_p50/p99`` (exact), ``hybrid_ms_p50/p99``
  (dense + BM25 + RRF), ``retrieve_ms_p50/p99`` (query encoding + HNSW search: a request's cost).
- ``recall_at_10``: overlap of HNSW's top 10 with exact FLAT search on the same vectors (target >= 0.95),
  at the configured ef; ``recall_at_10_by_ef``: the same for ef 10, 16, 32, 64.
- ``text_mode_latency_ratio``: median chat latency with ``retrieval.mode=text`` over ``none`` (16 new
  tokens, modes alternating), on the server at ``--chat-url`` or on a default ``mmrag serve`` that the
  benchmark starts and stops (the demo corpus is the collection; text mode inserts up to
  ``text_rag.max_context_tokens`` of context, so the ratio includes the longer prefill).
- ``http_*``: the same server's Files and Vector Stores APIs against Milvus directly, on the same
  documents (``--http-files`` files of 20 corpus sentences), encoder and chunking: ingestion (upload, attach
  as one file batch, poll until indexed) in chunks/s against ``ingest_documents`` into a Lite file of the
  benchmark's own, and search latency through ``POST /v1/vector_stores/{id}/search`` (the SDK) against
  encoding + searching directly, the two alternating query by query.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

HELP = "Milvus Lite retrieval: ingestion chunks/s, search p50/p99, HNSW recall@10 vs FLAT."

# Phrase pools of the generated corpus, one phrase per line.
_SUBJECTS = """the harbour master|a courier robot|the old lighthouse|a violinist|the town council|a glass frog
the comet|a salt miner|the baker|a marathon runner|the funicular|a librarian|the weather station
a chess player|the festival crowd"""
_VERBS = """repaired|painted|counted|measured|photographed|described|sold|borrowed|visited|mapped|recorded
cleaned|rebuilt|studied|guarded"""
_OBJECTS = """the green lantern|forty barrels of salt|a violet tail|the copper bridge|a map of the cliffs
the logbook|three sewing machines|a basket of plums|the ochre tram|a limestone cave|the silver heron flag
a telescope|the tide tables|a snow gauge|the chapel of salt"""
_PLACES = """in Harrowgate|near Tarn Edda|on Mount Corrin|along the river Ambrel|in Quenby|at Greyfin cape
in the Selvara valley|under the Kessel Span|at the Aurel mine|by the sea of Quills"""
_TIMES = """at dawn|before the storm|in Ember Month|every winter|after the festival|on a foggy night|in 1898
during the marathon|at low tide|for eleven days"""


def _pool(phrases: str) -> list[str]:
    return phrases.replace("\n", "|").split("|")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunks", type=int, default=None, help="Corpus size (default 100000; 5000 quick).")
    parser.add_argument("--queries", type=int, default=None, help="Queries (default 500; 100 quick).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="Where the Lite file goes (default: a temp dir).")
    parser.add_argument(
        "--chat-url", default=None, help="A running mmrag server (…/v1) for the text/none ratio; default: start one."
    )
    parser.add_argument("--chat-requests", type=int, default=10, help="Questions per mode (measured pass).")
    parser.add_argument("--chat-model", default="mmrag-tiny-llava", help="Model name for --chat-url.")
    parser.add_argument("--http-files", type=int, default=None, help="Files through the HTTP API (100; quick 20).")


def make_corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    subjects, verbs, objects, places, times = map(_pool, (_SUBJECTS, _VERBS, _OBJECTS, _PLACES, _TIMES))
    sentences = []
    for i in range(n):
        parts = [rng.choice(subjects), rng.choice(verbs), rng.choice(objects), rng.choice(places)]
        extra = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(times)}"
        sentences.append(f"Record {i}: {' '.join(parts)} {rng.choice(times)}, and {extra}.")
    return sentences


def make_queries(corpus: list[str], n: int, seed: int) -> list[str]:
    """Each query is a corrupted copy of a corpus sentence: words dropped, no record number."""
    rng = random.Random(seed + 1)
    queries = []
    for text in rng.sample(corpus, n):
        words = text.split()[2:]
        queries.append(" ".join(w for w in words if rng.random() > 0.3))
    return queries


def percentiles(samples_s: list[float]) -> tuple[float, float]:
    import numpy as np

    ms = np.asarray(samples_s) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


class _CachingEncoder:
    """Remembers vectors by text, so the FLAT copy stores exactly the HNSW copy's vectors."""

    def __init__(self, inner) -> None:
        self.inner, self.cache = inner, {}
        self.name, self.dim = inner.name, inner.dim
        self.max_tokens, self.special_tokens = inner.max_tokens, inner.special_tokens
        self.token_spans = inner.token_spans

    def encode(self, texts, *, is_query=False):
        import numpy as np

        missing = [t for t in texts if t not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.inner.encode(missing, is_query=is_query), strict=True))
        return np.stack([self.cache[t] for t in texts])


def run(args: argparse.Namespace) -> int:
    from mmrag.benchmarks.common import plot_path, write_result
    from mmrag.serving.retrieval.config import IndexConfig, RetrievalConfig
    from mmrag.serving.retrieval.encoders import load_encoder
    from mmrag.serving.retrieval.ingest import Document, ingest_documents
    from mmrag.serving.retrieval.store import MilvusStore

    n_chunks = args.chunks or (5_000 if args.quick else 100_000)
    n_queries = args.queries or (100 if args.quick else 500)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mmrag-bench-"))
    base = RetrievalConfig(uri=str(workdir / "bench.db"), ingest_demo_corpus=False, write_timeout_s=600)
    corpus = make_corpus(n_chunks, args.seed)
    queries = make_queries(corpus, n_queries, args.seed)
    documents = [Document(text, f"gen/{i // 100:05d}", {}) for i, text in enumerate(corpus)]
    encoder = _CachingEncoder(load_encoder(base.encoder))
    encoder.encode(["warm-up"])  # first-call overheads are not ingestion

    figures: dict[str, Any] = {"chunks": n_chunks, "queries": n_queries}
    store = MilvusStore(base)
    try:
        hnsw = ingest_documents(documents, store, encoder, base, collection="bench_hnsw", progress=True)
        figures["ingest_chunks_per_s"] = hnsw.chunks_per_s
        flat_config = base.model_copy(update={"index": IndexConfig(type="FLAT")})
        flat_store = MilvusStore(flat_config)
        flat = ingest_documents(documents, flat_store, encoder, flat_config, collection="bench_flat", progress=True)
        figures["upsert_chunks_per_s"] = flat.chunks_per_s
        samples = _measure(store, flat_store, encoder, queries)
        figures["recall_at_10_by_ef"] = _recall_by_ef(base, flat_store, encoder, queries)
        flat_store.close()
    finally:
        store.close()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    for key in ("search", "flat_search", "hybrid", "retrieve"):
        figures[f"{key}_ms_p50"], figures[f"{key}_ms_p99"] = percentiles(samples[key])
    figures["recall_at_10"] = sum(samples["recall"]) / len(samples["recall"])
    http_files = args.http_files or (20 if args.quick else 100)
    figures.update(_served_figures(args, encoder.inner, corpus, queries, http_files))
    config = {
        "quick": args.quick,
        "seed": args.seed,
        "encoder": encoder.name,
        "index": base.index.model_dump(),
        "top_k": 10,
        "milvus": "lite",
        "chat_url": args.chat_url,
        "http_files": http_files,
        "http_sentences_per_file": SENTENCES_PER_FILE,
    }
    path = write_result("retrieval", figures, config, args.out)
    _plot(samples, figures, plot_path(path))
    for key, value in figures.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"wrote {path} and {plot_path(path)}")
    return 0


def _measure(store, flat_store, encoder, queries: list[str]) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {k: [] for k in ("search", "flat_search", "hybrid", "retrieve", "recall")}
    vectors = encoder.inner.encode(queries, is_query=True)
    for query, vector in zip(queries, vectors.tolist(), strict=True):
        started = time.perf_counter()
        encoder.inner.encode([query], is_query=True)
        approx = store.search("bench_hnsw", vector, query, 10)
        samples["retrieve"].append(time.perf_counter() - started)
        exact, elapsed = _timed(flat_store.search, "bench_flat", vector, query, 10)
        samples["flat_search"].append(elapsed)
        samples["search"].append(_timed(store.search, "bench_hnsw", vector, query, 10)[1])
        samples["hybrid"].append(_timed(store.search, "bench_hnsw", vector, query, 10, hybrid=True)[1])
        truth = {h.id for h in exact}
        samples["recall"].append(len(truth & {h.id for h in approx}) / max(len(truth), 1))
    return samples


def _recall_by_ef(base, flat_store, encoder, queries: list[str]) -> dict[str, float]:
    """HNSW recall@10 against FLAT for several search beam widths (the speed/recall knob)."""
    from mmrag.serving.retrieval.store import MilvusStore

    vectors = encoder.inner.encode(queries, is_query=True).tolist()
    exact = [{h.id for h in flat_store.search("bench_flat", v, q, 10)} for q, v in zip(queries, vectors, strict=True)]
    recalls = {}
    for ef in (10, 16, 32, 64):
        store = MilvusStore(base.model_copy(update={"index": base.index.model_copy(update={"hnsw_ef": ef})}))
        try:
            found = [
                {h.id for h in store.search("bench_hnsw", v, q, 10)} for q, v in zip(queries, vectors, strict=True)
            ]
        finally:
            store.close()
        recalls[str(ef)] = sum(len(t & f) / max(len(t), 1) for t, f in zip(exact, found, strict=True)) / len(exact)
    return recalls


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


def _served_figures(args: argparse.Namespace, encoder, corpus: list[str], queries: list[str], files: int) -> dict:
    """The figures that need a server: the one at ``--chat-url`` or, by default, a default ``mmrag serve``
    (tiny model) started for them (its demo corpus is the chat's collection)."""
    if args.chat_url:
        return _through_server(args.chat_url, args, encoder, corpus, queries, files)
    from mmrag.serving.server_process import running_server

    with running_server(overrides=["model.name=tiny-random"]) as server:
        return _through_server(f"{server.url}/v1", args, encoder, corpus, queries, files)


def _through_server(base_url: str, args, encoder, corpus: list[str], queries: list[str], files: int) -> dict:
    return {
        **_http_against_direct(base_url, encoder, corpus, queries, files),
        **_chat_ratio(base_url, args.chat_model, args.chat_requests),
    }


SENTENCES_PER_FILE = 20


def _http_against_direct(base_url: str, encoder, corpus: list[str], queries: list[str], files: int) -> dict:
    """Ingestion and search through the server's Files + Vector Stores APIs against the same work done
    directly on Milvus Lite in this process (same documents, encoder and chunking)."""
    import io

    from openai import OpenAI

    from mmrag.serving.retrieval.config import RetrievalConfig
    from mmrag.serving.retrieval.ingest import Document, ingest_documents
    from mmrag.serving.retrieval.store import MilvusStore

    texts = [" ".join(corpus[i * SENTENCES_PER_FILE : (i + 1) * SENTENCES_PER_FILE]) for i in range(files)]
    workdir = Path(tempfile.mkdtemp(prefix="mmrag-bench-http-"))
    config = RetrievalConfig(uri=str(workdir / "direct.db"), ingest_demo_corpus=False, write_timeout_s=600)
    direct_store = MilvusStore(config)
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    store_id = client.vector_stores.create(name="bench-retrieval").id
    try:
        documents = [Document(text, f"file-{i}.txt", {}) for i, text in enumerate(texts)]
        direct = ingest_documents(documents, direct_store, encoder, config, collection="files", progress=False)
        started = time.perf_counter()
        ids = [
            client.files.create(file=(f"file-{i}.txt", io.BytesIO(t.encode())), purpose="assistants").id
            for i, t in enumerate(texts)
        ]
        batch = client.vector_stores.file_batches.create_and_poll(vector_store_id=store_id, file_ids=ids)
        http_s = time.perf_counter() - started
        if batch.file_counts.completed != files:
            raise RuntimeError(f"the server indexed {batch.file_counts.completed} of {files} files")
        chunks = sum(len(client.vector_stores.files.content(i, vector_store_id=store_id).data) for i in ids)
        http_search, direct_search = [], []
        for query in queries[:50]:  # alternating, so drift on a shared machine hits both alike
            started = time.perf_counter()
            client.vector_stores.search(store_id, query=query, max_num_results=10)
            http_search.append(time.perf_counter() - started)
            started = time.perf_counter()
            vector = encoder.encode([query], is_query=True)[0].tolist()
            direct_store.search("files", vector, query, 10)
            direct_search.append(time.perf_counter() - started)
    finally:
        client.vector_stores.delete(store_id)
        direct_store.close()
        shutil.rmtree(workdir, ignore_errors=True)
    figures: dict[str, Any] = {
        "http_ingest_chunks_per_s": chunks / http_s,
        "http_ingest_files_per_s": files / http_s,
        "http_chunks": chunks,
        "direct_chunks": direct.chunks,
        "direct_ingest_chunks_per_s": direct.chunks_per_s,
    }
    figures["http_search_ms_p50"], figures["http_search_ms_p99"] = percentiles(http_search)
    figures["direct_search_ms_p50"], figures["direct_search_ms_p99"] = percentiles(direct_search)
    figures["http_over_direct_search_p50"] = figures["http_search_ms_p50"] / figures["direct_search_ms_p50"]
    figures["http_over_direct_ingest_rate"] = figures["http_ingest_chunks_per_s"] / direct.chunks_per_s
    return figures


def _chat_ratio(base_url: str, model: str, requests: int) -> dict[str, float]:
    """Median latency per mode; the modes alternate request by request so drift hits both alike."""
    import statistics

    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused")
    questions = [f"{topic}?" for topic in _DEMO_QUESTIONS][: max(1, requests)]
    times: dict[str, list[float]] = {"none": [], "text": []}
    for question in [*questions, *questions]:  # the first pass also warms caches for both modes
        for mode in ("none", "text"):
            started = time.perf_counter()
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": question}],
                max_tokens=16,
                temperature=0,
                extra_body={"retrieval": {"mode": mode}},
            )
            times[mode].append(time.perf_counter() - started)
    half = len(questions)
    none_ms = statistics.median(times["none"][half:]) * 1000
    text_ms = statistics.median(times["text"][half:]) * 1000
    return {"chat_none_ms_p50": none_ms, "chat_text_ms_p50": text_ms, "text_mode_latency_ratio": text_ms / none_ms}


_DEMO_QUESTIONS = (
    "How long is the main span of the Kessel Span",
    "What does the Marlow courier robot whistle",
    "How deep is the chapel of the Aurel salt mine",
    "Which piece is added in Copperfield chess",
    "Where do lamplight glass frogs live",
    "How does mmrag handle Milvus failures",
    "What does AIM do to visual tokens",
    "How does LOOK-M compress the KV cache",
    "Which encoder does mmrag use by default",
    "How do I delete the chunks of one file",
)


def _plot(samples: dict[str, list[float]], figures: dict[str, Any], path: Path) -> None:
    from mmrag.benchmarks.common import pyplot

    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = ["search", "flat_search", "hybrid", "retrieve"]
    left.boxplot([[s * 1000 for s in samples[k]] for k in labels], tick_labels=labels, showfliers=True)
    left.set_ylabel("latency (ms)")
    left.set_title(f"Milvus Lite, {figures['chunks']} chunks, top 10")
    by_ef = figures["recall_at_10_by_ef"]
    right.plot([int(ef) for ef in by_ef], list(by_ef.values()), marker="o", color="tab:green", label="HNSW vs FLAT")
    right.axhline(0.95, color="tab:red", linestyle="--", label="target 0.95")
    right.set_xlabel("HNSW search ef")
    right.set_ylabel("recall@10")
    right.set_ylim(min(0.8, *by_ef.values()) - 0.02, 1.01)
    right.legend(loc="lower right")
    right.set_title(
        f"ingest {figures['ingest_chunks_per_s']:.0f} chunks/s (embed + upsert), "
        f"upsert {figures['upsert_chunks_per_s']:.0f}/s",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
