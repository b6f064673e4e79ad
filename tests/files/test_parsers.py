"""The document parsers on small generated files: kinds detected from bytes, text and metadata out, and a
ParseError (with a message a client can act on) for encrypted, corrupt, oversized and unsupported files."""

from __future__ import annotations

import pickle

import pytest

from mmrag.serving.files.config import ParsingConfig
from mmrag.serving.files.parsers import ParseError, detect_kind, parse
from tests.files.documents import flate_bomb_pdf, pdf_bytes, png_bytes

HTML = b"""<!DOCTYPE html>
<html><head><title>Vellmora herons</title><style>body { color: red }</style>
<script>var secret = "never indexed";</script></head>
<body><h1>Herons of <b>Vellmora</b></h1>
<p>The grey heron nests in reed beds.</p>
<div hidden>hidden text</div>
<img src="heron.jpg" alt="A grey heron standing in reeds">
<noscript>enable javascript</noscript>
<ul><li>fish</li><li>frogs</li></ul>
</body></html>"""


def test_pdf_text_per_page_with_title():
    parsed = parse(pdf_bytes(["The grey heron nests in reeds.", "", "Page three (last)."], title="Herons"), "h.pdf")
    assert parsed.kind == "pdf" and parsed.title == "Herons"
    # The empty page 2 yields no section; the others keep their page numbers.
    assert [(s.text, s.metadata) for s in parsed.sections] == [
        ("The grey heron nests in reeds.", {"page": 1}),
        ("Page three (last).", {"page": 3}),
    ]


def test_pdf_is_detected_by_its_bytes_not_its_name():
    assert parse(pdf_bytes(["Named like text."]), "notes.txt").kind == "pdf"


def test_encrypted_pdf_fails_clearly_but_an_empty_user_password_opens():
    with pytest.raises(ParseError, match="encrypted with a password") as caught:
        parse(pdf_bytes(["secret"], password="hunter2"), "locked.pdf")
    assert caught.value.code == "invalid_file" and str(caught.value).startswith("locked.pdf: ")
    # Restrictions only (no user password): readable, as every PDF viewer reads it.
    parsed = parse(pdf_bytes(["open to read"], password="", owner_password="owner"), "restricted.pdf")
    assert parsed.sections[0].text == "open to read"


@pytest.mark.parametrize("cut", [0.2, 0.6])
def test_corrupt_pdf_fails_with_a_reason(cut):
    data = pdf_bytes(["some text"])
    with pytest.raises(ParseError, match="corrupt or unreadable PDF"):
        parse(data[: int(len(data) * cut)], "broken.pdf")


def test_pdf_extension_without_pdf_bytes_is_refused():
    with pytest.raises(ParseError, match="not a valid PDF"):
        parse(b"just some words", "fake.pdf")


def test_pdf_limits_pages_and_text():
    data = pdf_bytes(["one", "two", "three"])
    with pytest.raises(ParseError, match=r"3 pages, more than 2 \(files.parsing.max_pages\)"):
        parse(data, "long.pdf", ParsingConfig(max_pages=2))
    with pytest.raises(ParseError, match="max_text_chars"):
        parse(pdf_bytes(["x" * 50, "y" * 50]), "wordy.pdf", ParsingConfig(max_text_chars=60))


def test_pdf_stream_decompression_is_capped():
    # A page whose content stream inflates from ~5 KB to 5 MB: read by default, refused under a 1 MB cap.
    data = flate_bomb_pdf(5_000_000)
    assert len(data) < 50_000
    assert set(parse(data, "bomb.pdf").text) == {"a"}  # 5 MB of it, within the default cap
    with pytest.raises(ParseError, match=r"inflates past 1000000 bytes \(files.parsing.max_decompressed_bytes\)"):
        parse(data, "bomb.pdf", ParsingConfig(max_decompressed_bytes=1_000_000))


def test_html_visible_text_title_and_alt_texts():
    parsed = parse(HTML, "page.html")
    assert parsed.kind == "html" and parsed.title == "Vellmora herons"
    text = parsed.text
    assert "Herons of Vellmora" in text  # inline <b> joins its neighbours
    assert "The grey heron nests in reed beds." in text
    assert "[image: A grey heron standing in reeds]" in text
    assert "fish\nfrogs" in text
    for hidden in ("never indexed", "color: red", "hidden text", "enable javascript"):
        assert hidden not in text
    assert [(r.src, r.alt) for r in parsed.image_refs] == [("heron.jpg", "A grey heron standing in reeds")]
    assert parsed.sections[0].metadata == {"title": "Vellmora herons"}


def test_html_is_sniffed_without_an_extension_and_its_charset_honoured():
    page = '<html><head><meta charset="iso-8859-1"></head><body><p>Caf\xe9</p></body></html>'.encode("latin-1")
    parsed = parse(page, "download")
    assert parsed.kind == "html" and parsed.text == "Café"


