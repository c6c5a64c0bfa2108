"""The API's errors: OpenAI's JSON error shape, with the offending parameter named."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                              408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error",
                              503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def shutting_down() -> APIError:
    """A request the server will not finish: it is shutting down (qwen35 serve on SIGTERM / SIGINT)."""
    return APIError(503, "the server is shutting down; send the request again once it is back",
                    code="server_shutting_down", headers={"Connection": "close"})


def bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def show(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."
