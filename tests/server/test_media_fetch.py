"""Remote image fetching against hostile servers and resolvers (issue 31): DNS rebinding between the address
check and the connect, on the first hop and on redirects, over HTTP and TLS; compressed bodies (gzip bombs).

Everything runs on loopback. 127.0.0.2 stands for a public address (``is_public_address`` is patched to say so)
and 127.0.0.1 for an inward one; a patched ``socket.getaddrinfo``, which asyncio and httpx's connect both use,
plays the rebinding DNS."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import io
import socket
import ssl
import tempfile
import threading
import tracemalloc
import typing
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from mmrag.serving import media
from mmrag.serving.config import LimitsConfig
from mmrag.serving.errors import InvalidRequestError, PayloadTooLargeError
from mmrag.serving.media import ImagePolicy, load_image

PUBLIC, INWARD = "127.0.0.2", "127.0.0.1"
PARAM = "messages[0].content[1].image_url.url"


def png(size: tuple[int, int], compress_level: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG", compress_level=compress_level)
    return buf.getvalue()


def policy(**limits) -> ImagePolicy:
    return ImagePolicy.from_limits(LimitsConfig(**limits))


def load(url: str, p: ImagePolicy | None = None) -> Image.Image:
    return asyncio.run(load_image(url, p or policy(), param=PARAM))


class Recorder(BaseHTTPRequestHandler):
    """Serves ``routes`` (path -> status, headers, body) and records each request's path and headers."""

    routes: typing.ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}
    seen: list[tuple[str, dict[str, str]]]

    def do_GET(self):
        self.seen.append((self.path, dict(self.headers)))
        status, headers, body = self.routes[self.path]
        # Head and body in one write, so the client's first read holds as much body as it can take (a
        # decoder that inflates a whole read at once would be caught by the memory check below).
        lines = [f"HTTP/1.0 {status} -", *(f"{k}: {v}" for k, v in headers.items()), f"Content-Length: {len(body)}"]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def log_message(self, *args):
        pass


class Server:
    def __init__(self, host: str, port: int, routes: dict, tls: ssl.SSLContext | None = None):
        self.seen: list[tuple[str, dict[str, str]]] = []
        handler = type("Handler", (Recorder,), {"routes": routes, "seen": self.seen})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def server_pair(public_routes: dict, inward_routes: dict, tls: ssl.SSLContext | None = None) -> tuple[Server, Server]:
    """A "public" server on 127.0.0.2 and an "inward" one on 127.0.0.1, on the same port (a URL names one)."""
    for _ in range(20):
        public = Server(PUBLIC, 0, public_routes, tls)
        try:
            return public, Server(INWARD, public.port, inward_routes, tls)
        except OSError:  # that port is taken on 127.0.0.1: try another
            public.close()
    pytest.skip("no port free on both 127.0.0.1 and 127.0.0.2")


@pytest.fixture
def rebinding_dns(monkeypatch):
    """Names ending in .rebind.test resolve to PUBLIC the first time and to INWARD ever after; calls counted."""
    real = socket.getaddrinfo
    calls: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if not str(name).endswith(".rebind.test"):
            return real(host, port, *args, **kwargs)
        address = PUBLIC if name not in calls else INWARD
        calls.append(name)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port)))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(media, "is_public_address", lambda address: address == PUBLIC)
    return calls


@pytest.fixture
def servers():
    public_routes = {"/cat.png": (200, {}, png((9, 9)))}
    inward_routes = {"/cat.png": (200, {}, png((5, 5))), "/hop": (200, {}, png((5, 5)))}  # never to be reached
    public, inward = server_pair(public_routes, inward_routes)
    public_routes["/hop"] = (302, {"Location": f"http://b.rebind.test:{public.port}/cat.png"}, b"")
    yield public, inward
    public.close()
    inward.close()


def test_rebinding_dns_cannot_turn_the_connection_inward(rebinding_dns, servers):
    public, inward = servers
    assert load(f"http://a.rebind.test:{public.port}/cat.png").size == (9, 9)  # the public server's image
    assert inward.seen == []
    assert rebinding_dns == ["a.rebind.test"]  # resolved once: the connection used the checked answer
    assert public.seen[0][1]["Host"] == f"a.rebind.test:{public.port}"  # virtual hosting still works
    assert public.seen[0][1]["Accept-Encoding"] == "identity"


def test_each_redirect_connects_to_its_own_checked_address(rebinding_dns, servers):
    public, inward = servers
    assert load(f"http://a.rebind.test:{public.port}/hop").size == (9, 9)
    assert inward.seen == []
    assert rebinding_dns == ["a.rebind.test", "b.rebind.test"]
    assert [(path, headers["Host"]) for path, headers in public.seen] == [
        ("/hop", f"a.rebind.test:{public.port}"),
        ("/cat.png", f"b.rebind.test:{public.port}"),
    ]


def test_a_refused_connection_tries_the_next_checked_address_only(monkeypatch, servers):
    public, inward = servers
    answers = ["127.0.0.3", PUBLIC]  # nothing listens on .3; INWARD is never among the answers

    def getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, int(port))) for a in answers]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(media, "is_public_address", lambda address: address in answers)
    assert load(f"http://two.example:{public.port}/cat.png").size == (9, 9)
    assert inward.seen == []


