"""OpenAI-style errors: every failure the server answers is `{"error": {"message", "type", "param", "code"}}`.

Bad input is a 4xx the client can act on (the message says which field and what to do), and the server keeps
serving; a failure of the server itself is a 500 with the same shape. FastAPI's own answers (a body that is not
JSON, a field of the wrong type, an unknown route) are rewritten into that shape too, so that the `openai` client
raises its usual exceptions with a readable message.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("vlm.serve")

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An answer with an error: HTTP `status` and the four fields of OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _param(location: tuple) -> str | None:
    """A validation error's location as OpenAI writes params: ("body", "messages", 0, "content") ->
    "messages[0].content"; None for the body as a whole."""
    parts = [part for part in location if part != "body"]
    if not parts:
        return None
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def validation_error(error: RequestValidationError) -> APIError:
    """The first problem pydantic found in the request body, as a 400."""
    first = error.errors()[0] if error.errors() else {"msg": "invalid request", "loc": (), "type": ""}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON ({detail}); send a JSON object, e.g. "
                             '{"model": ..., "messages": [{"role": "user", "content": "hi"}]}.', code="invalid_json")
    param = _param(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if first.get("type") == "model_attributes_type":
        return APIError(400, "The request body must be a JSON object.", code="invalid_type")
    reason = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    got = first.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 80 else type(got).__name__
    return APIError(400, f"Invalid value for '{param}': {reason} (got {shown}).", param=param,
                    code="invalid_value")


def install(app: FastAPI) -> None:
    """Answer every error of `app` in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = NOT_FOUND if error.status_code == 404 else INVALID_REQUEST
        message = (f"Unknown route {request.method} {request.url.path}." if error.status_code in (404, 405)
                   else str(error.detail))
        return APIError(error.status_code, message, kind).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return APIError(500, f"The server failed on this request ({type(error).__name__}: {error}).",
                        SERVER_ERROR).response()
