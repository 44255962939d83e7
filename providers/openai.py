"""OpenAI through Cloudflare AI Gateway: ``{AI_GATEWAY_URL}/openai/chat/completions``."""

from providers.base import Provider

PROVIDER = Provider(
    name="openai",
    error_shape="openai",
    strip_v1=True,
    key_header="authorization",
    key_prefix="Bearer ",
    key_setting="openai_api_key",
)
