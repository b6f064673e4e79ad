"""Ingestion: files -> documents -> token-aware chunks -> vectors -> idempotent upsert, with a summary.

Inputs: ``.txt`` and ``.md`` files (one document each), ``.pdf`` files (one document per page with text,
``metadata["page"]``), ``.html``/``.htm`` pages (their visible text and image alt texts, ``metadata["title"]``),
``.jsonl`` files (one ``{"text", "metadata"}`` document per line; its source is the file, its line number
goes to ``metadata["line"]``), and folders of them (recursive, hidden entries skipped). Files are read by
:mod:`mmrag.serving.files.parsers`, the same parsers as uploads, with their limits. A chunk's id hashes its
source, text and metadata, so ingesting the same content twice writes nothing the second time; chunks
already stored are not even embedded again. ``replace=True`` first deletes every chunk of each ingested
source, for files whose content changed. New writes are flushed at the end, so searches use the built index.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmrag.serving.files.config import ParsingConfig
from mmrag.serving.files.parsers import ParseError, jsonl_sections, parse_path
from mmrag.serving.retrieval.chunking import chunk_text
from mmrag.serving.retrieval.config import RetrievalConfig
from mmrag.serving.retrieval.encoders import Encoder
from mmrag.serving.retrieval.store import ChunkRow, MilvusStore

SUFFIXES = (".txt", ".md", ".jsonl", ".pdf", ".html", ".htm")


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    metadata: dict[str, Any]


@dataclass
class IngestSummary:
    collection: str
    files: int = 0
    documents: int = 0
    chunks: int = 0
    new_chunks: int = 0
    deleted_chunks: int = 0
    seconds: float = 0.0

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        return (
            f"{self.collection}: {self.files} files, {self.documents} documents, {self.chunks} chunks "
            f"({self.new_chunks} new, {self.chunks - self.new_chunks} already stored"
            + (f", {self.deleted_chunks} replaced" if self.deleted_chunks else "")
            + f") in {self.seconds:.1f} s, {self.chunks_per_s:.1f} chunks/s"
        )


def find_files(paths: Iterable[str | Path], suffixes: Sequence[str] = SUFFIXES) -> list[Path]:
    """The ingestible files under ``paths``, in a stable order; an unsupported explicit file is an error."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in suffixes
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            if path.suffix.lower() not in suffixes:
                raise ValueError(f"{path}: unsupported file type (supported: {', '.join(suffixes)})")
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return list(dict.fromkeys(found))


def source_name(path: Path, root: Path | None) -> str:
    """The ``source`` of a file: relative to ``root`` when under it (stable ids across machines)."""
    resolved = path.resolve()
    if root is not None and resolved.is_relative_to(root.resolve()):
        return resolved.relative_to(root.resolve()).as_posix()
    return resolved.as_posix()


def read_documents(path: Path, source: str, limits: ParsingConfig | None = None) -> Iterator[Document]:
    """The documents of one file; a file that cannot be read raises :class:`ParseError` naming its path."""
    if path.suffix.lower() == ".jsonl":  # streamed line by line: a corpus file may be larger than memory
        with path.open(encoding="utf-8") as lines:
            for section in jsonl_sections(lines, str(path)):
                yield Document(section.text, source, section.metadata)
        return
    try:
        parsed = parse_path(path, limits, require_text=False)  # an empty file is no documents, not an error
    except ParseError as exc:
        raise ParseError(str(path), exc.reason, exc.code) from None
    for section in parsed.sections:
        yield Document(section.text, source, section.metadata)


def chunk_documents(documents: Iterable[Document], encoder: Encoder, config: RetrievalConfig) -> list[ChunkRow]:
    chunking = config.chunking
    limit = encoder.max_tokens - encoder.special_tokens
    if chunking.chunk_tokens > limit:
        raise ValueError(
            f"chunking.chunk_tokens={chunking.chunk_tokens} exceeds what {encoder.name} embeds "
            f"({limit} tokens); lower it"
        )
    rows: dict[str, ChunkRow] = {}
    for doc in documents:
        for chunk in chunk_text(doc.text, encoder.token_spans, chunking.chunk_tokens, chunking.overlap_tokens):
            row = ChunkRow(chunk.text, doc.source, {**doc.metadata, "chunk_index": chunk.index})
            rows.setdefault(row.id, row)  # the same content twice in one run is stored once
    return list(rows.values())


def ensure_collection(
    store: MilvusStore, collection: str, encoder: Encoder, xrag_encoder: Encoder | None = None
) -> bool:
    """Create the collection for ``encoder`` or check that it matches; True when created."""
    if store.has_collection(collection):
        store.check_encoder(collection, encoder, xrag_encoder)
        return False
    store.create_collection(collection, encoder, xrag_encoder)
    return True


def ingest_documents(
    documents: Sequence[Document],
    store: MilvusStore,
    encoder: Encoder,
    config: RetrievalConfig,
    *,
    collection: str | None = None,
    replace: bool = False,
    batch_size: int = 256,
    progress: bool = True,
    xrag_encoder: Encoder | None = None,
    summary: IngestSummary | None = None,
) -> IngestSummary:
    from tqdm import tqdm

    started = time.perf_counter()
    collection = collection or config.collection
    summary = summary or IngestSummary(collection)
    ensure_collection(store, collection, encoder, xrag_encoder)
    if replace:
        for source in dict.fromkeys(d.source for d in documents):
            summary.deleted_chunks += store.delete_source(collection, source)
    rows = chunk_documents(documents, encoder, config)
    summary.documents += len(documents)
    summary.chunks += len(rows)
    with tqdm(total=len(rows), unit="chunk", desc=f"ingest {collection}", disable=not progress) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            stored = store.existing_ids(collection, [r.id for r in batch])
            fresh = [r for r in batch if r.id not in stored]
            if fresh:
                summary.new_chunks += store.upsert(collection, _to_records(fresh, encoder, xrag_encoder))
            bar.update(len(batch))
    if summary.new_chunks or summary.deleted_chunks:
        store.flush(collection)
    summary.seconds += time.perf_counter() - started
    return summary


def ingest_paths(
    paths: Iterable[str | Path],
    store: MilvusStore,
    encoder: Encoder,
    config: RetrievalConfig,
    *,
    source_root: Path | None = None,
    parse_limits: ParsingConfig | None = None,
    **kwargs: Any,
) -> IngestSummary:
    """Ingest files and folders; ``source_root`` makes sources relative (the CLI passes the cwd);
    ``parse_limits`` bound what one PDF or HTML file may cost (default: ``files.parsing``'s defaults)."""
    started = time.perf_counter()
    files = find_files(paths)
    documents = [doc for f in files for doc in read_documents(f, source_name(f, source_root), parse_limits)]
    summary = IngestSummary(kwargs.pop("collection", None) or config.collection, files=len(files))
    summary.seconds = time.perf_counter() - started  # reading counts too
    return ingest_documents(documents, store, encoder, config, collection=summary.collection, summary=summary, **kwargs)


def _to_records(rows: Sequence[ChunkRow], encoder: Encoder, xrag_encoder: Encoder | None) -> list[dict[str, Any]]:
    texts = [r.text for r in rows]
    dense = encoder.encode(texts)
    xrag = xrag_encoder.encode(texts) if xrag_encoder is not None else None
    records = []
    for i, row in enumerate(rows):
        record = {
            "id": row.id,
            "text": row.text,
            "source": row.source,
            "metadata": row.metadata,
            "dense": dense[i].tolist(),
        }
        if xrag is not None:
            record["xrag_vector"] = xrag[i].tolist()
        records.append(record)
    return records
