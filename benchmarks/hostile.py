"""The hostile clients of ``mmrag bench load --hostile``: what a careless or malicious client sends while
ordinary requests are served. Each kind runs as a loop until the load phase ends and counts how its
attempts ended; none of them is expected to succeed, only to be refused or cut off without hurting others.

- ``slow_body``: a chat POST that declares its length and sends the body a byte per ``trickle_s`` (the
  server's body timeouts should end it with a 408 or a closed connection);
- ``slow_headers``: request headers a byte per ``trickle_s`` (only a proxy's header timeout ends these);
- ``large_image``: a PNG of many pixels that compresses to a few KB (decoded, downscaled or refused);
- ``huge_query``: a 5 MB message that asks for retrieval (refused by its length before any search).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

KINDS = ("slow_body", "slow_headers", "large_image", "huge_query")


@dataclass
class HostileMix:
    model: str
    connections: int = 8  # slow sockets held open at once, per slow kind
    trickle_s: float = 1.0
    heavy_every_s: float = 1.0  # one large-image and one huge-query request per this many seconds
    image_side: int = 4096
    outcomes: dict[str, Counter] = field(default_factory=lambda: {kind: Counter() for kind in KINDS})

    async def run(self, url: str, client: Any, seconds: float) -> None:
        """All kinds at once for ``seconds``; slow sockets still open at the end are closed (and counted)."""
        deadline = time.monotonic() + seconds
        host, port = _address(url)
        tasks = [
            *(self._slow(host, port, "slow_body", deadline) for _ in range(self.connections)),
            *(self._slow(host, port, "slow_headers", deadline) for _ in range(self.connections)),
            self._heavy(client, "large_image", self._image_body(), deadline),
            self._heavy(client, "huge_query", self._query_body(), deadline),
        ]
        await asyncio.gather(*tasks)

    def summary(self) -> dict[str, dict[str, int]]:
        return {kind: dict(sorted(counts.items())) for kind, counts in self.outcomes.items()}

    async def _slow(self, host: str, port: int, kind: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            self.outcomes[kind][await self._one_slow(host, port, kind, deadline)] += 1

    async def _one_slow(self, host: str, port: int, kind: str, deadline: float) -> str:
        """How one slow request ended: the status the server answered, ``closed`` by the server, or
        ``held_to_end`` (still open when the phase ended)."""
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            return "connect_failed"
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        # slow_body: headers at once, then the body byte by byte; slow_headers: the headers byte by byte.
        upfront, trickled = (head, body) if kind == "slow_body" else (b"", head + body)
        answer = asyncio.create_task(reader.read(65536))
        try:
            writer.write(upfront)
            await writer.drain()
            for byte in trickled:
                if answer.done() or time.monotonic() >= deadline:
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.wait([answer], timeout=self.trickle_s)
            if not answer.done():
                return "held_to_end"
            return _status(answer.result())
        except (ConnectionError, OSError):
            return "closed"
        finally:
            answer.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _heavy(self, client: Any, kind: str, body: dict[str, Any], deadline: float) -> None:
        import httpx

        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                response = await client.post("/v1/chat/completions", json=body)
                self.outcomes[kind][str(response.status_code)] += 1
            except httpx.HTTPError as exc:
                self.outcomes[kind][type(exc).__name__] += 1
            await asyncio.sleep(max(0.0, self.heavy_every_s - (time.monotonic() - started)))

    def _image_body(self) -> dict[str, Any]:
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (self.image_side, self.image_side), (200, 30, 30)).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content = [{"type": "text", "text": "what colour?"}, {"type": "image_url", "image_url": {"url": url}}]
        return {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": 4}

    def _query_body(self) -> dict[str, Any]:
        message = {"role": "user", "content": "herons " * 700_000}  # about 5 MB
        return {"model": self.model, "messages": [message], "max_tokens": 4, "retrieval": {"mode": "text"}}


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _status(head: bytes) -> str:
    """The status code of an HTTP response's first line, or ``closed`` for an empty read."""
    if not head:
        return "closed"
    fields = head.split(b"\r\n", 1)[0].split()
    return fields[1].decode() if len(fields) > 1 else "malformed"
