"""The uvicorn transport's queue: one worker takes the queued requests with the same generation
settings, up to max_batch_size images, waiting at most max_wait_ms for a batch to fill, and makes
ONE pipeline call for all of them in a worker thread. A batch that raises is retried request by
request, so a bad request fails alone. A withdrawn request (client gone) is dropped from the
queue, or its batch stopped at the next sampling step when it was alone in it."""
import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

from ..errors import UsageError
from .service import Stopped


class Job:
    """One queued request body and the future its answer goes to."""

    __slots__ = ("body", "future", "queued_at", "cancelled")

    def __init__(self, body: dict, future: Any) -> None:
        self.body, self.future, self.queued_at, self.cancelled = body, future, time.perf_counter(), False

    @property
    def key(self) -> tuple:
        """The generation settings: requests that may share one pipeline call."""
        return batch_key(self.body)

    @property
    def size(self) -> int:
        """Images of the request."""
        return len(self.body["prompts"]) * self.body["num_images_per_prompt"]


def batch_key(body: dict) -> tuple:
    """The settings that requests sharing one pipeline call must have in common."""
    return (body["num_inference_steps"], body["guidance_scale"], body["num_images_per_prompt"], body["height"],
            body["width"])


class Batcher:
    """The queue and the one worker that turns queued requests into guarded pipeline calls."""

    def __init__(self, run_batch: Callable, max_batch_size: int, max_wait_ms: float,
                 observe: Optional[Callable] = None) -> None:
        self.run_batch, self.max_batch_size, self.max_wait = run_batch, max_batch_size, max_wait_ms / 1000.0
        self.observe = observe or (lambda **kw: None)
        self.pending: list[Job] = []
        self.in_flight = 0
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self._closing = False
        self.aborted = threading.Event()  # set: the call in flight stops at its next step
        self.answered = 0

    def start(self) -> None:
        """Start the batching worker on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def submit(self, body: dict, disconnected: Optional[Callable] = None) -> dict:
        """Queue one request body; its response once its batch has run. disconnected: an async
        callable polled while waiting; when it says True the request is withdrawn."""
        if self._closing:
            raise UsageError("the server is shutting down")
        job = Job(body, asyncio.get_running_loop().create_future())
        self.pending.append(job)
        self._wake.set()
        if disconnected is None:
            return await job.future
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=0.25)
            if done:
                return job.future.result()
            if await disconnected():
                job.cancelled = True
                if job in self.pending:
                    self.pending.remove(job)
                raise asyncio.CancelledError("the client disconnected")

    async def stop(self, abort: bool = False) -> None:
        """Stop the worker: answer everything queued first, or with abort=True drop the queue
        (503) and stop the call in flight at its next step."""
        self._closing = True
        if abort:
            self.aborted.set()
            for job in self.pending:
                if not job.future.done():
                    job.future.set_exception(UsageError("the server is shutting down"))
            self.pending = []
        self._wake.set()
        if self._task is not None:
            await self._task

    def _take(self) -> list[Job]:
        self.pending = [j for j in self.pending if not j.cancelled]
        if not self.pending:
            return []
        first = self.pending[0]
        batch: list = []
        size = 0
        rest: list = []
        for job in self.pending:
            if job.key == first.key and (not batch or size + job.size <= self.max_batch_size):
                batch.append(job)
                size += job.size
            else:
                rest.append(job)
        self.pending = rest
        return batch

    async def _fill(self, loop: Any) -> None:
        """Let a batch fill: until max_batch_size images of one setting are queued, or max_wait."""
        deadline = loop.time() + self.max_wait
        while not self._closing and loop.time() < deadline and self.pending:
            first = self.pending[0]
            if sum(j.size for j in self.pending if j.key == first.key) >= self.max_batch_size:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                break

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._fill(loop)
            batch = self._take()
            if not batch:
                continue
            self.in_flight += len(batch)
            now = time.perf_counter()
            self.observe(requests=len(batch), images=sum(j.size for j in batch),
                         waits=[now - j.queued_at for j in batch])
            try:
                results = await asyncio.to_thread(self._run_safely, batch)
            finally:
                self.in_flight -= len(batch)
            self.answered += len(batch)
            for job, res in zip(batch, results):
                if not job.future.done():
                    (job.future.set_exception if isinstance(res, BaseException) else job.future.set_result)(res)

    def _should_stop(self, batch: Any) -> bool:
        return self.aborted.is_set() or all(j.cancelled for j in batch)

    def _run_safely(self, batch: Any) -> Any:
        stop = lambda: self._should_stop(batch)  # noqa: E731
        try:
            return self.run_batch([j.body for j in batch], stop)
        except Exception as err:  # noqa: BLE001 (a failed batch is retried request by request)
            if len(batch) == 1 or isinstance(err, Stopped):
                return [err] * len(batch)
            out = []
            for job in batch:
                try:
                    out.extend(self.run_batch([job.body], lambda job=job: self._should_stop([job])))
                except Exception as e:  # noqa: BLE001
                    out.append(e)
            return out
