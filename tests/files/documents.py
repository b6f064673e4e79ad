"""Small documents generated in tests: PDFs written with pypdf (text pages, encrypted), PNGs with Pillow."""

from __future__ import annotations

import io
import zlib
from typing import Any

from PIL import Image
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, EncodedStreamObject, NameObject


def pdf_bytes(
    pages: list[str], *, password: str | None = None, owner_password: str | None = None, title: str | None = None
) -> bytes:
    """A PDF with one line of Helvetica text per page (pypdf writes the page content stream by hand);
    ``password`` (the user password, '' for none) with ``owner_password`` encrypts it."""
    writer = PdfWriter()
    for text in pages:
        page = writer.add_blank_page(612, 792)
        _add_font(writer, page)
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = DecodedStreamObject()
        stream.set_data(f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode("latin-1"))
        page[NameObject("/Contents")] = writer._add_object(stream)
    if title:
        writer.add_metadata({"/Title": title})
    if password is not None:
        writer.encrypt(user_password=password, owner_password=owner_password or password, algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def flate_bomb_pdf(inflated_bytes: int) -> bytes:
    """A one-page PDF whose content stream (one long string shown as text) inflates to ``inflated_bytes``."""
    writer = PdfWriter()
    page = writer.add_blank_page(100, 100)
    _add_font(writer, page)
    stream = EncodedStreamObject()
    content = b"BT /F1 12 Tf (" + b"a" * (inflated_bytes - len(b"BT /F1 12 Tf () Tj ET")) + b") Tj ET"
    stream._data = zlib.compress(content, 9)  # stored as is: the writer does not recompress it
    stream[NameObject("/Filter")] = NameObject("/FlateDecode")
    page[NameObject("/Contents")] = writer._add_object(stream)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _add_font(writer: PdfWriter, page: Any) -> None:
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        }
    )
    fonts = DictionaryObject({NameObject("/F1"): writer._add_object(font)})
    page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): fonts})


def png_bytes(size: tuple[int, int] = (8, 8), color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, fmt)
    return out.getvalue()
