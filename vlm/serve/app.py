"""The routes of `vlm serve`: the OpenAI-compatible /v1 API, /health, and the web page at / (vlm/serve/static/).

    POST /v1/chat/completions   messages (text and one image: a data: URL, or a local path under the allowed
                                folder) -> a chat.completion, or with "stream": true server-sent events of
                                chat.completion.chunk objects ending with `data: [DONE]`, as OpenAI's API
    GET  /v1/models             the one model this server serves
    GET  /health                liveness and the scheduler's counters (batches decoded, largest batch, queued)
    GET  /                      the chat page; its assets under /static/

With an API key every /v1 route wants `Authorization: Bearer KEY`. A conversation that does not fit the LLM's
context is a 400, or (`vlm serve --drop-oldest`) loses its oldest turns, which the answer's X-VLM-Dropped-Turns
header counts. Parsing the messages (decoding an image) runs
in a thread pool and the model on the scheduler's worker thread, so the event loop never waits on either.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from vlm.messages import ContextError, ImagePolicy, MessageError, parse_messages
from vlm.serve import errors
from vlm.serve.errors import APIError
from vlm.serve.scheduler import BatchScheduler, Job
from vlm.serve.schema import ChatRequest, Reply

STATIC_DIR = Path(__file__).resolve().parent / "static"
BODY_OVERHEAD_BYTES = 1 << 20  # what a request holds besides its image (text, JSON)
DRAIN_LIMIT_BYTES = 64 << 20  # a body over the limit but under this is read and dropped before the 413
DROPPED_TURNS_HEADER = "X-VLM-Dropped-Turns"  # how many oldest turns were left out to fit the context


def create_app(scheduler: BatchScheduler, model_id: str, api_key: str | None = None,
               images: ImagePolicy | None = None, static_dir: Path = STATIC_DIR) -> FastAPI:
    """The server's ASGI app around a running `scheduler`; closes it when the app shuts down."""
    images = images or ImagePolicy()
    # An image travels base64-encoded (4 bytes per 3), so a body beyond this cannot hold an allowed image.
    max_body = images.max_bytes * 4 // 3 + BODY_OVERHEAD_BYTES

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(scheduler.close)

    app = FastAPI(title="vlm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    errors.install(app)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            if int(length) <= DRAIN_LIMIT_BYTES:  # read (and drop) it, so the client reads the 413, not a reset
                async for _ in request.stream():
                    pass
            return APIError(413, f"The request body is {int(length)} bytes, over this server's {max_body} (an image "
                                 f"may have at most {images.max_bytes} bytes); send a smaller image.",
                            code="request_too_large").response()
        return await call_next(request)

    def authorised(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send the header `Authorization: Bearer KEY` with the "
                                "key this server was started with (--api-key).", errors.AUTHENTICATION,
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorised)])

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{name}")
    async def model(name: str) -> dict:
        check_model(name)
        return model_card()

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "vlm"}

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(404, f"The model `{name}` does not exist: this server serves `{model_id}` "
                                "(GET /v1/models).", param="model", code="model_not_found")

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest):
        check_model(body.model)
        body.check_supported()
        sampling = body.sampling()
        try:
            conversation = await run_in_threadpool(parse_messages, body.messages, images)
        except MessageError as error:
            raise APIError(400, str(error), param="messages", code="invalid_messages") from None
        job = scheduler.submit(conversation, sampling)
        try:
            await job.admitted()
        except ContextError as error:
            raise APIError(400, str(error), param="messages", code="context_length_exceeded") from None
        except MessageError as error:
            raise APIError(400, str(error), param="messages", code="invalid_messages") from None
        reply = Reply(model_id)
        # With the Assistant's drop_oldest, a conversation over the context loses its oldest turns: said here.
        dropped = {DROPPED_TURNS_HEADER: str(job.dropped_turns)} if job.dropped_turns else {}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(job, reply, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **dropped})
        try:
            pieces, finish_reason = [], "stop"
            async for delta in job.deltas():
                pieces.append(delta.text)
                finish_reason = delta.finish_reason or finish_reason
        finally:
            job.cancel()  # a no-op once finished; stops decoding for it if this handler was cancelled
        return JSONResponse(reply.completion("".join(pieces), finish_reason, job.prompt_tokens,
                                             job.completion_tokens), headers=dropped)

    app.include_router(v1)

    @app.get("/health")
    async def health() -> dict:
        stats = scheduler.stats()
        return {"status": "ok", "model": model_id, "batches": stats.batches, "largest_batch": stats.largest_batch,
                "requests": stats.requests, "queued": stats.queued, "max_batch": scheduler.max_batch}

    app.mount("/static", StaticFiles(directory=static_dir), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(static_dir / "index.html", media_type="text/html")

    return app


def event(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream(job: Job, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    """The reply as OpenAI streams it: a role delta, content deltas, a last chunk with the finish_reason, (the
    usage,) `[DONE]`. A failure after the 200 went out is sent as an error event, as OpenAI does."""
    try:
        yield event(reply.chunk({"role": "assistant", "content": ""}))
        async for delta in job.deltas():
            if delta.text:
                yield event(reply.chunk({"content": delta.text}))
            if delta.finish_reason is not None:
                yield event(reply.chunk({}, delta.finish_reason))
        if include_usage:
            yield event(reply.usage_chunk(job.prompt_tokens, job.completion_tokens))
        yield event("[DONE]")
    except Exception as error:
        errors.log.exception("streaming reply %s failed", reply.id)
        yield event(APIError(500, f"Generation failed ({type(error).__name__}: {error}).", errors.SERVER_ERROR).body())
    finally:
        job.cancel()  # the client left (or the reply is done): stop decoding for it
