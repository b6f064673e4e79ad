"""Loading images from untrusted URLs: ``data:`` URLs and http(s), with every limit enforced.

- Only ``data:``, ``http`` and ``https``. A host that resolves to a loopback, private, link-local,
  multicast, reserved, unique-local, site-local or unspecified address is refused unless allowed by
  configuration, and an IPv6 form that embeds an IPv4 address (mapped, compatible, NAT64, 6to4) is judged
  by that IPv4 address; the check runs after DNS resolution and again on every redirect (capped), so a
  public name cannot redirect inward.
- Encoded size is capped while reading, and the declared width x height and aspect ratio are checked
  *before* decoding, so a small file that declares a huge or extremely elongated canvas (a decompression
  bomb, or a processor bomb: the model's processor scales the short side up) never allocates it; so is
  the sum over a request's images. Decoded images larger than the model could use are downscaled at once.
- The connection goes to an address the check accepted, never to a second DNS answer: the request is
  sent to that IP with the name in the Host header and as TLS SNI (certificates are still verified against
  the name), so a rebinding DNS that answers a public address to the check and 127.0.0.1 to the connect
  reaches nothing inward. Redirects are resolved, checked and pinned the same way.
- Responses are asked for uncompressed (``Accept-Encoding: identity``); a server that compresses anyway
  (gzip or deflate) is decompressed in bounded steps, so the size cap applies to the decoded bytes before
  they exist and a small gzip bomb never expands; other encodings are refused.
- Only PNG, JPEG, WebP and GIF are decoded (the formats OpenAI's API accepts): the format is decided from the
  bytes by those four Pillow plugins alone, so TIFF, BMP, ICO, EPS (Ghostscript) and the rest never reach
  a decoder.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import io
import ipaddress
import math
import re
import socket
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from mmrag.serving.config import LimitsConfig
from mmrag.serving.errors import InvalidRequestError, OpenAIError, PayloadTooLargeError
from mmrag.serving.offload import Offload

# Runs a blocking call off the event loop: Offload.run, or asyncio.to_thread.
Runner = Callable[..., Awaitable[Any]]

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31}):")  # RFC 3986 scheme (bounded: no long echo)

# Pillow format names of the images decoded: what OpenAI's API accepts, and what every image processor reads.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
_FORMATS_TEXT = "PNG, JPEG, WebP or GIF"


# A request whose images decode to more pixels than this (~24 MB as RGB) hands freed memory back to the OS.
TRIM_AFTER_PIXELS = 8_000_000


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int
    max_pixels: int
    max_aspect_ratio: float
    max_request_pixels: int
    downscale_pixels: int
    timeout_s: float
    max_redirects: int
    allow_private: bool
    allowlist: frozenset[str]
    schemes: frozenset[str] = frozenset({"http", "https", "data"})

    @classmethod
    def from_limits(cls, limits: LimitsConfig) -> ImagePolicy:
        return cls(
            max_bytes=limits.max_image_bytes,
            max_pixels=limits.max_image_pixels,
            max_aspect_ratio=limits.max_image_aspect_ratio,
            max_request_pixels=limits.max_request_image_pixels,
            downscale_pixels=limits.image_downscale_pixels,
            timeout_s=limits.image_fetch_timeout_s,
            max_redirects=limits.image_max_redirects,
            allow_private=limits.allow_private_image_urls,
            allowlist=frozenset(h.lower() for h in limits.image_url_allowlist),
            schemes=frozenset(limits.image_url_schemes),
        )


@dataclass(frozen=True)
class EncodedImage:
    """An image's bytes with the size its header declares (checked), not yet decoded."""

    data: bytes
    size: tuple[int, int]
    param: str


async def load_images(
    urls: list[tuple[str, str]], policy: ImagePolicy, offload: Offload | None = None
) -> list[Image.Image]:
    """Fetch every ``(param, url)`` of a request, check their headers together, then decode them.

    The request's pixel budget is checked over all the headers before any image is decoded, so a request
    with many large images is refused before it allocates anything. Base64, header reading and decoding
    run in ``offload``'s worker threads (default: asyncio's), never on the event loop.
    """
    run = offload.run if offload is not None else asyncio.to_thread
    encoded = await asyncio.gather(*(fetch_image(url, policy, run, param=param) for param, url in urls))
    check_request_pixels(encoded, policy)
    images = list(await asyncio.gather(*(run(decode_image, i.data, policy, param=i.param) for i in encoded)))
    if sum(i.size[0] * i.size[1] for i in encoded) > TRIM_AFTER_PIXELS:
        await run(release_freed_memory)
    return images


