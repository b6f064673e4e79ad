"""A bounded pool of worker threads for the CPU-heavy steps of a request: parsing and validating a large
body, reading image headers and decoding images.

Run on the event loop, one client's 30 MB body or four 25 Mpx images stall every other request of the
replica for seconds; in a worker thread they only take a core (Pillow's decoders release the GIL, and the
loop gets its turn at every GIL switch while JSON is parsed). The pool is bounded so that a burst of such
requests queues for a worker instead of decoding everything at once.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Offload:
    def __init__(self, max_workers: int):
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="mmrag-offload")

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a worker thread; its exceptions are raised here."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
