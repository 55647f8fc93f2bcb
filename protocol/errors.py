"""Errors are values: a `ProtocolError` becomes an OpenAI-shaped error body with status == code."""

from __future__ import annotations

from http import HTTPStatus

import msgspec


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(msgspec.Struct):
    error: ErrorInfo


_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "BadRequestError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}


class ProtocolError(Exception):
    """A request the core refuses, with the HTTP status and OpenAI error fields to answer it with."""

    def __init__(self, message: str, status: int = 400, type: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type or _TYPES.get(status) or HTTPStatus(status).phrase
        self.param = param

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(ErrorInfo(self.message, self.type, self.param, self.status))

    def to_json(self) -> bytes:
        return msgspec.json.encode(self.to_response())
