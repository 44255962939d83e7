"""Allow-lists on every provider route: the model and provider a request goes to must be allowed by
its key's lists and its team's.

Keys without any list (``team.access is None``) pass at the cost of one attribute read: their body
is not read here. For a key with a provider list only, the slug decides, still without the body.
For a key with a model list the model is the one that goes upstream:

- in the path, for the providers that put it there (Gemini ``models/{m}:generateContent`` and
  ``:streamGenerateContent``, Workers AI ``@cf/…``, Azure deployments): the mount's ``path_model``,
  percent-decoded as the upstream will read it, refused unless made of letters, digits and ``._@/-``
  (so that the upstream cannot read another name in it); the body is not read;
- otherwise the body's top-level ``model``: the whole body is read (bounded by
  ``MAX_REQUEST_BYTES``), parsed by a real JSON parser, and passed on as the very bytes received
  (no re-serialisation). A body that is not a JSON object of UTF-8 text, repeats a key, or whose
  ``model`` is missing or not a string is refused: the upstream's parser might read another model
  than ours.

A model that cannot be determined is refused. Refusals are 403 in the provider's error shape,
naming the model; nothing goes upstream.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from starlette.types import ASGIApp, Receive, Scope, Send

from middleware.body import ClientLeft, whole_body
from service.core.access import COMPAT, MAX_MODEL_CHARS, Access
from service.core.errors import NotAllowed
from service.core.request import REST_KEY, SCOPE_KEY, RequestInfo

PARSE_IN_THREAD_BYTES = 256 * 1024
PATH_MODEL_CHARS = 200
"""``path_model`` reads at most this many characters of a Gemini model: one that long may be longer."""
_PATH_MODEL = re.compile(r"[A-Za-z0-9@][A-Za-z0-9._@/-]*")
"""What a model named in a path is made of (Gemini, Workers AI ``@cf/…``, Azure deployments): nothing
an upstream could read as a path or method separator."""
"""Bodies larger than this are parsed off the event loop."""
UNKNOWN_MODEL = (
    "This key allows only some models, and this request's model could not be determined: send a JSON "
    "body with a string 'model' (or use a path that names the model)."
)
AMBIGUOUS = "This key allows only some models, and this request's body is not one unambiguous JSON object: {}."


class Ambiguous(ValueError):
    """The body could be read as naming different models (or none)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise Ambiguous("a key appears twice in an object")
    return obj


def _no_constant(name: str) -> None:
    raise Ambiguous(f"{name} is not JSON")


_STRICT = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
"""Made once: ``json.loads`` with these arguments makes a decoder (and its scanner) per call, about
half of what reading a small body cost."""


def body_model(body: bytes) -> str:
    """The top-level ``model`` of a JSON body, exactly as a strict parser reads it."""
    try:
        text = body.decode("utf-8")
        if text.startswith("\ufeff"):  # as json.loads refuses it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM", text, 0)
        value = _STRICT.decode(text)
    except UnicodeDecodeError:
        raise Ambiguous("it is not UTF-8 text") from None
    except RecursionError:
        raise Ambiguous("it nests too deeply") from None
    except json.JSONDecodeError:
        raise Ambiguous("it is not valid JSON") from None
    if not isinstance(value, dict):
        raise Ambiguous("it is not a JSON object")
    model = value.get("model")
    if not isinstance(model, str):
        raise Ambiguous("'model' is missing or not a string")
    return model


class AllowLists:
    def __init__(self, app: ASGIApp, *, provider: str, path_model: Callable[[str], str | None], max_body: int) -> None:
        self.app = app
        self.provider = provider
        self.path_model = path_model
        self.max_body = max_body

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # not async: a key without lists costs no coroutine of this hop (``middleware.metadata``)
        info: RequestInfo = scope[SCOPE_KEY]
        access = info.team.access if info.team is not None else None
        if access is None:
            return self.app(scope, receive, send)
        return self.check(access, scope, receive, send)

    async def check(self, access: Access, scope: Scope, receive: Receive, send: Send) -> None:
        provider = self.provider
        if not access.limits_models:
            refusal = access.provider_refusal(provider)
            if refusal is None:
                await self.app(scope, receive, send)
                return
            if provider != COMPAT:
                raise NotAllowed(refusal)
            # through compat the provider is the model's prefix (openai/gpt-4o): it takes the model
        model = self.path_model(scope[REST_KEY])
        if model is not None:
            model = unquote(model) if "%" in model else model
            if not _PATH_MODEL.fullmatch(model) or len(model) >= PATH_MODEL_CHARS:
                raise NotAllowed(UNKNOWN_MODEL)  # possibly cut short, or read otherwise upstream
        else:
            try:
                body = await whole_body(scope[SCOPE_KEY], scope, receive, self.max_body)
            except ClientLeft:
                return
            try:
                model = await self.parse(body)
            except Ambiguous as exc:
                raise NotAllowed(AMBIGUOUS.format(exc)) from None
        if not model or len(model) > MAX_MODEL_CHARS:
            raise NotAllowed(UNKNOWN_MODEL)
        refusal = access.provider_refusal(provider, model) or access.model_refusal(provider, model)
        if refusal is not None:
            raise NotAllowed(refusal)
        await self.app(scope, receive, send)

    async def parse(self, body: bytes) -> str:
        if not body:
            raise NotAllowed(UNKNOWN_MODEL)
        if len(body) > PARSE_IN_THREAD_BYTES:
            return await asyncio.to_thread(body_model, body)
        return body_model(body)
