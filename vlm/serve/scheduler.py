"""Batched generation for concurrent requests: one worker thread owns the model, the event loop only waits.

Requests are queued as `Job`s. The worker takes the first one and gathers more, up to `max_batch`, until none
has come for a short window (`gather_s`; at most GATHER_CAP windows in all), and decodes them together with the
Assistant's `stream_batch`: each decode step advances every request of the batch by one token, so N concurrent
requests cost about one request's decode steps, not N times as many. Requests that arrive while a batch is decoding wait
for the next one. Every call into torch and the tokenizer happens on the worker thread; the event loop gets the
results through each job's asyncio queue (`loop.call_soon_threadsafe`), so it never blocks on the model and
serves the web page, /health and the other clients meanwhile.

Before a request joins a batch the worker fits it to the context (`Assistant.fit`: prompt + max_tokens within
the LLM's context, or with `drop_oldest` its oldest turns dropped) and counts its prompt tokens: a request that
does not fit is refused there, on its own, as a `ContextError` the route turns into a 400, before any decoding.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("vlm.serve")

GATHER_CAP = 10  # a batch waits at most this many gather windows for more requests


@dataclass(frozen=True)
class Stats:
    """What the scheduler has done so far (shown by /health): `batches` decoded, the `largest_batch`, the
    `requests` decoded in them, the requests `queued` now."""

    batches: int
    largest_batch: int
    requests: int
    queued: int


class Job:
    """One request: its conversation and sampling, and the queue its events reach the event loop through.

    Events, in order: the prompt's token count (or the error that refused the request), then one Delta per
    decode step until the one with a finish_reason (or an error)."""

    def __init__(self, conversation: Any, sampling: Any, loop: asyncio.AbstractEventLoop):
        self.conversation, self.sampling = conversation, sampling
        self.prompt_tokens = 0
        self.completion_tokens = 0  # the Deltas it got: one generated token each
        self.dropped_turns = 0  # oldest turns left out to fit the context (the Assistant's drop_oldest)
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._done = False  # worker side: its finishing Delta (or an error) has been sent

    # --- worker thread side
    def _send(self, event: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down, nobody is listening
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # --- event loop side
    def cancel(self) -> None:
        """The client went away: stop decoding for it (its batch stops when every request in it is done)."""
        self._cancelled.set()

    async def _next(self) -> Any:
        event = await self._events.get()
        if isinstance(event, BaseException):
            raise event
        return event

    async def admitted(self) -> int:
        """The prompt's token count once the worker accepted the request; raises what refused it."""
        self.prompt_tokens = await self._next()
        return self.prompt_tokens

    async def deltas(self) -> AsyncIterator[Any]:
        """The reply's Deltas, up to and including the one with a finish_reason; raises a decoding failure."""
        while True:
            delta = await self._next()
            yield delta
            if delta.finish_reason is not None:
                return


class BatchScheduler:
    """Owns `assistant` (a `vlm.assistant.Assistant`: its `fit`, `count_prompt_tokens` and `stream_batch`) on
    one worker thread; `submit` from the event loop, `close` to stop."""

    def __init__(self, assistant: Any, max_batch: int = 16, gather_s: float = 0.02):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if gather_s < 0:
            raise ValueError(f"gather_s must be >= 0 seconds, got {gather_s}")
        self.assistant, self.max_batch, self.gather_s = assistant, max_batch, gather_s
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._batches = self._largest = self._requests = self._waiting = 0
        self._open = threading.Event()  # cleared by `hold`: the worker starts no new batch
        self._open.set()
        self._thread = threading.Thread(target=self._work, name="vlm-serve-model", daemon=True)
        self._thread.start()

    def submit(self, conversation: Any, sampling: Any) -> Job:
        """Queue a request (call from the event loop); await `job.admitted()`, then iterate `job.deltas()`."""
        if not self._thread.is_alive():
            raise RuntimeError("the scheduler is closed")
        job = Job(conversation, sampling, asyncio.get_running_loop())
        with self._lock:
            self._waiting += 1
        self._queue.put(job)
        return job

    def stats(self) -> Stats:
        with self._lock:
            return Stats(self._batches, self._largest, self._requests, self._waiting)

    def hold(self) -> None:
        """Start no new batch until `release` (requests queue up meanwhile): lets a test or a benchmark make
        requests arrive "together" however slow the machine is."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish the batch being decoded, refuse what is still queued, stop the worker."""
        self._open.set()
        self._queue.put(None)
        self._thread.join(timeout)

    # --- the worker thread
    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                break
            self._open.wait()
            jobs = [first]
            # Gather until no request came for gather_s (so a burst that trickles in over a busy machine stays
            # one batch), at most GATHER_CAP times gather_s after the first.
            cap = time.monotonic() + GATHER_CAP * self.gather_s
            stop = False
            while len(jobs) < self.max_batch:
                wait = min(self.gather_s, cap - time.monotonic())
                try:
                    job = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            self._decode(jobs)
            if stop:
                break
        while True:  # closed: what is still queued gets an error rather than waiting forever
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job._send(RuntimeError("the server is shutting down"))

    def _admit(self, jobs: list[Job]) -> list[Job]:
        """The jobs whose prompts fit: each is told its prompt's token count, or the error that refused it."""
        admitted = []
        for job in jobs:
            if job.cancelled:
                continue
            try:  # prompt + max_tokens within the context (or, with drop_oldest, the oldest turns dropped)
                job.conversation, job.dropped_turns = self.assistant.fit(job.conversation, job.sampling.max_tokens)
                job.prompt_tokens = self.assistant.count_prompt_tokens(job.conversation)
            except Exception as error:  # MessageError / ContextError: a 400 for this request alone
                job._send(error)
                continue
            job._send(job.prompt_tokens)
            admitted.append(job)
        return admitted

    def _decode(self, jobs: list[Job]) -> None:
        with self._lock:
            self._waiting -= len(jobs)
        jobs = self._admit(jobs)
        if not jobs:
            return
        with self._lock:
            self._batches += 1
            self._largest = max(self._largest, len(jobs))
            self._requests += len(jobs)
        steps = None
        try:
            steps = self.assistant.stream_batch([job.conversation for job in jobs], [job.sampling for job in jobs])
            for deltas in steps:
                if len(deltas) != len(jobs):
                    raise RuntimeError(f"stream_batch gave {len(deltas)} deltas for a batch of {len(jobs)}")
                for job, delta in zip(jobs, deltas):
                    if delta is None:  # it finished at an earlier step
                        continue
                    job.completion_tokens += 1
                    job._done = delta.finish_reason is not None
                    if not job.cancelled:
                        job._send(delta)
                if all(job._done or job.cancelled for job in jobs):
                    break
        except Exception as error:  # a failure of the model: every unfinished request of the batch hears of it
            log.exception("decoding a batch of %d failed", len(jobs))
            for job in jobs:
                if not job._done:
                    job._done = True
                    job._send(error)
        finally:
            close = getattr(steps, "close", None)
            if close is not None:  # stops decoding when every client of the batch has gone
                close()
        for job in jobs:
            if not job._done and not job.cancelled:  # the stream ended without finishing it: a bug upstream
                job._send(RuntimeError("the decoder stopped before this reply finished"))
