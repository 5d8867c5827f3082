"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status."""

from __future__ import annotations

import logging
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


class APIError(Exception):
    """An error the client sees as an OpenAI error body with HTTP `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def context_length_error(max_model_len: int, prompt_tokens: int, max_tokens: int | None) -> APIError:
    """vLLM's wording for a request that does not fit the context."""
    if max_tokens is None:
        msg = (f"This model's maximum context length is {max_model_len} tokens. However, your request has "
               f"{prompt_tokens} input tokens. Please reduce the length of the input messages.")
    else:
        msg = (f"This model's maximum context length is {max_model_len} tokens. However, you requested "
               f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
               f"completion). Please reduce the length of the messages or completion.")
    return APIError(400, msg, param="messages", code="context_length_exceeded")


def from_validation_error(e: pydantic.ValidationError | RequestValidationError) -> APIError:
    """A request body that is not valid JSON or does not match the schema -> 400 naming the first bad field."""
    errors = e.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        detail = next(err for err in errors if err.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return bad_request(f"Request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    first = errors[0].get("loc", ()) if errors else ()
    param = ".".join(str(x) for x in first if x != "body") or None
    return bad_request("; ".join(parts) or "invalid request", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the app as an OpenAI error body (FastAPI's 422 becomes 400)."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError | pydantic.ValidationError)
        return from_validation_error(exc).response()

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return APIError(exc.status_code, str(exc.detail)).response()

    async def on_other(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return APIError(500, "internal router error").response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(pydantic.ValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_other)
