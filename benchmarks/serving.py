"""7. Serving: completion tokens/s of `vlm serve` with 16 concurrent clients ÷ the same requests one at a time.

A real server on loopback (`vlm.serve.app` with its batching scheduler, uvicorn on a thread of this process) and
real HTTP clients (threads, one blocking connection per request, non-streaming, greedy). The requests are chat
completions with a synthetic scene as a base64 PNG data URL and a caption prompt or one of the scene's questions,
each with the same max_tokens. The concurrent side comes first: all `requests` requests from `clients` threads at
once, so they queue and the scheduler decodes up to `clients` of them per batch. Then the same requests one at a
time (each waits for the last reply), stopping after `time_limit_s`, which bounds the run on a slow machine; each
side's rate is its own completion tokens over its own wall time. Latency is per request, from sending it to the
whole reply; under concurrency it includes the wait in the queue.

Goal ≥ 5: batching shares each decode step's weight reads among the requests of a batch, as benchmark 4 does for
the evaluation decoder, and the server must not lose that to HTTP, JSON, image decoding or scheduling.
"""

from __future__ import annotations

import base64
import http.client
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from benchmarks.generation import load_model
from benchmarks.harness import Figure, rate_ratio
from benchmarks.workspace import Workspace
from vlm.data.synthetic import generate_records
from vlm.serve.app import create_app
from vlm.serve.background import BackgroundServer
from vlm.serve.scheduler import BatchScheduler

GOAL = ">= 5"
MODEL_ID = "bench"
CAPTION_PROMPT = "Describe the image."


@dataclass(frozen=True)
class Answer:
    seconds: float
    completion_tokens: int
    text: str


def request_bodies(count: int, max_tokens: int, image_size: int, seed: int = 0) -> list[dict]:
    """`count` chat requests, one synthetic scene each: even ones ask for a caption, odd ones a question."""
    bodies = []
    for index, record in enumerate(generate_records(seed, count, image_size, id_prefix="serve")):
        url = "data:image/png;base64," + base64.b64encode(record["image"]).decode()
        text = CAPTION_PROMPT if index % 2 == 0 else record["questions"][0]
        bodies.append({"model": MODEL_ID, "max_tokens": max_tokens, "temperature": 0,
                       "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                 {"type": "text", "text": text}]}]})
    return bodies


def send(url: str, body: dict) -> Answer:
    """One POST /v1/chat/completions on its own connection; raises on an error answer."""
    address = urlparse(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=600)
    start = time.perf_counter()
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        reply = json.loads(response.read())
    finally:
        connection.close()
    seconds = time.perf_counter() - start
    if response.status != 200:
        raise RuntimeError(f"the server answered {response.status}: {reply}")
    return Answer(seconds, reply["usage"]["completion_tokens"], reply["choices"][0]["message"]["content"])


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def build_assistant(ws: Workspace, vlm_dir: Path | None):
    """The Assistant `vlm serve` would serve: the workspace's backbone and the trained model of `vlm_dir` (or, without
    one, benchmark 4's untrained model), with params.yaml's prompts and decoding."""
    from vlm.assistant import Assistant

    return Assistant(ws.backbone, load_model(ws, vlm_dir), ws.params.llm, ws.params.eval)


def run(assistant, requests: int, clients: int = 16, max_tokens: int = 16, time_limit_s: float = 120.0,
        image_size: int = 224, gather_s: float = 0.02) -> Figure:
    """`assistant`: a `vlm.assistant.Assistant` (the trained model, or a tiny one in the tests)."""
    if requests < clients:
        raise ValueError(f"requests ({requests}) must be at least clients ({clients}) to keep every client busy")
    bodies = request_bodies(requests, max_tokens, image_size)
    scheduler = BatchScheduler(assistant, max_batch=clients, gather_s=gather_s)
    with BackgroundServer(create_app(scheduler, MODEL_ID)) as server:
        send(server.url, bodies[0])  # warm-up: first-call costs (allocations, lazy imports) on neither side
        before = scheduler.stats()
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            concurrent = list(pool.map(lambda body: send(server.url, body), bodies))
        concurrent_s = time.perf_counter() - start
        after = scheduler.stats()
        single: list[Answer] = []
        start = time.perf_counter()
        for body in bodies:
            single.append(send(server.url, body))
            if time.perf_counter() - start > time_limit_s:
                break
        single_s = time.perf_counter() - start
    concurrent_tokens = sum(answer.completion_tokens for answer in concurrent)
    single_tokens = sum(answer.completion_tokens for answer in single)
    value = rate_ratio(concurrent_tokens, concurrent_s, single_tokens, single_s)
    concurrent_latency = [answer.seconds for answer in concurrent]
    single_latency = [answer.seconds for answer in single]
    same = sum(a.text == b.text for a, b in zip(single, concurrent)) / len(single)
    batches = after.batches - before.batches
    return Figure(
        key="serving", title="7 serve tokens/s: 16 clients / one at a time", value=value, goal=GOAL,
        details={"requests": requests, "clients": clients, "max_tokens": max_tokens,
                 "single_requests": len(single), "concurrent_s": concurrent_s, "single_s": single_s,
                 "concurrent_tokens": concurrent_tokens, "single_tokens": single_tokens,
                 "concurrent_tokens_per_s": concurrent_tokens / concurrent_s,
                 "single_tokens_per_s": single_tokens / single_s,
                 "concurrent_requests_per_s": requests / concurrent_s, "single_requests_per_s": len(single) / single_s,
                 "concurrent_p50_s": percentile(concurrent_latency, 50),
                 "concurrent_p95_s": percentile(concurrent_latency, 95),
                 "single_p50_s": percentile(single_latency, 50), "single_p95_s": percentile(single_latency, 95),
                 "batches": batches, "mean_batch": requests / max(batches, 1),
                 "largest_batch": after.largest_batch, "identical_outputs": same},
        note=f"{concurrent_tokens / concurrent_s:.0f} vs {single_tokens / single_s:.0f} tok/s ({requests} requests of "
             f"<= {max_tokens} tokens, {clients} clients, {batches} batches; one at a time: {len(single)} requests); "
             f"p50/p95 latency {percentile(concurrent_latency, 50):.2f}/{percentile(concurrent_latency, 95):.2f} s vs "
             f"{percentile(single_latency, 50):.2f}/{percentile(single_latency, 95):.2f} s; {same:.0%} identical")
