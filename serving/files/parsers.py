"""Documents from files: PDF, HTML, Markdown, plain text, JSONL and images (PNG, JPEG, WebP).

:func:`parse` detects the kind from the bytes first (magic numbers: ``%PDF-``, PNG, JPEG, WebP) and from
the file name's extension second; a client's Content-Type is never consulted. Each kind has one small
function in :data:`PARSERS`, and every one of them returns a :class:`ParsedFile`: text sections with their
metadata (a PDF's page, a JSONL row's line), and images. Anything that cannot be read (encrypted, corrupt,
unsupported, past a limit of :class:`~mmrag.serving.files.config.ParsingConfig`) raises :class:`ParseError`,
whose message is safe to show a client (it names no server path).

Parsing is CPU work: run it off the event loop.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmrag.serving.files.config import ParsingConfig

# pypdf logs a warning for every oddity of a damaged file ("EOF marker not found") before it raises or
# recovers; the outcome is reported here (a ParseError, or the text), so its warnings are only noise.
logging.getLogger("pypdf").setLevel(logging.ERROR)

Kind = Literal["pdf", "html", "markdown", "text", "jsonl", "image"]

_EXTENSIONS: dict[str, Kind] = {
    ".pdf": "pdf",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".md": "markdown",
    ".markdown": "markdown",
    ".jsonl": "jsonl",
    ".txt": "text",
    ".text": "text",
    ".png": "image",
    ".jpg": "image",
    ".jpeg": "image",
    ".webp": "image",
}
_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# Binary formats recognised only to name them in the error (zip also covers docx/xlsx/pptx).
_OTHER_MAGIC = {
    b"PK\x03\x04": "a ZIP archive (docx/xlsx/pptx included)",
    b"\x1f\x8b": "a gzip archive",
    b"GIF8": "a GIF image",
    b"\xd0\xcf\x11\xe0": "an old Office document",
    b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image",
    b"BM": "a BMP image",
}
_HTML_START = re.compile(rb"\s*(<!--.*?-->\s*)*<(!doctype\s+html|html[\s>])", re.IGNORECASE | re.DOTALL)


class ParseError(ValueError):
    """A file that cannot be turned into documents: ``"<name>: <reason>"``, in a client's terms (``name`` is
    the file's name, never a server path; callers that know better, like the CLI, re-raise with a path)."""

    def __init__(self, name: str, reason: str, code: Literal["invalid_file", "unsupported_file"] = "invalid_file"):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason
        self.code = code  # OpenAI's vector store file last_error.code

    def __reduce__(self):  # the fields survive pickling (Ray carries exceptions across processes)
        return (type(self), (self.name, self.reason, self.code))


@dataclass(frozen=True)
class Section:
    """A run of text and where it came from (``{"page": 3}``, ``{"line": 7, ...}``; ``{}`` for a whole file)."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageRef:
    """An image an HTML page shows (not fetched): its ``src`` and ``alt`` text."""

    src: str
    alt: str


@dataclass(frozen=True)
class ParsedImage:
    """A validated image file: decoded, with its format and size, and the text that indexes it for now."""

    image: Any  # PIL.Image.Image, fully loaded
    format: str  # PNG, JPEG or WEBP
    size: tuple[int, int]
    text: str  # the file name, for now; the vector store decides how images are indexed


@dataclass(frozen=True)
class ParsedFile:
    kind: Kind
    sections: list[Section]
    images: list[ParsedImage] = field(default_factory=list)
    title: str | None = None
    image_refs: list[ImageRef] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n\n".join(s.text for s in self.sections)


def detect_kind(data: bytes, filename: str) -> Kind:
    """The kind of a file from its leading bytes, else its extension; :class:`ParseError` if unsupported."""
    head = data[:1024]
    suffix = Path(filename).suffix.lower()
    claimed = _EXTENSIONS.get(suffix)
    # Readers accept the PDF header anywhere in the first 1024 bytes; there it counts only for a .pdf name,
    # so a text file that mentions "%PDF-" near its start stays text.
    if head.startswith(b"%PDF-") or (claimed == "pdf" and b"%PDF-" in head):
        return "pdf"
    if head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff"):
        return "image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ParseError(_name(filename), "UTF-16 text; save it as UTF-8")
    if claimed in ("pdf", "image"):
        what = suffix[1:].upper()
        raise ParseError(_name(filename), f"the content is not a valid {what} file (corrupt or mislabelled)")
    for magic, what in _OTHER_MAGIC.items():
        if head.startswith(magic):
            raise ParseError(_name(filename), f"unsupported file type ({what}); {_SUPPORTED}", "unsupported_file")
    if b"\x00" in data[:8192]:
        raise ParseError(_name(filename), f"unsupported file type (binary content); {_SUPPORTED}", "unsupported_file")
    if claimed is not None:
        return claimed
    if _HTML_START.match(head):
        return "html"
    return "text"  # any other text file (.csv, .rst, source code...) is read as plain text


def parse(data: bytes, filename: str, limits: ParsingConfig | None = None, *, require_text: bool = True) -> ParsedFile:
    """Parse a file's bytes (``filename`` gives its extension and names it in messages). ``require_text``:
    a file with nothing to index (no text, no image) is a :class:`ParseError`."""
    limits = limits or ParsingConfig()
    if len(data) > limits.max_bytes:
        raise ParseError(_name(filename), f"larger than {limits.max_bytes} bytes (files.parsing.max_bytes)")
    parsed = PARSERS[detect_kind(data, filename)](data, filename, limits)
    if require_text and not parsed.images and not any(s.text.strip() for s in parsed.sections):
        hint = " (a scanned PDF? text is not recognised in images)" if parsed.kind == "pdf" else ""
        raise ParseError(_name(filename), f"no text to index{hint}")
    return parsed


def parse_path(
    path: Path, limits: ParsingConfig | None = None, filename: str | None = None, *, require_text: bool = True
) -> ParsedFile:
    limits = limits or ParsingConfig()
    filename = filename or path.name
    if path.stat().st_size > limits.max_bytes:  # refused before reading it into memory
        raise ParseError(_name(filename), f"larger than {limits.max_bytes} bytes (files.parsing.max_bytes)")
    return parse(path.read_bytes(), filename, limits, require_text=require_text)


def decode_text(data: bytes, filename: str) -> str:
    """UTF-8 text with newlines normalised as Python's text files do (so ids match ``read_text``)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError(
            _name(filename),
            f"not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8",
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _decoded(data: bytes, filename: str, limits: ParsingConfig) -> str:
    # UTF-8 takes at most 4 bytes a character: past 4 x max_text_chars bytes the text is too long for sure,
    # and is refused before decoding allocates it.
    if len(data) > 4 * limits.max_text_chars:
        raise _too_much_text(filename, limits)
    return _capped(decode_text(data, filename), filename, limits)


