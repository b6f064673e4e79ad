"""Where attached files come from: the Files API's store (``serving/files``) and its parsers.

A thin adapter, so the service depends on two calls: :meth:`FileSource.filename` (does the file exist,
what is it called) and :meth:`FileSource.sections` (its text, in sections with their metadata). The
retriever replica reads the same ``files.directory`` the ingress writes (one machine, or a shared volume).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mmrag.serving.config import MmragConfig


@dataclass(frozen=True)
class TextSection:
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    image: Any = None  # an image file's decoded image (PIL), which the served model may describe


class UnreadableFile(Exception):
    """A file that yields no documents; ``code`` is OpenAI's ``last_error.code``."""

    def __init__(self, message: str, code: Literal["unsupported_file", "invalid_file"] = "invalid_file") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class FileSource:
    def __init__(self, config: MmragConfig) -> None:
        from mmrag.serving.files.config import FilesConfig
        from mmrag.serving.files.store import FileStore

        self.files_config = getattr(config, "files", None) or FilesConfig()
        self.store = FileStore(self.files_config)

    def filename(self, file_id: str, owner: str | None = None) -> str:
        """The file's name; raises the Files API's 404 (``NotFoundError`` naming ``file_id``), also for a file
        another key uploaded (``owner``: a key id; None: any file)."""
        return self.store.get(file_id, owner=owner).filename

    def sections(self, file_id: str) -> list[TextSection]:
        """The file's text sections; an image file's one section carries the image and the text that names it."""
        from mmrag.serving.files.parsers import ParseError, parse

        file, handle = self.store.open(file_id)
        with handle:
            limit = self.files_config.parsing.max_bytes
            data = handle.read(limit + 1)  # parse() refuses what is over the limit, naming it
        try:
            parsed = parse(data, file.filename, self.files_config.parsing)
        except ParseError as exc:
            raise UnreadableFile(str(exc), exc.code) from exc
        sections = [TextSection(s.text, dict(s.metadata)) for s in parsed.sections if s.text.strip()]
        sections += [TextSection(image.text, {"image": True}, image.image) for image in parsed.images]
        return sections