def test_markdown_and_text():
    parsed = parse(b"# Herons\r\n\r\nThey eat fish.\r\n", "notes.md")
    assert parsed.kind == "markdown" and parsed.title == "Herons"
    assert parsed.sections[0].text == "# Herons\n\nThey eat fish.\n" and parsed.sections[0].metadata == {}
    assert parse(b"plain words", "a.txt").kind == "text"
    assert parse(b"a,b\n1,2\n", "table.csv").kind == "text"  # other text files read as text


def test_undecodable_text_names_the_byte():
    with pytest.raises(ParseError, match=r"not UTF-8 text \(invalid byte 0xff at offset 3\)"):
        parse(b"abc\xff\xfe def", "latin.txt")


def test_jsonl_rows_with_line_numbers():
    data = b'{"text": "one", "metadata": {"lang": "en"}}\n\n{"text": "two"}\n'
    parsed = parse(data, "rows.jsonl")
    assert [(s.text, s.metadata) for s in parsed.sections] == [
        ("one", {"lang": "en", "line": 1}),
        ("two", {"line": 3}),
    ]
    with pytest.raises(ParseError, match=r"^rows.jsonl:2: not JSON"):
        parse(b'{"text": "ok"}\n{broken\n', "rows.jsonl")
    with pytest.raises(ParseError, match=r"rows.jsonl:1: metadata must be an object"):
        parse(b'{"text": "ok", "metadata": [1]}\n', "rows.jsonl")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_images_are_decoded_and_named(fmt):
    parsed = parse(png_bytes((12, 7), fmt=fmt), f"red heron.{fmt.lower()}")
    assert parsed.kind == "image" and parsed.sections == []
    (image,) = parsed.images
    assert image.format == fmt and image.size == (12, 7) and image.image.size == (12, 7)
    assert image.text == f"red heron.{fmt.lower()}"


def test_image_limits_and_corruption():
    with pytest.raises(ParseError, match=r"200x200 pixels, more than 10000"):
        parse(png_bytes((200, 200)), "big.png", ParsingConfig(max_image_pixels=10_000))
    with pytest.raises(ParseError, match="max_image_bytes"):
        parse(png_bytes((64, 64)), "big.png", ParsingConfig(max_image_bytes=50))
    data = png_bytes((64, 64))
    with pytest.raises(ParseError, match="corrupt or unsupported image"):
        parse(data[: len(data) // 2], "cut.png")
    with pytest.raises(ParseError, match="not a valid PNG"):
        parse(b"hello", "fake.png")


@pytest.mark.parametrize(
    ("data", "name", "what"),
    [
        (b"PK\x03\x04" + b"\x00" * 40, "report.docx", "ZIP archive"),
        (b"GIF89a" + b"\x00" * 40, "anim.gif", "GIF image"),
        (bytes(range(256)), "blob.bin", "binary content"),
    ],
)
def test_unsupported_types_are_named(data, name, what):
    with pytest.raises(ParseError, match=what) as caught:
        parse(data, name)
    assert caught.value.code == "unsupported_file"
    assert "supported: PDF, HTML, Markdown" in str(caught.value)


def test_text_and_html_size_limits():
    with pytest.raises(ParseError, match=r"max_text_chars"):
        parse(b"x" * 41, "a.txt", ParsingConfig(max_text_chars=10))  # refused before decoding
    with pytest.raises(ParseError, match=r"max_text_chars"):
        parse(b"x" * 11, "a.md", ParsingConfig(max_text_chars=10))
    with pytest.raises(ParseError, match=r"HTML page larger than 100 bytes"):
        parse(b"<html><body>" + b"x" * 100 + b"</body></html>", "a.html", ParsingConfig(max_html_bytes=100))


def test_empty_and_oversized_files():
    with pytest.raises(ParseError, match="no text to index"):
        parse(b"  \n", "empty.md")
    assert parse(b"", "empty.md", require_text=False).sections[0].text == ""
    with pytest.raises(ParseError, match=r"files\.parsing\.max_bytes"):
        parse(b"x" * 101, "a.txt", ParsingConfig(max_bytes=100))


def test_messages_never_carry_a_path_and_errors_pickle():
    with pytest.raises(ParseError) as caught:
        parse(b"\x00\x01", "/srv/secret/dir/blob.bin")
    assert "/srv" not in str(caught.value) and str(caught.value).startswith("blob.bin: ")
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.name, copy.reason, copy.code, str(copy)) == (
        caught.value.name,
        caught.value.reason,
        caught.value.code,
        str(caught.value),
    )


def test_pdf_header_inside_text_does_not_make_a_pdf():
    note = b"# PDF notes\n\nEvery PDF starts with %PDF-1.7 and ends with %%EOF.\n"
    assert parse(note, "notes.md").kind == "markdown"
    assert detect_kind(b"junk\n" + pdf_bytes(["x"]), "late-header.pdf") == "pdf"  # tolerated for a .pdf
    with pytest.raises(ParseError, match="UTF-16 text; save it as UTF-8"):
        parse("hello".encode("utf-16"), "wide.txt")


def test_detect_kind_prefers_magic():
    assert detect_kind(png_bytes(), "photo.txt") == "image"
    assert detect_kind(b"# title", "x.markdown") == "markdown"
    assert detect_kind(b"<!-- c --><html><body>x</body></html>", "page") == "html"
