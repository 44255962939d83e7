"""The gateway's errors and how a client sees them.

Hierarchy::

    GatewayError                 status, a message safe to show, never exception text
    ├── BadRequest               400 malformed path, body or field
    ├── AuthenticationFailed     401 missing or unknown key, missing or wrong admin bearer
    │   └── KeyExpired           401 the key's expiry time has passed
    ├── Forbidden                403 the feature is switched off
    │   └── NotAllowed           403 the key's (or team's) allow-list refuses the model or provider
    ├── NotFound                 404 unknown route or token
    ├── Conflict                 409 the change cannot work in this deployment
    ├── PayloadTooLarge          413 body over the limit
    ├── TooManyRequests          429 a limit reached, or an address presenting too many unknown keys
    ├── ServiceUnavailable       503 not configured, or the store is down
    ├── UpstreamUnavailable      502 the upstream refused or reset before answering
    ├── UpstreamTimeout          504 no upstream response headers in time
    └── UpstreamTruncated        502 the upstream's stream ended early (sent as the stream's last event)

Hops raise them before the response has started; one boundary (``middleware.context``) answers with
``send_error``, and the token API's handlers with ``error_response``: both through ``render(error,
shape, request_id)``, the one renderer, which gives the JSON body a client of that shape expects, so
the OpenAI and Anthropic SDKs raise their usual exceptions (``AuthenticationError`` for 401, …).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import orjson
from starlette.types import Send

Shape = Literal["openai", "anthropic", "cloudflare", "google", "cohere", "plain"]


class GatewayError(Exception):
    status = 500
    openai_type = "api_error"
    anthropic_type = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.headers = tuple(headers)
        """Response headers the error brings (``retry-after``)."""


class BadRequest(GatewayError):
    status = 400
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    code = "bad_request"


class AuthenticationFailed(GatewayError):
    status = 401
    openai_type = "invalid_request_error"
    anthropic_type = "authentication_error"
    code = "invalid_api_key"


class KeyExpired(AuthenticationFailed):
    code = "expired_api_key"


class Forbidden(GatewayError):
    status = 403
    openai_type = "invalid_request_error"
    anthropic_type = "permission_error"
    code = "forbidden"


class NotAllowed(Forbidden):
    code = "not_allowed"


class NotFound(GatewayError):
    status = 404
    openai_type = "invalid_request_error"
    anthropic_type = "not_found_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(GatewayError):
    status = 409
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(GatewayError):
    status = 413
    openai_type = "invalid_request_error"
    anthropic_type = "request_too_large"
    code = "request_too_large"


class TooManyRequests(GatewayError):
    status = 429
    openai_type = "rate_limit_error"
    anthropic_type = "rate_limit_error"
    code = "rate_limited"


class ServiceUnavailable(GatewayError):
    status = 503
    openai_type = "api_error"
    anthropic_type = "api_error"
    code = "service_unavailable"


class UpstreamUnavailable(GatewayError):
    status = 502
    openai_type = "api_error"
    anthropic_type = "api_error"
    code = "upstream_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    openai_type = "api_error"
    anthropic_type = "timeout_error"
    code = "upstream_timeout"


class UpstreamTruncated(GatewayError):
    status = 502
    openai_type = "api_error"
    anthropic_type = "api_error"
    code = "upstream_truncated"


STORE_UNAVAILABLE = "The key store is unavailable; try again shortly."


def store_unavailable() -> ServiceUnavailable:
    """What a client is told while the key store cannot be reached (the message lives here only)."""
    return ServiceUnavailable(STORE_UNAVAILABLE)


_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "FAILED_PRECONDITION",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_CLOUDFLARE_CODES = {400: 5006, 401: 10000, 403: 10001, 404: 7003, 413: 5007, 502: 5021, 503: 5022, 504: 5023}


def render(error: GatewayError, shape: Shape, request_id: str | None = None) -> bytes:
    """The JSON body for ``error`` in the shape a client of that provider expects."""
    message = error.message if request_id is None else f"{error.message} (request id: {request_id})"
    body: object
    if shape == "openai":
        body = {"error": {"message": message, "type": error.openai_type, "param": None, "code": error.code}}
    elif shape == "anthropic":
        body = {"type": "error", "error": {"type": error.anthropic_type, "message": message}}
        if request_id is not None:
            body["request_id"] = request_id
    elif shape == "google":
        body = {
            "error": {
                "code": error.status,
                "message": message,
                "status": _GOOGLE_STATUS.get(error.status, "INTERNAL"),
            }
        }
    elif shape == "cohere":
        body = {"message": message}
    elif shape == "cloudflare":
        code = _CLOUDFLARE_CODES.get(error.status, 5000)
        body = {
            "success": False,
            "errors": [{"code": code, "message": message}],
            "result": None,
            "messages": [],
        }
    else:  # the gateway's own API: the message as it is, the request id beside it
        body = {"error": error.message} if request_id is None else {"error": error.message, "requestId": request_id}
    return orjson.dumps(body)


def error_head(error: GatewayError, body: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *error.headers,
    ]


async def send_error(send: Send, error: GatewayError, shape: Shape, request_id: str) -> None:
    """The whole error response on a raw ASGI ``send`` (the response must not have started)."""
    body = render(error, shape, request_id)
    await send({"type": "http.response.start", "status": error.status, "headers": error_head(error, body)})
    await send({"type": "http.response.body", "body": body})