def parse_text(data: bytes, filename: str, limits: ParsingConfig) -> ParsedFile:
    text = _decoded(data, filename, limits)
    return ParsedFile("text", [Section(text)])


def parse_markdown(data: bytes, filename: str, limits: ParsingConfig) -> ParsedFile:
    text = _decoded(data, filename, limits)
    heading = re.search(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", text, re.MULTILINE)
    return ParsedFile("markdown", [Section(text)], title=heading.group(1) if heading else None)


def jsonl_sections(lines: Iterable[str], where: str) -> Iterator[Section]:
    """One section per ``{"text": str, "metadata": object}`` row (blank lines skipped); the row's line
    number joins its metadata as ``line``. ``where`` prefixes error messages (a path or a file name)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ParseError(f"{where}:{number}", f"not JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ParseError(f"{where}:{number}", 'expected {"text": str, "metadata": object}')
        metadata = record.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ParseError(f"{where}:{number}", "metadata must be an object")
        yield Section(record["text"], {**metadata, "line": number})


def parse_jsonl(data: bytes, filename: str, limits: ParsingConfig) -> ParsedFile:
    text = _decoded(data, filename, limits).removeprefix("\ufeff")
    return ParsedFile("jsonl", list(jsonl_sections(text.split("\n"), _name(filename))))


def parse_pdf(data: bytes, filename: str, limits: ParsingConfig) -> ParsedFile:
    """Text per page (pypdf), with every decompression capped at ``max_decompressed_bytes``."""
    import pypdf
    from pypdf.errors import FileNotDecryptedError, LimitReachedError

    name = _name(filename)
    cap = limits.max_decompressed_bytes
    caps = {
        "zlib_maximum_output_length": cap,
        "lzw_maximum_output_length": cap,
        "run_length_maximum_output_length": cap,
        "array_based_stream_maximum_output_length": cap,
        "maximum_declared_stream_length": cap,
        "jbig2_maximum_output_length": cap,
    }
    sections: list[Section] = []
    chars = 0
    try:
        with pypdf.apply_configuration(**caps):
            reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
            if reader.is_encrypted and not _opens_without_password(reader):
                raise ParseError(name, "the PDF is encrypted with a password; upload an unencrypted copy")
            pages = len(reader.pages)
            if pages > limits.max_pages:
                raise ParseError(name, f"{pages} pages, more than {limits.max_pages} (files.parsing.max_pages)")
            title = (reader.metadata.title if reader.metadata else None) or None
            for number, page in enumerate(reader.pages, start=1):
                text = page.extract_text() or ""
                chars += len(text)
                if chars > limits.max_text_chars:
                    raise _too_much_text(filename, limits)
                if text.strip():
                    sections.append(Section(text, {"page": number}))
    except ParseError:
        raise
    except LimitReachedError:
        raise ParseError(
            name, f"a compressed stream inflates past {cap} bytes (files.parsing.max_decompressed_bytes)"
        ) from None
    except FileNotDecryptedError:
        raise ParseError(name, "the PDF is encrypted with a password; upload an unencrypted copy") from None
    except Exception as exc:  # pypdf raises many types on damaged input (PdfReadError, KeyError, ValueError...)
        raise ParseError(name, f"corrupt or unreadable PDF ({type(exc).__name__}: {str(exc)[:200]})") from None
    return ParsedFile("pdf", sections, title=str(title) if title else None)


def _opens_without_password(reader: Any) -> bool:
    """Many PDFs are encrypted with an empty user password (only printing or copying restricted): those
    open for reading with no password. Anything else needs one, which an upload cannot carry."""
    from pypdf import PasswordType

    try:
        return reader.decrypt("") != PasswordType.NOT_DECRYPTED
    except Exception:  # an unsupported algorithm, or AES without a crypto library installed
        return False


# Elements whose text is never shown; their content is dropped before the text is read.
_HTML_HIDDEN = ("script", "style", "noscript", "template", "head", "svg", "canvas", "iframe", "object")
# Elements after which the visible text breaks a line (inline ones, like <b>, join their neighbours).
_HTML_BLOCKS = (
    "p", "div", "br", "hr", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "section", "article", "header",
    "footer", "nav", "aside", "main", "blockquote", "pre", "figure", "figcaption", "h1", "h2", "h3", "h4", "h5",
    "h6", "td", "th", "caption", "form", "address", "details", "summary",
)  # fmt: skip


def parse_html(data: bytes, filename: str, limits: ParsingConfig) -> ParsedFile:
    """Visible text (scripts, styles and hidden elements dropped), the title, and each image's alt text in
    place as ``[image: alt]`` (also returned in ``image_refs``)."""
    from bs4 import BeautifulSoup

    if len(data) > limits.max_html_bytes:
        raise ParseError(
            _name(filename), f"HTML page larger than {limits.max_html_bytes} bytes (files.parsing.max_html_bytes)"
        )
    # bs4 decodes the bytes itself: the declared <meta charset>, a BOM, else a guess.
    soup = BeautifulSoup(data, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else None
    for tag in soup.find_all(_HTML_HIDDEN):
        tag.decompose()
    for tag in soup.find_all(lambda t: t.has_attr("hidden") or t.get("aria-hidden") == "true"):
        tag.decompose()
    refs = []
    for img in soup.find_all("img"):
        alt = " ".join(str(img.get("alt") or "").split())
        refs.append(ImageRef(src=str(img.get("src") or ""), alt=alt))
        img.replace_with(f" [image: {alt}] " if alt else " ")
    for tag in soup.find_all(_HTML_BLOCKS):
        tag.insert_after("\n")
    lines = (" ".join(line.split()) for line in soup.get_text().split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    text = _capped(text, filename, limits)
    metadata = {"title": title} if title else {}
    return ParsedFile("html", [Section(text, metadata)], title=title, image_refs=refs)


def parse_image(data: bytes, filename: str, limits: ParsingConfig) -> ParsedFile:
    """A PNG, JPEG or WebP file, checked (size, declared pixels) before it is decoded, then decoded whole
    (a truncated or damaged file fails here, not when a model reads it). Its text is its file name."""
    from PIL import Image, UnidentifiedImageError

    name = _name(filename)
    if len(data) > limits.max_image_bytes:
        raise ParseError(name, f"image larger than {limits.max_image_bytes} bytes (files.parsing.max_image_bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS)
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise ParseError(
                name, f"{width}x{height} pixels, more than {limits.max_image_pixels} (files.parsing.max_image_pixels)"
            )
        fmt = image.format
        image.load()
    except ParseError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ParseError(name, f"corrupt or unsupported image ({type(exc).__name__})") from None
    return ParsedFile("image", [], images=[ParsedImage(image, fmt, (width, height), name)], title=name)


PARSERS: dict[Kind, Callable[[bytes, str, ParsingConfig], ParsedFile]] = {
    "pdf": parse_pdf,
    "html": parse_html,
    "markdown": parse_markdown,
    "text": parse_text,
    "jsonl": parse_jsonl,
    "image": parse_image,
}

_SUPPORTED = "supported: PDF, HTML, Markdown, plain text, JSONL, PNG, JPEG, WebP"


def _capped(text: str, filename: str, limits: ParsingConfig) -> str:
    if len(text) > limits.max_text_chars:
        raise _too_much_text(filename, limits)
    return text


def _too_much_text(filename: str, limits: ParsingConfig) -> ParseError:
    return ParseError(
        _name(filename), f"more than {limits.max_text_chars} characters of text (files.parsing.max_text_chars)"
    )


def _name(filename: str) -> str:
    """A file's name for messages: its last component only (no server path), clipped."""
    name = Path(filename).name or "file"
    return name if len(name) <= 100 else name[:100] + "..."
