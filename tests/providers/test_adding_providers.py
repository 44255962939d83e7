"""The README's "Adding New Providers" guide, both ways, end to end."""

from __future__ import annotations

import subprocess
from pathlib import Path

import openai

from service.mock_upstream import MockUpstream
from tests.support import BIN, ROOT, free_port, gateway_env, launch

PROVIDERS_TOML = """
[together]
name = "Together AI"
strip_prefixes = ["v1/"]
direct_base_url = "https://api.together.xyz/v1"
"""

PROVIDER_MODULE = '''"""Acme LLM: an OpenAI-compatible API whose native paths live under /llm/."""

from dataclasses import dataclass

from providers.base import Provider


@dataclass(frozen=True, slots=True)
class AcmeLLM(Provider):
    def rest_path(self, rest: str) -> str:
        return "llm/" + Provider.rest_path(self, rest)


PROVIDER = AcmeLLM(slug="acme-llm", name="Acme LLM", strip_prefixes=("v1/",), direct_base_url="https://api.acme.example")
'''


def chat(base_url: str, key: str) -> str | None:
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
    completion = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    return completion.choices[0].message.content


def test_a_provider_added_in_a_providers_file(make_gateway, upstream: MockUpstream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    providers_file = tmp_path / "providers.toml"
    providers_file.write_text(PROVIDERS_TOML)
    gw = make_gateway(PROVIDERS_FILE=str(providers_file), TOGETHER_API_KEY="together-key")
    key = gw.create_key()
    assert chat(f"{gw.url}/together/v1", key) == "Hello from the mock upstream"
    sent = upstream.last()
    assert sent.path == "/together/chat/completions"
    assert sent.header("authorization") == "Bearer together-key"


# The Procfile's runner, with a directory of the test's own on the provider discovery path
# (``providers.__path__``, which the registry's module discovery iterates): the guide's new module is
# found exactly as one in providers/ would be, and the source tree is left alone.
RUNNER_WITH_EXTRA_PROVIDERS = """
import sys

import providers

providers.__path__.append(sys.argv.pop(1))

from service.server import main

sys.exit(main(sys.argv[1:]))
"""


def test_a_provider_added_as_a_module(upstream: MockUpstream, tmp_path: Path) -> None:
    shipped = sorted(path.name for path in (ROOT / "providers").iterdir())
    extra = tmp_path / "more_providers"
    extra.mkdir()
    (extra / "acme_llm.py").write_text(PROVIDER_MODULE)
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER_WITH_EXTRA_PROVIDERS)
    port = free_port()
    command = [str(BIN / "python"), str(runner), str(extra), "--host", "127.0.0.1", "--port", str(port)]
    gw = launch([*command, "--workers", "1"], gateway_env(upstream.url, tmp_path), tmp_path, port)
    try:
        key = gw.create_key()
        assert chat(f"{gw.url}/acme-llm/v1", key) == "Hello from the mock upstream"
        assert upstream.last().path == "/acme-llm/llm/chat/completions"
    finally:
        gw.stop()
    assert sorted(path.name for path in (ROOT / "providers").iterdir()) == shipped  # nothing written there
    assert not (ROOT / "providers" / "acme_llm.py").exists()


def test_a_broken_providers_file_stops_start_up(tmp_path: Path) -> None:
    for text, words in (
        ("[x\n", "cannot be read as TOML"),
        ("[ok]\nerror_shape = 'xml'\n", "error_shape"),
        ("[Bad_Slug]\n", "not a usable provider slug"),
        ("[ok]\ncolour = 'red'\n", "unknown keys"),
    ):
        providers_file = tmp_path / "providers.toml"
        providers_file.write_text(text)
        env = gateway_env(None, tmp_path, PROVIDERS_FILE=str(providers_file))
        result = subprocess.run([str(BIN / "python"), "-m", "config"], env=env, capture_output=True, text=True)
        assert result.returncode == 3, text
        assert "PROVIDERS_FILE" in result.stderr and words in result.stderr and "Traceback" not in result.stderr