def _tls_for(name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate for ``name``, and a client context trusting it."""
    pytest.importorskip("cryptography")

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.NamedTemporaryFile() as cert_file, tempfile.NamedTemporaryFile() as key_file:
        cert_file.write(cert_pem)
        key_file.write(key_pem)
        cert_file.flush()
        key_file.flush()
        server.load_cert_chain(cert_file.name, key_file.name)
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return server, client


def test_https_is_pinned_and_the_certificate_still_verifies_against_the_name(rebinding_dns, monkeypatch):
    server_tls, client_tls = _tls_for("img.rebind.test")
    public, inward = server_pair({"/cat.png": (200, {}, png((9, 9)))}, {"/cat.png": (200, {}, png((5, 5)))}, server_tls)
    try:
        monkeypatch.setattr(
            media,
            "_client",
            lambda p: httpx.AsyncClient(
                verify=client_tls, timeout=p.timeout_s, follow_redirects=False, trust_env=False
            ),
        )
        assert load(f"https://img.rebind.test:{public.port}/cat.png").size == (9, 9)
        assert inward.seen == [] and rebinding_dns == ["img.rebind.test"]
        # The certificate names img.rebind.test only: a name it does not carry fails verification (SNI and
        # hostname checking use the URL's name, not the pinned IP, so verification is not bypassed).
        with pytest.raises(InvalidRequestError, match="could not fetch"):
            load(f"https://other.rebind.test:{public.port}/cat.png")
    finally:
        public.close()
        inward.close()


# --- compressed bodies --------------------------------------------------------------------------------------


def gzip_bomb(decoded_bytes: int) -> bytes:
    """gzip of ``decoded_bytes`` zeros (about 1/1000 of it), built without holding the zeros."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"\0" * 2**20
    parts = [compressor.compress(block) for _ in range(decoded_bytes // len(block))]
    return b"".join([*parts, compressor.flush()])


@pytest.fixture(scope="module")
def compressing_server():
    image = png((9, 9))
    stored = png((64, 64), compress_level=0)  # 12 KiB that gzip makes small
    raw_deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    server = Server(
        "127.0.0.1",
        0,
        {  # a server that compresses whatever the client asked for
            "/bomb.png": (200, {"Content-Encoding": "gzip"}, gzip_bomb(256 * 2**20)),
            "/gzip.png": (200, {"Content-Encoding": "gzip"}, gzip.compress(image)),
            "/deflate.png": (200, {"Content-Encoding": "deflate"}, zlib.compress(image)),
            "/raw-deflate.png": (
                200,
                {"Content-Encoding": "deflate"},
                raw_deflate.compress(image) + raw_deflate.flush(),
            ),
            "/br.png": (200, {"Content-Encoding": "br"}, b"\x1b\x00"),
            "/corrupt.png": (200, {"Content-Encoding": "gzip"}, b"\x1f\x8b\x08\x00garbage"),
            "/plain.png": (200, {}, image),
            "/stored.png": (200, {"Content-Encoding": "gzip"}, gzip.compress(stored)),
        },
    )
    yield f"http://127.0.0.1:{server.port}", server
    server.close()


ALLOWED = {"image_url_allowlist": ["127.0.0.1"]}


def test_a_gzip_bomb_is_refused_without_being_inflated(compressing_server):
    base, server = compressing_server
    tracemalloc.start()
    try:
        # 257 KiB on the wire: within the cap, so its Content-Length alone does not refuse it.
        with pytest.raises(PayloadTooLargeError, match="larger than 1048576 bytes") as info:
            load(f"{base}/bomb.png", policy(max_image_bytes=2**20, **ALLOWED))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.param == PARAM
    # 256 MiB once inflated (257 KiB sent): inflating even one 64 KiB read of it whole would take ~64 MiB.
    assert peak < 16 * 2**20, peak
    assert server.seen[-1][1]["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("path", ["/gzip.png", "/deflate.png", "/raw-deflate.png", "/plain.png"])
def test_compressed_images_within_the_cap_decode(compressing_server, path):
    base, _ = compressing_server
    assert load(f"{base}{path}", policy(**ALLOWED)).size == (9, 9)


def test_the_cap_counts_decoded_bytes(compressing_server):
    base, _ = compressing_server
    decoded = len(png((64, 64), compress_level=0))
    assert load(f"{base}/stored.png", policy(max_image_bytes=decoded, **ALLOWED)).size == (64, 64)
    with pytest.raises(PayloadTooLargeError):
        load(f"{base}/stored.png", policy(max_image_bytes=decoded - 1, **ALLOWED))


@pytest.mark.parametrize(("path", "fragment"), [("/br.png", "Content-Encoding"), ("/corrupt.png", "corrupt")])
def test_unsupported_or_corrupt_encodings_are_400s(compressing_server, path, fragment):
    base, _ = compressing_server
    with pytest.raises(InvalidRequestError, match=fragment) as info:
        load(f"{base}{path}", policy(**ALLOWED))
    assert info.value.param == PARAM and info.value.status_code == 400
