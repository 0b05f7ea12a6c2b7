"""OpenAI/vLLM-style error bodies, shared by the emulator and the proxy.

Current vLLM answers `{"error": {"message", "type", "param", "code"}}` with code = HTTP status.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


@dataclass
class APIError(Exception):
    """An error to answer with; raised anywhere below a handler, rendered once at the edge."""

    status: int
    message: str
    param: str | None = None
    type: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.type)


def error_body(status: int, message: str, param: str | None = None, type_: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": type_ or _TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError"),
            "param": param,
            "code": status,
        }
    }
