"""`make demo` runs offline, every step through."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import BIN, ROOT


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "python"), str(ROOT / "examples" / "demo.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in (
        "OpenAI SDK, plain",
        "OpenAI SDK, streaming",
        "Anthropic SDK, plain",
        "Anthropic SDK, streaming",
        "curl to Workers AI",
        "demo finished",
    ):
        assert step in out
    assert out.count("team key in upstream headers: no") == 5
    assert out.count('"team_id":"team_demo"') == 5
