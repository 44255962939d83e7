"""Cloudflare Workers AI: native ``…/workers-ai/@cf/{model}`` and OpenAI-compatible ``…/workers-ai/v1/…``.

Through an authenticated Cloudflare gateway the gateway token also serves as the Workers AI
credential. Direct, the base is ``…/accounts/{CF_ACCOUNT_ID}/ai/run`` (or ``WORKERS_AI_BASE_URL``):
native models go under it (``…/ai/run/@cf/…``), the OpenAI-compatible endpoints beside it
(``…/ai/v1/…``).
"""

from __future__ import annotations

from dataclasses import dataclass

from providers.base import Provider


@dataclass(frozen=True, slots=True)
class WorkersAI(Provider):
    def direct_url(self, base: str, rest: str) -> str:
        if rest.startswith("v1/"):
            return f"{base.removesuffix('/run')}/{rest}"
        return f"{base}/{rest}"


PROVIDER = WorkersAI(
    slug="workers-ai",
    name="Cloudflare Workers AI",
    error_shape="cloudflare",
    stream_format="workers-ai-sse",
    openai_compatible_prefix="v1/",
    gateway_token_as_key=True,
    direct_base_url="https://api.cloudflare.com/client/v4/accounts/{CF_ACCOUNT_ID}/ai/run",
)
