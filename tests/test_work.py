"""service/http/work.py: pixel counts from image headers, the per-worker pixel budget, stopping abandoned work."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
from PIL import Image

from service.errors import ClientGone, RequestError
from service.http.work import Offloader, PixelBudget, request_pixels
from service.imaging.preprocess import header_pixels
from service.inference.cancel import raise_if_abandoned


def encoded(width: int, height: int, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.zeros((height, width), dtype=np.uint8)).save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF"])
def test_header_pixels_reads_the_size_without_decoding(fmt: str) -> None:
    assert header_pixels(encoded(300, 200, fmt)) == 60_000
    assert header_pixels(b"not an image") == 0  # decoding will say what is wrong


def test_request_pixels_adds_up_every_image_and_refuses_beyond_the_limit() -> None:
    files = [("a.png", encoded(100, 100, "PNG")), ("b.jpg", encoded(50, 40, "JPEG"))]
    assert request_pixels(files, limit=12_000) == 12_000
    with pytest.raises(RequestError, match="its 2 image\\(s\\) decode to 12000 pixels; the limit is 11999") as info:
        request_pixels(files, limit=11_999)
    assert info.value.status == 413


def test_the_budget_serves_in_order_and_answers_503_with_retry_after_when_it_stays_full() -> None:
    async def scenario() -> list[str]:
        budget = PixelBudget(100)
        events = []
        await budget.acquire(60, wait_s=1)

        async def wants(name: str, pixels: int, wait_s: float) -> None:
            try:
                await budget.acquire(pixels, wait_s)
                events.append(f"{name} got {pixels}")
            except RequestError as exc:
                assert exc.status == 503 and exc.headers == {"Retry-After": "1"}
                assert "60 of 100 pixels (MNIST_MAX_INFLIGHT_PIXELS)" in str(exc)
                events.append(f"{name} 503")

        waiting = [asyncio.create_task(wants("a", 50, 0.2)), asyncio.create_task(wants("b", 30, 5))]
        await asyncio.sleep(0.3)  # "a" gives up; "b" (queued behind it, 60 + 30 fits) must not stay stuck
        await asyncio.gather(*waiting)
        budget.release(60)
        budget.release(30)
        assert budget.used == 0
        return events

    assert asyncio.run(scenario()) == ["a 503", "b got 30"]


def test_a_waiter_cancelled_while_a_release_drops_it_leaves_the_budget_whole() -> None:
    async def scenario() -> int:
        budget = PixelBudget(10)
        await budget.acquire(10, wait_s=1)
        waiter = asyncio.create_task(budget.acquire(10, wait_s=5))
        await asyncio.sleep(0.01)
        waiter.cancel()  # its future is cancelled; the release below drops the entry before the task resumes
        budget.release(10)
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return budget.used

    assert asyncio.run(scenario()) == 0


def test_offloaded_work_sees_its_stop_and_the_budget_is_held_until_the_thread_ends() -> None:
    async def scenario() -> tuple[int, int]:
        work = Offloader(threads=1, max_inflight_pixels=100)
        started, release = threading.Event(), threading.Event()

        def job() -> str:
            started.set()
            release.wait(5)
            raise_if_abandoned()
            return "finished"

        task = asyncio.create_task(work.run(job, pixels=100))
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()  # what BentoML's timeout does: the thread goes on, the request is answered
        with pytest.raises(asyncio.CancelledError):
            await task
        held = work.budget.used  # the thread still runs: its pixels stay reserved
        release.set()
        for _ in range(500):
            if work.budget.used == 0:
                break
            await asyncio.sleep(0.01)
        return held, work.budget.used

    assert asyncio.run(scenario()) == (100, 0)


def test_raise_if_abandoned_is_a_no_op_outside_offloaded_work() -> None:
    raise_if_abandoned()
    assert issubclass(ClientGone, RequestError) and ClientGone().status == 499