async def decode_image_bytes(
    blobs: list[tuple[str, bytes]], policy: ImagePolicy, offload: Offload | None = None, *, pixels_used: int = 0
) -> list[Image.Image | OpenAIError]:
    """Images whose bytes are already here (``(param, bytes)``: image files a vector store retrieved), checked
    and decoded as :func:`load_images` does: size, then each header, then the request's pixel budget (of which
    ``pixels_used`` is taken by the request's own images), then decoding, all in ``offload``'s threads.

    These are not the client's images, so one that fails a check does not fail the request: its error is
    returned in its place (the caller leaves that image out and says why), and the budget goes to the next.
    """
    run = offload.run if offload is not None else asyncio.to_thread
    results: list[Image.Image | OpenAIError | EncodedImage] = []
    total = pixels_used
    for param, data in blobs:
        try:
            if len(data) > policy.max_bytes:
                raise PayloadTooLargeError(f"image larger than {policy.max_bytes} bytes", param=param)
            size = (await run(open_image, data, policy, param=param)).size
            if total + size[0] * size[1] > policy.max_request_pixels:
                raise PayloadTooLargeError(
                    f"the request's images would declare more than {policy.max_request_pixels} pixels in all",
                    param=param,
                )
        except OpenAIError as exc:
            results.append(exc)
            continue
        total += size[0] * size[1]
        results.append(EncodedImage(data, size, param))

    async def decode(item: Image.Image | OpenAIError | EncodedImage) -> Image.Image | OpenAIError:
        if not isinstance(item, EncodedImage):
            return item
        try:
            return await run(decode_image, item.data, policy, param=item.param)
        except OpenAIError as exc:
            return exc

    images = list(await asyncio.gather(*(decode(item) for item in results)))
    if total - pixels_used > TRIM_AFTER_PIXELS:
        await run(release_freed_memory)
    return images


async def load_image(url: str, policy: ImagePolicy, *, param: str) -> Image.Image:
    """Fetch and decode one image; every failure is a 4xx naming ``param``."""
    (image,) = await load_images([(param, url)], policy)
    return image


async def fetch_image(url: str, policy: ImagePolicy, run: Runner, *, param: str) -> EncodedImage:
    """The image's bytes (a ``data:`` URL or an http(s) fetch) and its header's size, checked."""
    scheme = url_scheme(url)
    if scheme not in policy.schemes:
        allowed = ", ".join(sorted(policy.schemes))
        raise InvalidRequestError(f"image URL scheme {scheme!r} is not allowed (accepted: {allowed})", param=param)
    if scheme == "data":
        data = await run(decode_data_url, url, policy, param=param)
    else:
        data = await fetch_http(url, policy, param=param)
    return EncodedImage(data, (await run(open_image, data, policy, param=param)).size, param)


def release_freed_memory() -> None:
    """Return the heap memory freed by decoding to the OS. glibc keeps freed memory in its arenas (one per
    worker thread): six requests of two 25 Mpx images left the ingress (TestClient, fake engine) at 745 MiB
    RSS; trimming after each keeps it at 61 MiB. ``malloc_trim(0)`` trims every arena, in well under a
    millisecond when little is free (53 ms for 680 MiB). A no-op without glibc."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's; musl and macOS have none
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def check_request_pixels(images: list[EncodedImage], policy: ImagePolicy) -> None:
    """Refuse a request whose images would decode to more pixels in all than its budget (each image
    alone may be within ``max_pixels``: eight of them are not). The image that crosses it is named."""
    total = 0
    for image in images:
        total += image.size[0] * image.size[1]
        if total > policy.max_request_pixels:
            raise PayloadTooLargeError(
                f"the request's images declare more than {policy.max_request_pixels} pixels in all",
                param=image.param,
            )


def decode_data_url(url: str, policy: ImagePolicy, *, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise InvalidRequestError("a data: URL must be of the form data:<mime>;base64,<data>", param=param)
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise PayloadTooLargeError(f"image larger than {policy.max_bytes} bytes", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(f"invalid base64 in data: URL: {exc}", param=param) from exc


def open_image(data: bytes, policy: ImagePolicy, *, param: str) -> Image.Image:
    """Pillow's lazy open: the header only, nothing decoded; its size is checked before anything is."""
    try:
        # formats=: only these plugins look at the bytes; any other format is never opened by its plugin.
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:  # PIL's own guard fires first for extreme sizes
        raise PayloadTooLargeError(f"image declares too many pixels: {exc}", param=param) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        message = f"the bytes are not a decodable image: only {_FORMATS_TEXT} images are accepted"
        raise InvalidRequestError(message, param=param) from exc
    check_image_shape(image.size, policy, param=param)
    return image


