"""The chat completion request as OpenAI's API defines it (the fields this server reads), and the objects it
answers with: `chat.completion`, `chat.completion.chunk` (one server-sent event each when streaming).

Field types are checked strictly (a string where a number belongs is a 400, not a guess); fields OpenAI defines
that change nothing here (user, metadata, presence_penalty, ...) are accepted and ignored, so that ordinary
clients work; the few that would silently change the meaning of the answer (tools, logprobs, n > 1) are refused.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from vlm.models.sampling import Sampling
from vlm.serve.errors import APIError

MAX_STOP_STRINGS = 4  # as OpenAI's API
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "audio", "prediction")


def _number(value: Any) -> Any:
    """A JSON number, not a string or a boolean that pydantic would coerce."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError("should be a number")
    return value


def _stop(value: Any) -> Any:
    """A string or a list of strings, as a tuple."""
    if value is None or isinstance(value, str):
        return () if value is None else (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ValueError("should be a string or a list of strings")


Number = Annotated[float | None, BeforeValidator(_number)]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(None, ge=0, le=2)
    top_p: Number = Field(None, gt=0, le=1)
    stop: Annotated[tuple[str, ...], BeforeValidator(_stop)] = ()
    seed: StrictInt | None = None
    n: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = None

    def check_supported(self) -> None:
        """Refuse what this server cannot do rather than ignore it."""
        if self.n not in (None, 1):
            raise APIError(400, f"n={self.n}: this server returns one choice per request; send n=1 (or leave it "
                                "out) and repeat the request for more.", param="n", code="unsupported_value")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported by this server; leave `logprobs` out.",
                           param="logprobs", code="unsupported_parameter")
        for name in UNSUPPORTED:
            if (self.model_extra or {}).get(name) not in (None, [], "none"):
                raise APIError(400, f"`{name}` is not supported by this server (a vision-language model without "
                                    "tool calling); leave it out.", param=name, code="unsupported_parameter")

    def sampling(self) -> Sampling:
        """The decoding this request asks for; Sampling's defaults for what it leaves out."""
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise APIError(400, f"max_tokens={self.max_tokens} and max_completion_tokens="
                                f"{self.max_completion_tokens} disagree; send one of them.",
                           param="max_completion_tokens", code="invalid_value")
        stop = self.stop
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise APIError(400, f"stop: give at most {MAX_STOP_STRINGS} non-empty strings, got {list(stop)}.",
                           param="stop", code="invalid_value")
        chosen: dict[str, Any] = {"stop": stop, "seed": self.seed}
        max_tokens = self.max_completion_tokens or self.max_tokens
        if max_tokens is not None:
            chosen["max_tokens"] = max_tokens
        if self.temperature is not None:
            chosen["temperature"] = float(self.temperature)
        if self.top_p is not None:
            chosen["top_p"] = float(self.top_p)
        try:
            return Sampling(**chosen)
        except ValueError as error:  # Sampling's own checks
            raise APIError(400, str(error), code="invalid_value") from None


class Reply:
    """The ids and stamps one answer shares across its chunks, and the objects built from them."""

    def __init__(self, model_id: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_id

    def _object(self, kind: str, choices: list[dict], **extra: Any) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}

    def completion(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        """The whole answer: a `chat.completion` with its usage."""
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": None, "finish_reason": finish_reason}
        return self._object("chat.completion", [choice], usage=usage(prompt_tokens, completion_tokens))

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        """One `chat.completion.chunk`: first {"role": "assistant", "content": ""}, then {"content": piece}, the
        last one {} with the finish_reason."""
        return self._object("chat.completion.chunk",
                            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The extra last chunk that `stream_options: {"include_usage": true}` asks for: no choices, the usage."""
        return self._object("chat.completion.chunk", [], usage=usage(prompt_tokens, completion_tokens))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
