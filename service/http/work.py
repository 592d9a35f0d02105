"""Bounded work: how many pixels a request may ask for, how many one worker decodes at once, and stopping
work whose answer nobody will read.

Decoding is where memory goes: a 4096x4096 16-bit PNG of 20 kB becomes 32 MB of pixels and more in the
conversions that follow. So every request's images are sized from their headers first (nothing decoded):
beyond MNIST_MAX_REQUEST_PIXELS the request gets 413; within it, it reserves its pixels from the worker's
MNIST_MAX_INFLIGHT_PIXELS and waits (up to QUEUE_WAIT_S, then 503 with Retry-After) while other requests
hold them. A reservation is returned when its thread really finishes, not when BentoML gives up on the
request (its timeout cancels the task, not the thread), so the bound holds even for work that outlived
its answer; and such work stops at the next image, because nobody is left to receive it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import ctypes
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.requests import Request

from ..errors import RequestError
from ..imaging.preprocess import header_pixels
from ..inference.cancel import raise_if_abandoned, stopping_on

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a request waits for pixels held by others before it gets 503: long enough to ride out a burst of
# big uploads (each takes ~0.1-0.5 s to decode), short against the request timeout.
QUEUE_WAIT_S = 2.0
RETRY_AFTER_S = 1
# After work on this many pixels, hand freed memory back to the OS (glibc keeps big freed blocks otherwise).
TRIM_PIXELS = 1024 * 1024


def request_pixels(files: Sequence[tuple[str, bytes]], limit: int) -> int:
    """The pixels all of `files` decode to; RequestError 413 beyond `limit` (MNIST_MAX_REQUEST_PIXELS)."""
    total = sum(header_pixels(data) for _, data in files)
    if total > limit:
        raise RequestError(
            413,
            f"too many pixels in one request: its {len(files)} image(s) decode to {total} pixels; the limit is "
            f"{limit} (MNIST_MAX_REQUEST_PIXELS): send smaller images or fewer per request",
        )
    return total


def busy(why: str) -> RequestError:
    return RequestError(
        503, f"server busy: {why}; retry in {RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)}
    )


class PixelBudget:
    """A counting semaphore of pixels, first come first served. Lives in one event loop."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def acquire(self, pixels: int, wait_s: float) -> None:
        """Reserve `pixels`, waiting up to `wait_s`; RequestError 503 (with Retry-After) if they don't free up."""
        if not self._waiters and self.used + pixels <= self.capacity:
            self.used += pixels
            return
        granted = asyncio.get_running_loop().create_future()
        entry = (pixels, granted)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(wait_s):
                await granted
        except BaseException as exc:
            used = self.used  # what kept us waiting, before the budget moves on
            if granted.done() and not granted.cancelled():
                self.release(pixels)  # granted just as we gave up: hand it on
            else:
                with contextlib.suppress(ValueError):  # _grant() may have dropped our cancelled entry already
                    self._waiters.remove(entry)
                self._grant()  # a smaller request behind us may fit now
            if isinstance(exc, TimeoutError):
                raise busy(f"{used} of {self.capacity} pixels (MNIST_MAX_INFLIGHT_PIXELS) are being decoded") from None
            raise

    def release(self, pixels: int) -> None:
        self.used -= pixels
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            pixels, granted = self._waiters.popleft()
            if not granted.done():
                self.used += pixels
                granted.set_result(None)


class Offloader:
    """Runs blocking work in `threads` threads of one worker, within a pixel budget (create it in the loop)."""

    def __init__(self, threads: int, max_inflight_pixels: int) -> None:
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="mnist-work")
        self.budget = PixelBudget(max_inflight_pixels)

    async def run(self, func: Callable[..., T], *args: Any, pixels: int = 0, request: Request | None = None) -> T:
        """`func(*args)` in a thread, holding `pixels` of the budget until the thread is done.

        With `request` (its body already read), a hang-up of its client makes `raise_if_abandoned()` stop the
        work; so does BentoML's timeout cancelling this task.
        """
        # The wait for the budget and then for a thread, together, is bounded: a request that cannot start
        # within QUEUE_WAIT_S gets 503 at once, instead of 504 at the request timeout after its decode.
        start_by = time.monotonic() + QUEUE_WAIT_S
        if pixels:
            await self.budget.acquire(pixels, QUEUE_WAIT_S)
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        try:
            future = loop.run_in_executor(self.executor, context.run, _job, stop, pixels, start_by, func, args)
        except BaseException:
            self.budget.release(pixels)
            raise
        future.add_done_callback(functools.partial(_finished, self.budget, pixels))
        watcher = loop.create_task(_watch_disconnect(request, stop)) if request is not None else None
        try:
            # shield: cancelling this task must not mark the thread's future done (and free its pixels) early.
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()


def _finished(budget: PixelBudget, pixels: int, future: asyncio.Future[Any]) -> None:
    """The thread is done: its pixels go back to the budget, and its outcome is read even when nobody awaits it any
    more (a request cancelled by its deadline or its client), so asyncio does not log it as never retrieved."""
    if pixels:
        budget.release(pixels)
    if not future.cancelled():
        future.exception()


def _job(stop: threading.Event, pixels: int, start_by: float, func: Callable[..., T], args: tuple[Any, ...]) -> T:
    try:
        with stopping_on(stop):
            raise_if_abandoned()  # waited in the queue while its client left
            if pixels and time.monotonic() > start_by:
                raise busy(f"no decoding thread free within {QUEUE_WAIT_S:g} s")
            return func(*args)
    finally:
        if pixels >= TRIM_PIXELS:
            _trim_memory()


async def _watch_disconnect(request: Request, stop: threading.Event) -> None:
    # With the body read, the server's receive() returns only when the client disconnects (or the answer is
    # complete, when this task is cancelled anyway).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stop.set()
            return


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent on musl and macOS
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


def _trim_memory() -> None:
    if _malloc_trim is not None:
        _malloc_trim(0)
