"""Anthropic through Cloudflare AI Gateway: ``{AI_GATEWAY_URL}/anthropic/v1/messages``."""

from providers.base import Provider

PROVIDER = Provider(
    name="anthropic",
    error_shape="anthropic",
    key_header="x-api-key",
    key_setting="anthropic_api_key",
)
