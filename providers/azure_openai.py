"""Azure OpenAI: the resource and deployment travel in the path.

Gateway path ``/azure-openai/{resource}/{deployment}/chat/completions?api-version=…``, exactly
Cloudflare's. What the ``AzureOpenAI`` client adds is folded to the same: with
``azure_endpoint=…/azure-openai/{resource}`` it inserts ``openai/deployments/{deployment}/``, with
``base_url=…/azure-openai/{resource}/{deployment}`` it inserts ``deployments/{model}/``. Direct, it becomes
``https://{resource}.openai.azure.com/openai/deployments/{deployment}/…``; ``AZURE_OPENAI_BASE_URL``
replaces ``https://{resource}.openai.azure.com``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from providers.base import Provider
from service.core.errors import BadRequest

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class AzureOpenAI(Provider):
    def rest_path(self, rest: str) -> str:
        resource, _, tail = rest.partition("/")
        if tail.startswith("openai/deployments/"):
            tail = tail[len("openai/deployments/") :]
        deployment, _, tail = tail.partition("/")
        if tail.startswith("deployments/"):  # AzureOpenAI(base_url=…) adds deployments/{model}/
            tail = tail.partition("/")[2].partition("/")[2]
        if not _NAME.fullmatch(resource) or not _NAME.fullmatch(deployment):
            raise BadRequest("Azure OpenAI paths are /azure-openai/{resource}/{deployment}/….")
        return f"{resource}/{deployment}/{tail}"

    def direct_url(self, base: str, rest: str) -> str:
        resource, deployment, tail = self.rest_path(rest).split("/", 2)
        host = base if base != self.direct_base_url else f"https://{resource}.openai.azure.com"
        return f"{host}/openai/deployments/{deployment}/{tail}"


PROVIDER = AzureOpenAI(
    slug="azure-openai",
    name="Azure OpenAI",
    key_header="api-key",
    key_prefix="",
    team_key_headers=("api-key",),
    direct_base_url="https://{resource}.openai.azure.com",
)
