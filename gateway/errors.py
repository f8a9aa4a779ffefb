"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Everything the gateway refuses goes through `APIError`, so a client always gets
JSON it can parse, the right status code, and never a traceback.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

# OpenAI's error `type` for each status we return.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class UserError(Exception):
    """A command-line problem the user can fix (bad flag, bad config, port in use);
    `idlegrid` prints it as one line and exits 2. It lives here, not in gateway.cli,
    because under `python -m gateway.cli` that module is `__main__`."""


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404/405 come out in OpenAI's shape too."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "error")
    return APIError(status, str(detail)).response()


async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to our log (Starlette logs it); the client gets a clean 500.
    return APIError(500, "internal error in the gateway", code="internal_error").response()


async def redis_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Redis down or restarting: callers get a clean 503 and retry, never a hang."""
    return APIError(503, "fleet state is unavailable right now; retry shortly", code="redis_unavailable", headers={"Retry-After": "1"}).response()
