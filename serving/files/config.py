"""Configuration of uploaded files (``/v1/files``): where they are kept, how large they may be, and the
limits that bound what parsing one may cost (pages, extracted text, decompressed streams, image pixels).

Every field has a default: an empty ``files:`` section keeps uploads under the mmrag cache directory.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    """Unknown keys are errors (the same rule as the root config)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ParsingConfig(_Strict):
    """Bounds on parsing one file. A file past any of them fails with a message naming the limit, so an
    uploaded document costs at most so much CPU and memory however it was crafted."""

    max_bytes: int = Field(
        default=512 * 2**20, gt=0, description="Largest file parsed (bytes on disk, before any decompression)."
    )
    max_pages: int = Field(default=2000, gt=0, description="PDF: most pages read; a longer PDF fails.")
    max_text_chars: int = Field(
        default=20_000_000,
        gt=0,
        description="Most characters of text extracted from one file; past it parsing stops and the file fails.",
    )
    max_html_bytes: int = Field(
        default=50 * 2**20,
        gt=0,
        description="HTML: largest page parsed (its parse tree takes several times its size in memory).",
    )
    max_decompressed_bytes: int = Field(
        default=64 * 2**20,
        gt=0,
        description="PDF: most bytes one compressed stream may inflate to (pypdf's zlib/LZW/RLE limits), "
        "so a small PDF cannot expand into gigabytes.",
    )
    max_image_bytes: int = Field(default=20 * 2**20, gt=0, description="Images: largest encoded file.")
    max_image_pixels: int = Field(
        default=25_000_000,
        gt=0,
        description="Images: width x height as the header declares it, checked before decoding (decompression bombs).",
    )


class FilesConfig(_Strict):
    """Uploaded files: a directory of one folder per file (see :mod:`mmrag.serving.files.store`)."""

    directory: str | None = Field(
        default=None,
        description="Where uploads are kept (created if missing). None: `files/` under the mmrag cache "
        "directory ($MMRAG_CACHE_DIR or ~/.cache/mmrag). Give every replica the same directory (a shared "
        "volume) so any of them serves any file.",
    )
    max_file_bytes: int = Field(
        default=512 * 2**20,
        gt=0,
        description="Largest upload, counted while it streams in; past it the upload stops with a 413 and "
        "nothing is kept.",
    )
    upload_idle_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest wait for the next piece of an upload's body (a 408 after it, nothing kept): a "
        "trickle of bytes must not hold a connection and a staging file open. No total limit: a large upload "
        "on a slow link may take long.",
    )
    parsing: ParsingConfig = Field(default_factory=ParsingConfig)

    def resolved_directory(self) -> Path:
        from mmrag.serving.paths import cache_dir

        return Path(self.directory).expanduser() if self.directory else cache_dir() / "files"
