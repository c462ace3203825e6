"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with its status."""

from __future__ import annotations

from typing import Optional

# HTTP status -> OpenAI's error type.
TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: Optional[str] = None,
                 param: Optional[str] = None, type_: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type_ or TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, *, param: Optional[str] = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found(what: str, ident: str, *, param: Optional[str] = None) -> ApiError:
    return ApiError(404, f"No such {what}: '{ident}'", param=param, code=f"{what.replace(' ', '_')}_not_found")


def unauthorized(message: str = "Incorrect API key provided. Use a Bearer token: a Kubernetes "
                 "ServiceAccount token or an API key issued for a namespace.") -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


def conflict(message: str) -> ApiError:
    return ApiError(409, message, code="invalid_state")


def too_many(message: str, code: str) -> ApiError:
    return ApiError(429, message, code=code)
