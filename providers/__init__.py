"""Providers: one module each, a registry name → provider, and the shared relay."""

from providers import anthropic, openai, workers_ai
from providers.base import Provider

REGISTRY: dict[str, Provider] = {
    p.name: p for p in (openai.PROVIDER, anthropic.PROVIDER, workers_ai.PROVIDER)
}

__all__ = ["REGISTRY", "Provider"]
