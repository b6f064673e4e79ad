"""Image loading under hostile input: bombs, bad bytes, bad schemes, inward URLs, redirects."""

import asyncio
import base64
import io
import struct
import threading
import typing
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from mmrag.serving.config import LimitsConfig
from mmrag.serving.errors import InvalidRequestError, OpenAIError, PayloadTooLargeError
from mmrag.serving.media import ImagePolicy, is_public_address, load_image, load_images


def png_bytes(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid PNG header declaring a huge canvas, with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def policy(**limits) -> ImagePolicy:
    return ImagePolicy.from_limits(LimitsConfig(**limits))


def load(url: str, p: ImagePolicy | None = None):
    return asyncio.run(load_image(url, p or policy(), param="messages[0].content[0].image_url.url"))


def test_data_url_decodes_to_rgb():
    image = load(data_url(png_bytes((5, 7))))
    assert image.size == (5, 7) and image.mode == "RGB"


@pytest.mark.parametrize(
    ("url", "error", "fragment"),
    [
        ("data:image/png;base64,%%%", InvalidRequestError, "invalid base64"),
        ("data:image/png,rawdata", InvalidRequestError, "data:<mime>;base64"),
        (data_url(b"hello, not an image"), InvalidRequestError, "not a decodable image"),
        (data_url(bomb_png()), PayloadTooLargeError, "pixels"),
        ("file:///etc/passwd", InvalidRequestError, "scheme 'file'"),
        ("ftp://example.com/a.png", InvalidRequestError, "scheme 'ftp'"),
        ("http://127.0.0.1:1/a.png", InvalidRequestError, "non-public"),
        ("http://169.254.169.254/latest/meta-data", InvalidRequestError, "non-public"),
        ("http://[::1]/a.png", InvalidRequestError, "non-public"),
        ("http://10.0.0.1/a.png", InvalidRequestError, "non-public"),
        ("http://localhost/a.png", InvalidRequestError, "non-public"),
        ("http://[::127.0.0.1]/a.png", InvalidRequestError, "non-public"),
        ("http://[::ffff:127.0.0.1]/a.png", InvalidRequestError, "non-public"),
        ("http://[64:ff9b::7f00:1]/a.png", InvalidRequestError, "non-public"),
        ("http://[2002:7f00:1::1]/a.png", InvalidRequestError, "non-public"),
        ("http://[fd00::1]/a.png", InvalidRequestError, "non-public"),
        ("http://[fec0::1]/a.png", InvalidRequestError, "non-public"),
    ],
)
def test_hostile_urls_are_4xx_naming_the_field(url, error, fragment):
    with pytest.raises(error, match=fragment) as info:
        load(url)
    assert info.value.param == "messages[0].content[0].image_url.url"
    assert 400 <= info.value.status_code < 500


def test_data_url_size_cap():
    with pytest.raises(PayloadTooLargeError):
        load(data_url(png_bytes((64, 64))), policy(max_image_bytes=50))


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("fe80::1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        # IPv6 forms that embed an IPv4 address are judged by it.
        ("::127.0.0.1", False),  # IPv4-compatible (deprecated)
        ("::a00:1", False),
        ("::ffff:10.0.0.1", False),  # IPv4-mapped
        ("::ffff:8.8.8.8", True),
        ("::ffff:0:7f00:1", False),  # SIIT IPv4-translated
        ("64:ff9b::7f00:1", False),  # NAT64, well-known prefix
        ("64:ff9b::a9fe:a9fe", False),  # ...to the metadata address
        ("64:ff9b::808:808", True),
        ("64:ff9b:1::808:808", False),  # NAT64, local-use prefix: refused whatever it carries
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2002:c0a8:101::1", False),  # 6to4 of 192.168.1.1
        ("2002:808:808::1", True),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
        ("fc00::1", False),  # unique-local
        ("fd12:3456::1", False),
        ("fec0::1", False),  # site-local
        ("fe80::1%eth0", False),
        ("4000::1", False),  # reserved, outside global unicast
        ("ff02::1", False),
        ("2001:4860:4860::8888", True),
    ],
)
def test_public_address_classification(address, public):
    assert is_public_address(address) is public


