"""Cloudflare Workers AI: native ``…/workers-ai/@cf/{model}`` and OpenAI-compatible ``…/workers-ai/v1/…``.

Through an authenticated Cloudflare gateway the gateway token also serves as the Workers AI
credential, so it is sent as ``Authorization: Bearer`` as well.
"""

from providers.base import Provider

PROVIDER = Provider(
    name="workers-ai",
    error_shape="cloudflare",
    openai_compatible_prefix="v1/",
    gateway_token_as_authorization=True,
)
