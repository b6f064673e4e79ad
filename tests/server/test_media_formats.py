"""Image formats (issue 31): only PNG, JPEG, WebP and GIF are decoded. Every other format is a 400 naming the
content part, decided from the bytes by those four plugins alone: no other Pillow plugin looks at the bytes, so
EPS never reaches Ghostscript. Data URLs and remote URLs alike, and through the app."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mmrag.serving.errors import InvalidRequestError
from mmrag.serving.media import IMAGE_FORMATS, load_image
from mmrag.serving.openai.server import create_app
from mmrag.serving.pipeline import LocalBackend
from tests.fake_engine import FakeEngine
from tests.server.test_hostile_clients import assert_error, chat, make_config
from tests.server.test_media_fetch import PARAM, Server, policy

ACCEPTED = ["PNG", "JPEG", "WEBP", "GIF"]
# Tiny files Pillow writes itself; EPS is PostScript a decoder would hand to Ghostscript.
REFUSED = ["TIFF", "BMP", "ICO", "EPS", "PPM", "PCX", "TGA", "SGI", "DDS", "QOI", "JPEG2000", "PDF", "DIB"]
HANDWRITTEN = {
    "EPS-header": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n",
    "PSD-header": b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03\x00\x00\x00\x08\x00\x00\x00\x08\x00\x08\x00\x03",
    "SVG": b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>',
}


def encode(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def load(url: str, **limits) -> Image.Image:
    return asyncio.run(load_image(url, policy(**limits), param=PARAM))


@pytest.fixture
def only_accepted_plugins_run(monkeypatch):
    """Every plugin outside the allowlist replaced by a spy: a test fails if one even looks at the bytes."""
    Image.init()  # every plugin registered, so the spies cover them all
    touched: list[str] = []

    def spy(fmt: str):
        def called(*args, **kwargs):
            touched.append(fmt)
            return False

        return called

    for fmt in list(Image.OPEN):
        if fmt not in IMAGE_FORMATS:
            monkeypatch.setitem(Image.OPEN, fmt, (spy(fmt), spy(fmt)))
    return touched


def test_the_allowlist_is_what_the_docs_say():
    assert set(IMAGE_FORMATS) == set(ACCEPTED)


@pytest.mark.parametrize("fmt", ACCEPTED)
def test_accepted_formats_decode(fmt, only_accepted_plugins_run):
    image = load(data_url(encode(fmt)))
    assert image.size == (8, 8) and image.mode == "RGB"
    assert only_accepted_plugins_run == []


@pytest.mark.parametrize("name", REFUSED + list(HANDWRITTEN))
def test_other_formats_are_400s_before_any_other_plugin_runs(name, only_accepted_plugins_run):
    data = HANDWRITTEN.get(name) or encode(name)
    with pytest.raises(InvalidRequestError, match="only PNG, JPEG, WebP or GIF") as info:
        load(data_url(data))
    assert info.value.param == PARAM and info.value.status_code == 400
    assert only_accepted_plugins_run == []  # TIFF's, BMP's, EPS's... plugin never saw the bytes


def test_an_eps_never_reaches_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    def ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was called")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    with pytest.raises(InvalidRequestError, match="only PNG, JPEG, WebP or GIF"):
        load(data_url(encode("EPS"), "image/png"))  # the declared MIME type does not matter: the bytes decide


def test_a_mime_type_cannot_smuggle_a_format():
    # A PNG declared as TIFF is a PNG (decoded); a TIFF declared as PNG is refused.
    assert load(data_url(encode("PNG"), "image/tiff")).size == (8, 8)
    with pytest.raises(InvalidRequestError):
        load(data_url(encode("TIFF"), "image/png"))


@pytest.fixture(scope="module")
def format_server():
    server = Server(
        "127.0.0.1", 0, {f"/a.{fmt.lower()}": (200, {}, encode(fmt)) for fmt in ["PNG", "TIFF", "BMP", "EPS"]}
    )
    yield f"http://127.0.0.1:{server.port}"
    server.close()


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "EPS"])
def test_remote_images_of_other_formats_are_refused(format_server, fmt, only_accepted_plugins_run):
    allowed = {"image_url_allowlist": ["127.0.0.1"]}
    assert load(f"{format_server}/a.png", **allowed).size == (8, 8)
    with pytest.raises(InvalidRequestError, match="only PNG, JPEG, WebP or GIF") as info:
        load(f"{format_server}/a.{fmt.lower()}", **allowed)
    assert info.value.param == PARAM
    assert only_accepted_plugins_run == []


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "ICO", "EPS"])
def test_through_the_app_the_400_names_the_content_part(fmt):
    engine = FakeEngine(make_config())
    with TestClient(create_app(engine.config, LocalBackend(engine))) as http:
        ok = data_url(encode("PNG"))
        response = http.post("/v1/chat/completions", json=chat(engine, ok, data_url(encode(fmt))))
    assert_error(response, 400, "messages[0].content[2].image_url.url", "only PNG, JPEG, WebP or GIF")