class _Handler(BaseHTTPRequestHandler):
    routes: typing.ClassVar[dict] = {}

    def do_GET(self):
        status, headers, body = self.routes[self.path]
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = server.server_address[1]
    _Handler.routes = {
        "/ok.png": (200, {"Content-Type": "image/png"}, png_bytes((9, 9))),
        "/missing.png": (404, {}, b""),
        "/hop": (302, {"Location": "/ok.png"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/x"}, b""),
        "/to-compatible": (302, {"Location": "http://[::127.0.0.1]/ok.png"}, b""),
        "/to-nat64": (302, {"Location": "http://[64:ff9b::7f00:1]/ok.png"}, b""),
        "/to-6to4": (302, {"Location": "http://[2002:7f00:1::1]/ok.png"}, b""),
        "/to-data": (302, {"Location": data_url(png_bytes())}, b""),
        "/to-bad-port": (302, {"Location": "http://127.0.0.1:99999/ok.png"}, b""),
        "/to-broken-ipv6": (302, {"Location": "http://[::1/ok.png"}, b""),
        "/big.png": (200, {}, b"\0" * 5000),
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


def test_allowlisted_host_fetches_and_follows_redirects(image_server):
    allowed = policy(image_url_allowlist=["127.0.0.1"])
    assert load(f"{image_server}/ok.png", allowed).size == (9, 9)
    assert load(f"{image_server}/hop", allowed).size == (9, 9)


@pytest.mark.parametrize(
    ("path", "error", "fragment"),
    [
        ("/missing.png", InvalidRequestError, "HTTP 404"),
        ("/loop", InvalidRequestError, "redirects"),
        ("/to-metadata", InvalidRequestError, "non-public"),
        ("/to-compatible", InvalidRequestError, "non-public"),
        ("/to-nat64", InvalidRequestError, "non-public"),
        ("/to-6to4", InvalidRequestError, "non-public"),
        ("/to-data", InvalidRequestError, "redirected to an invalid URL"),
        ("/to-bad-port", InvalidRequestError, "invalid port"),
        ("/to-broken-ipv6", InvalidRequestError, "could not fetch"),
        ("/big.png", PayloadTooLargeError, "larger than"),
    ],
)
def test_fetch_failures(image_server, path, error, fragment):
    allowed = policy(image_url_allowlist=["127.0.0.1"], max_image_bytes=4096)
    with pytest.raises(error, match=fragment):
        load(f"{image_server}{path}", allowed)


def test_loopback_refused_without_allowlist(image_server):
    with pytest.raises(OpenAIError, match="non-public"):
        load(f"{image_server}/ok.png")


def test_scheme_allowlist_can_forbid_remote_fetches():
    data_only = policy(image_url_schemes=["data"])
    assert load(data_url(png_bytes()), data_only).size == (8, 8)
    with pytest.raises(InvalidRequestError, match="scheme 'https' is not allowed"):
        load("https://example.com/a.png", data_only)


@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1), (1, 25_000_000), (21, 1)])
def test_elongated_images_are_refused_from_the_header(size):
    # bomb_png carries almost no pixel data: reaching the decoder would fail with another message.
    with pytest.raises(InvalidRequestError, match="aspect ratio") as info:
        load(data_url(bomb_png(*size)), policy(max_image_pixels=10**9))
    assert info.value.param == "messages[0].content[0].image_url.url"


def test_aspect_ratio_limit_is_inclusive_and_configurable():
    assert load(data_url(png_bytes((40, 2)))).size == (40, 2)  # 20:1, the default limit
    assert load(data_url(png_bytes((2, 60))), policy(max_image_aspect_ratio=30)).size == (2, 60)
    with pytest.raises(InvalidRequestError, match="aspect ratio"):
        load(data_url(png_bytes((2, 60))))


def test_request_pixel_budget_is_checked_from_headers_before_decoding():
    # Bomb headers (no pixel data behind them): the budget must refuse before any decoding starts.
    urls = [(f"messages[0].content[{i}].image_url.url", data_url(bomb_png(4000, 4000))) for i in range(4)]
    with pytest.raises(PayloadTooLargeError, match="pixels in all") as info:
        asyncio.run(load_images(urls, policy(max_request_image_pixels=40_000_000)))
    assert info.value.param == "messages[0].content[2].image_url.url"  # 3 x 16 Mpx crosses 40 Mpx


def test_request_pixel_budget_admits_what_fits():
    urls = [(f"p{i}", data_url(png_bytes((10, 10)))) for i in range(3)]
    assert [i.size for i in asyncio.run(load_images(urls, policy(max_request_image_pixels=300)))] == [(10, 10)] * 3
    with pytest.raises(PayloadTooLargeError):
        asyncio.run(load_images(urls, policy(max_request_image_pixels=299)))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_large_images_are_downscaled_with_their_aspect_kept(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (1200, 400), (10, 200, 30)).save(buf, fmt)
    image = load(data_url(buf.getvalue()), policy(image_downscale_pixels=30_000))
    width, height = image.size
    assert width * height <= 30_000 and (width, height) == (300, 100)
    assert image.mode == "RGB"
    assert load(data_url(buf.getvalue()), policy(image_downscale_pixels=480_000)).size == (1200, 400)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://127.0.0.1:99999/a.png", "invalid port"),
        ("http://127.0.0.1:abc/a.png", "invalid port"),
        ("https://[::1]:70000/a.png", "invalid port"),
        ("http://[::1/a.png", "malformed"),
        ("http://[zz::1]/a.png", "malformed"),
        ("http://127.0.0.1/a\n.png", "control"),
        ("http://127.0.0.1/a\x00.png", "control"),
        ("http://127.0.0.1\r\nX-Injected: 1/a.png", "control"),
        ("http://127.0.0.1/\u2028", "control"),
        ("http://a..b/a.png", "invalid host name"),
        ("http://" + "a" * 100 + ".com/a.png", "invalid host name"),
        ("http://127.0.0.1:" + "9" * 10_000 + "/a.png", "invalid port"),
    ],
)
def test_malformed_urls_are_400s_naming_the_field(url, fragment):
    # Allowlisted: without the fix these reach httpx or getaddrinfo, which raise (a 500 in the server).
    with pytest.raises(InvalidRequestError, match=fragment) as info:
        load(url, policy(image_url_allowlist=["127.0.0.1", "::1"]))
    assert info.value.param == "messages[0].content[0].image_url.url"
    assert len(info.value.message) < 200  # the URL is not echoed