def decode_image(data: bytes, policy: ImagePolicy, *, param: str) -> Image.Image:
    """Decode to RGB, downscaled to at most ``downscale_pixels``: the model's processor shrinks it anyway,
    and a smaller image is cheaper to hold and to send to the LLM replica."""
    image = open_image(data, policy, param=param)
    target = downscaled_size(image.size, policy.downscale_pixels)
    try:
        if target != image.size:
            image.draft("RGB", target)  # JPEG decodes at 1/2, 1/4 or 1/8 scale directly (others: no-op)
        image.load()
        rgb = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequestError(f"the image could not be decoded: {exc}", param=param) from exc
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=2.0)
    return rgb


def downscaled_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """``size`` scaled (aspect kept) to at most ``max_pixels``; unchanged when it already fits."""
    width, height = size
    if width * height <= max_pixels:
        return size
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def check_image_shape(size: tuple[int, int], policy: ImagePolicy, *, param: str) -> None:
    """Refuse, from the header's size alone, an image whose decoding or processing would be huge: too many
    pixels, or so elongated that the model's processor (which scales the short side up) would allocate
    gigabytes for a file of a few hundred bytes."""
    width, height = size
    if width * height > policy.max_pixels:
        raise PayloadTooLargeError(
            f"image declares {width}x{height} pixels, more than the limit of {policy.max_pixels}",
            param=param,
        )
    if min(width, height) < 1 or max(width, height) > policy.max_aspect_ratio * min(width, height):
        raise InvalidRequestError(
            f"image is {width}x{height}: its aspect ratio is over the limit of {policy.max_aspect_ratio:g}:1",
            param=param,
        )


async def fetch_http(url: str, policy: ImagePolicy, *, param: str) -> bytes:
    for _ in range(policy.max_redirects + 1):
        addresses = await check_url_allowed(url, policy, param=param)
        # A client per hop: a connection pooled by IP must not carry the next name's request over a TLS
        # session whose certificate was checked for another name.
        async with _client(policy) as client:
            try:
                data, location = await _get_pinned(client, url, addresses, policy, param=param)
            except httpx.HTTPError as exc:
                raise InvalidRequestError(f"could not fetch the image: {type(exc).__name__}", param=param) from exc
            except httpx.InvalidURL as exc:  # httpx reads a redirect's Location itself (a data: URL, say)
                message = "could not fetch the image: redirected to an invalid URL"
                raise InvalidRequestError(message, param=param) from exc
        if location is None:
            return data
        url = redirect_target(url, location, param=param)
    raise InvalidRequestError(f"more than {policy.max_redirects} redirects", param=param)


def _client(policy: ImagePolicy) -> httpx.AsyncClient:
    # trust_env=False: no proxy from the environment (it would connect by name, past the pinning).
    return httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False, trust_env=False)


async def _get_pinned(
    client: httpx.AsyncClient, url: str, addresses: list[str] | None, policy: ImagePolicy, *, param: str
) -> tuple[bytes, str | None]:
    """GET ``url`` from one of the checked ``addresses`` (in the resolver's order; the next one only when a
    connection is refused), never from a fresh DNS answer. ``None``: the host was not checked (allowlisted,
    or private addresses allowed), so it is fetched by name."""
    target = httpx.URL(url)
    if addresses is None:
        return await _get_once(client, target, policy, param=param)
    # The name goes in the Host header and TLS SNI, so virtual hosts answer and certificates verify as usual.
    host_header = {"Host": target.netloc.decode("ascii")}
    error: httpx.ConnectError | None = None
    for address in addresses:
        pinned = target.copy_with(host=address)
        try:
            return await _get_once(client, pinned, policy, param=param, headers=host_header, sni_hostname=target.host)
        except httpx.ConnectError as exc:
            error = exc
    assert error is not None, "a checked host has at least one address"
    raise error


