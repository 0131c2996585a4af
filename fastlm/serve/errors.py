"""HTTP errors in the anchors' shapes: the OpenAI envelope {"error": {"message", "type", "param",
"code"}} on /v1/* routes, TEI's {"error": str, "error_type": str} on the native routes."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# TEI's error_type for a status (text-embeddings-inference router/src/http/types.rs: ErrorType)
TEI_TYPES = {400: "Empty", 401: "Unauthorized", 404: "NotFound", 405: "NotFound", 408: "Timeout",
             413: "Validation", 422: "Validation", 424: "Backend", 429: "Overloaded", 500: "Backend",
             503: "Unhealthy"}
# OpenAI's error type for a status (the API reference's error codes)
OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered with `status`; `param` names the offending request field (OpenAI routes),
    `code` OpenAI's machine-readable code (e.g. "context_length_exceeded"), `headers` extra headers
    (Retry-After)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, error_type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers, self.error_type = headers, error_type


def is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def error_response(path: str, status: int, message: str, *, param=None, code=None, headers=None,
                   error_type=None) -> JSONResponse:
    if is_openai(path):
        body = {"error": {"message": message, "type": error_type or OPENAI_TYPES.get(status, "server_error"),
                          "param": param, "code": code}}
    else:
        body = {"error": message, "error_type": error_type or TEI_TYPES.get(status, "Backend")}
    return JSONResponse(body, status_code=status, headers=headers)


def _loc(err: dict) -> str:
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    return ".".join(loc)


def install(app) -> None:
    """Exception handlers: APIError, FastAPI's request validation (malformed JSON -> 400 on /v1/*,
    422 on TEI routes, as their anchors answer; wrong types -> 400 / 422 naming the field), HTTP
    errors (404, 405), and any other exception (500, logged)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(request.url.path, e.status, e.message, param=e.param, code=e.code, headers=e.headers,
                              error_type=e.error_type)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        where = _loc(first)
        if first.get("type") == "json_invalid":
            msg = f"malformed JSON body: {first.get('msg', 'invalid JSON')}"
        else:
            msg = "; ".join(f"{_loc(x) or 'body'}: {x.get('msg')}" for x in errs[:5])
        status = 400 if is_openai(request.url.path) else 422
        return error_response(request.url.path, status, msg, param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return error_response(request.url.path, e.status_code, str(e.detail), headers=getattr(e, "headers", None))
