"""``make demo``: the gateway end to end on this machine, no Cloudflare account needed.

Starts the bundled mock Cloudflare AI Gateway and the gateway (its Procfile command), issues a team key
with the CLI, calls through the gateway with the real OpenAI and Anthropic SDKs (plain and streaming)
and curl, shows what the upstream received each time (the team's metadata, never the team key), then
stops everything. Exits non-zero if any step fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx
import openai

from service.mock_upstream import MockUpstream

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GATEWAY_TOKEN = "demo-gateway-token"
ADMIN_KEY = "demo-admin-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def say(title: str) -> None:
    print(f"\n== {title}", flush=True)


def show_upstream(upstream: MockUpstream, key: str) -> None:
    sent = upstream.last()
    carried = [name for name, value in sent.headers if key in value]
    print(f"   upstream got {sent.method} {sent.path}")
    print(f"   cf-aig-metadata: {sent.header('cf-aig-metadata')}")
    print(f"   cf-aig-authorization: {'present' if sent.header('cf-aig-authorization') else 'missing'}")
    print(f"   team key in upstream headers: {'YES: ' + ', '.join(carried) if carried else 'no'}")
    if carried:
        raise SystemExit("the team key reached the upstream")


def step(title: str, action: Callable[[], str]) -> None:
    say(title)
    print("   " + action().replace("\n", "\n   "), flush=True)


def main() -> int:
    upstream = MockUpstream(token=GATEWAY_TOKEN)
    upstream.start_in_thread()
    say(f"mock Cloudflare AI Gateway on {upstream.url} (requires cf-aig-authorization)")
    work = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PORT": str(port),
        "AI_GATEWAY_URL": upstream.url,
        "AI_GATEWAY_TOKEN": GATEWAY_TOKEN,
        "ADMIN_API_KEY": ADMIN_KEY,
        "DATABASE_URL": f"sqlite:///{work}/gateway.db",
        "LOG_LEVEL": "warning",
    }
    procfile = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:"))
    gateway = subprocess.Popen(["sh", "-c", procfile.removeprefix("web:").strip()], env=env, cwd=work)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or gateway.poll() is not None:
                raise SystemExit("the gateway did not start")
            time.sleep(0.1)
        say(f"gateway on {base} (Procfile command, SQLite in {work})")

        say("issue a key with the CLI: gateway tokens create --team team_demo --name 'Demo Team'")
        created = subprocess.run(
            [str(BIN / "gateway"), "tokens", "create", "--team", "team_demo", "--name", "Demo Team", "--json"],
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
            check=True,
        )
        key: str = json.loads(created.stdout)["apiKey"]
        print(f"   {key[:8]}… for team_demo")

        client = openai.OpenAI(base_url=f"{base}/openai/v1", api_key=key)
        messages: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "Hello!"}]

        def openai_plain() -> str:
            reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
            return f"reply: {reply.choices[0].message.content!r}"

        def openai_stream() -> str:
            chunks = client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)
            return "streamed: " + repr("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))

        claude = anthropic.Anthropic(base_url=f"{base}/anthropic", api_key=key)

        def anthropic_plain() -> str:
            reply = claude.messages.create(
                model="claude-demo", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
            )
            block = reply.content[0]
            return f"reply: {block.text if block.type == 'text' else block.type!r}"

        def anthropic_stream() -> str:
            with claude.messages.stream(
                model="claude-demo", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
            ) as stream:
                return "streamed: " + repr("".join(stream.text_stream))

        def curl() -> str:
            body = '{"prompt": "Hi"}'
            curl_path = shutil.which("curl")
            if curl_path is None:  # the same request without curl
                print(
                    f"   (no curl here: curl {base}/workers-ai/@cf/meta/llama-3.1-8b-instruct"
                    f" -H 'Authorization: Bearer sk_…' -d '{body}', sent with httpx)"
                )
                answer = httpx.post(
                    f"{base}/workers-ai/@cf/meta/llama-3.1-8b-instruct",
                    headers={"Authorization": f"Bearer {key}"},
                    content=body,
                )
                return "response: " + answer.text
            command = [
                curl_path,
                "-s",
                f"{base}/workers-ai/@cf/meta/llama-3.1-8b-instruct",
                "-H",
                f"Authorization: Bearer {key}",
                "-d",
                '{"prompt": "Hi"}',
            ]
            return "response: " + subprocess.run(command, capture_output=True, text=True, check=True).stdout

        for title, action in (
            ("OpenAI SDK, plain: OpenAI(base_url=…/openai/v1, api_key=sk_…)", openai_plain),
            ("OpenAI SDK, streaming", openai_stream),
            ("Anthropic SDK, plain: Anthropic(base_url=…/anthropic, api_key=sk_…)", anthropic_plain),
            ("Anthropic SDK, streaming", anthropic_stream),
            ("curl to Workers AI", curl),
        ):
            step(title, action)
            show_upstream(upstream, key)

        say("a wrong key is refused before the upstream: openai.AuthenticationError")
        try:
            openai.OpenAI(base_url=f"{base}/openai/v1", api_key="sk_" + "0" * 64, max_retries=0).models.list()
            raise SystemExit("a wrong key was accepted")
        except openai.AuthenticationError as error:
            print(f"   {error.status_code}: {error.message[:70]}…")
        say("demo finished: every step went through")
        return 0
    finally:
        gateway.terminate()
        gateway.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