async def _get_once(
    client: httpx.AsyncClient,
    url: httpx.URL,
    policy: ImagePolicy,
    *,
    param: str,
    headers: dict[str, str] | None = None,
    sni_hostname: str | None = None,
) -> tuple[bytes, str | None]:
    """One GET: (body, None), or (b"", Location) for a redirect."""
    extensions = {"sni_hostname": sni_hostname} if sni_hostname else None
    # identity: a compressed body would be decoded past the size cap; _BoundedDecoder covers servers that ignore it.
    request_headers = {**(headers or {}), "Accept-Encoding": "identity"}
    async with client.stream("GET", url, headers=request_headers, extensions=extensions) as response:
        if response.is_redirect:
            return b"", response.headers.get("location", "")
        if response.status_code != 200:
            raise InvalidRequestError(f"fetching the image returned HTTP {response.status_code}", param=param)
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > policy.max_bytes:
            raise PayloadTooLargeError(f"image larger than {policy.max_bytes} bytes", param=param)
        decoder = _BoundedDecoder(response.headers.get("content-encoding", ""), policy.max_bytes, param=param)
        body = bytearray()
        received = 0
        async for chunk in response.aiter_raw():  # raw: httpx would gunzip each chunk whole, unbounded
            received += len(chunk)  # the wire bytes are capped too (trailing data after a gzip stream)
            if received > policy.max_bytes:
                raise PayloadTooLargeError(f"image larger than {policy.max_bytes} bytes", param=param)
            body += decoder.feed(chunk, len(body))
        body += decoder.flush(len(body))
        return bytes(body), None


class _BoundedDecoder:
    """Undoes a response's Content-Encoding (none, gzip or deflate) without ever producing more than
    ``max_bytes`` in all: zlib is asked for at most the room left (+1, to see the cap crossed), so a
    kilobyte that inflates to gigabytes is refused after ``max_bytes``, not after inflating."""

    def __init__(self, content_encoding: str, max_bytes: int, *, param: str):
        encoding = content_encoding.strip().lower()
        self._max_bytes = max_bytes
        self._param = param
        self._zlib: zlib._Decompress | None = None
        self._deflate = encoding == "deflate"
        if encoding == "gzip" or encoding == "x-gzip":
            self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self._deflate:
            self._zlib = zlib.decompressobj()  # zlib-wrapped, as the RFC says; raw deflate tried below
        elif encoding not in ("", "identity"):
            raise InvalidRequestError("the image was sent with an unsupported Content-Encoding", param=param)

    def feed(self, chunk: bytes, done: int) -> bytes:
        """The decoded bytes of ``chunk``, ``done`` bytes having been decoded before it."""
        if self._zlib is None:
            return self._checked(chunk, done)
        try:
            out = self._zlib.decompress(chunk, self._max_bytes - done + 1)
        except zlib.error as exc:
            if not (self._deflate and done == 0):
                raise InvalidRequestError("the image's compressed body is corrupt", param=self._param) from exc
            self._deflate = False  # some servers send raw deflate for "deflate"
            self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
            return self.feed(chunk, done)
        if self._zlib.unconsumed_tail:  # stopped at max_length: more output is waiting
            self._too_large()
        return self._checked(out, done)

    def flush(self, done: int) -> bytes:
        # All input was consumed by feed (no unconsumed_tail): at most an unfinished match is left to emit.
        if self._zlib is None:
            return b""
        out = self._checked(self._zlib.flush(self._max_bytes - done + 1), done)
        if not self._zlib.eof:
            raise InvalidRequestError("the image's compressed body is corrupt or cut short", param=self._param)
        return out

    def _checked(self, out: bytes, done: int) -> bytes:
        if done + len(out) > self._max_bytes:
            self._too_large()
        return out

    def _too_large(self) -> None:
        raise PayloadTooLargeError(f"image larger than {self._max_bytes} bytes", param=self._param)


def url_scheme(url: str) -> str:
    """The URL's scheme, lowercased ("" when it has none), without parsing the rest (a data: URL is large)."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else ""


def split_http_url(url: str, *, param: str) -> SplitResult:
    """An http(s) URL's parts, or a 400 for what would break the fetch further in: control characters (a
    newline would split the request line), broken IPv6 brackets, a port that is not 0-65535, a host name
    IDNA cannot encode. The messages never echo the URL (it may be huge)."""
    if not url.isprintable():
        raise InvalidRequestError("image URL contains control or non-printable characters", param=param)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InvalidRequestError("image URL is malformed (host or IPv6 brackets)", param=param) from exc
    try:
        _ = parts.port  # parsed on access: a number in 0-65535, or ValueError
    except ValueError as exc:
        raise InvalidRequestError("image URL has an invalid port", param=param) from exc
    try:
        (parts.hostname or "").encode("idna")
    except UnicodeError as exc:
        raise InvalidRequestError("image URL has an invalid host name", param=param) from exc
    return parts


def redirect_target(url: str, location: str, *, param: str) -> str:
    """The absolute URL a redirect's Location names (checked, as every URL, before it is fetched)."""
    try:
        return urljoin(url, location)
    except ValueError as exc:
        raise InvalidRequestError("the image URL redirects to a malformed URL", param=param) from exc


async def check_url_allowed(url: str, policy: ImagePolicy, *, param: str) -> list[str] | None:
    """The addresses ``url``'s host resolves to, every one checked public (the fetch connects only to
    them); ``None`` for a host not checked (allowlisted, or private addresses allowed)."""
    parts = split_http_url(url, param=param)
    if parts.scheme not in ("http", "https") or parts.scheme not in policy.schemes:
        raise InvalidRequestError(f"image URL scheme {parts.scheme!r} is not allowed (redirect?)", param=param)
    host = (parts.hostname or "").lower()
    if not host:
        raise InvalidRequestError("image URL has no host", param=param)
    if host in policy.allowlist or policy.allow_private:
        return None
    addresses = await _resolve(host, parts.port or (443 if parts.scheme == "https" else 80), param)
    for address in addresses:
        if not is_public_address(address):
            raise InvalidRequestError(f"image URL host {host!r} resolves to a non-public address; refused", param=param)
    return addresses


async def _resolve(host: str, port: int, param: str) -> list[str]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidRequestError(f"image URL host {host!r} does not resolve", param=param) from exc
    # The resolver's order (its address preference), each once; none: refused rather than fetched by name.
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise InvalidRequestError(f"image URL host {host!r} does not resolve", param=param)
    return addresses


# IPv6 forms that carry an IPv4 address in their low 32 bits: they reach (or name) that IPv4 host, so the
# IPv4 address is what is checked. ::/96 is the deprecated IPv4-compatible form (::127.0.0.1; :: and ::1 fall
# in it too and come out as 0.0.0.0 and 0.0.0.1, both refused); ::ffff:0:0:0/96 is SIIT's IPv4-translated.
_LOW_32_BITS_IPV4 = tuple(
    ipaddress.ip_network(n) for n in ("::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96")
)
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")  # 2002:AABB:CCDD::/48 routes to the IPv4 AA.BB.CC.DD
# Refused whatever they carry: Teredo tunnels (the IPv4 is obfuscated, and reaches through NATs), the local-use
# NAT64 prefix (a site's own translator, RFC 8215), site-local (deprecated, still routed inside some sites).
_REFUSED_IPV6 = tuple(ipaddress.ip_network(n) for n in ("2001::/32", "64:ff9b:1::/48", "fec0::/10"))
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")  # every other IPv6 outside it is reserved or local


def is_public_address(address: str) -> bool:
    """Whether an address is one the server may fetch from: global unicast, IPv4 or IPv6, with any IPv4
    address embedded in an IPv6 form checked as IPv4 (``::ffff:127.0.0.1``, ``64:ff9b::7f00:1``...)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = embedded_ipv4(ip)
        if embedded is not None:
            return is_public_address(str(embedded))
        if any(ip in network for network in _REFUSED_IPV6) or ip not in _GLOBAL_UNICAST:
            return False
    return ip.is_global and not ip.is_multicast


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address embeds (mapped, compatible, translated, NAT64, 6to4), if any."""
    if any(ip in network for network in _LOW_32_BITS_IPV4):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIX_TO_FOUR:
        return ip.sixtofour
    return None
