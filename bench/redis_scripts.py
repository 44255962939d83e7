"""What the limits cost Redis per request: instructions counted by callgrind in a private
``redis-server``, for the admission and the release the gateway sends.

Redis runs every script on its one thread, for every request under limits of every gateway process and
replica, so its time per request bounds how many requests one Redis can check a second, and the
admission's share is in every such request's latency. A private ``redis-server`` (no persistence, a free
port) runs under ``valgrind --tool=callgrind``; a worker process drives it through the tree's own
``RedisLimiter`` (the bench team's limits: a budget and a requests-per-minute limit), one request at a
time, and its instruction counter is read live (``callgrind_control -e``) around ``requests`` admissions
with their releases, then around as many admissions alone (their leases left held), then as many
``PING``s: what a command costs Redis at least (reading it, answering it)::

    python -m bench.redis_scripts [--root DIR] [--baseline-root DIR] [--requests N]

The instructions step runs it too when it counts the limits rows (``python -m bench.instructions
--cg-limits``, ``make bench BENCH_ARGS=--cg-limits``), for the same trees.
Needs ``redis-server`` and valgrind (Debian packages ``redis-server``, ``valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.instructions import instructions
from bench.run import BIN, ROOT, free_port, wait_port

STARTUP_SECONDS = 60
STEPS = ("pairs", "admissions", "pings")
REQUESTS = 2000


async def _drive(url: str, requests: int) -> None:
    """The worker: waits for a line on stdin before each step, answers a line when it is done."""
    from service.core.limits.model import Limits
    from service.core.limits.outcome import Subject
    from service.core.limits.redis_limiter import RedisLimiter

    async def seed(subject: Subject, period: str) -> int:
        return 0

    limiter = RedisLimiter(url, "bench:", seed)
    await limiter.start()
    limits = Limits(requests_per_minute=1_000_000_000, budget_micro_usd=10**15, budget_period="month")
    subjects = (Subject("team", "team_bench", limits),)
    serial = 0

    async def admit(release: bool) -> None:
        nonlocal serial
        serial += 1
        grant = await limiter.admit(subjects, 19, 2_460, f"{serial:032x}")
        if release:
            limiter.release(grant, 25, 40)
            await limiter._flush()  # sent and answered before the next admission, as one request at a time

    for _ in range(200):  # warm-up: the scripts loaded, the keys made, the budget seeded
        await admit(True)
    for step in STEPS:
        sys.stdin.readline()
        for _ in range(requests):
            if step == "pings":
                await limiter.lane.call(b"*1\r\n$4\r\nPING\r\n")
            else:
                await admit(step == "pairs")
        print(step, flush=True)
    await limiter.stop()


def count(root: Path, requests: int = REQUESTS) -> dict[str, float]:
    """Instructions per request Redis spends on ``root``'s limiter."""
    work = Path(tempfile.mkdtemp(prefix="redis-scripts-"))
    port = free_port()
    server = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={work}/callgrind.out",
            f"--log-file={work}/valgrind.log",
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(work),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker = None
    try:
        wait_port(port, STARTUP_SECONDS)
        env = {**os.environ, "PYTHONPATH": str(root)}
        worker = subprocess.Popen(
            # this file, with the tree's packages first on the path (an older tree may not have it)
            [str(BIN / "python"), __file__, "--worker", f"redis://127.0.0.1:{port}/0", str(requests)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
            env=env,
        )
        assert worker.stdin is not None and worker.stdout is not None
        counts = {}
        for step in STEPS:
            before = instructions(server.pid)
            worker.stdin.write("go\n")
            worker.stdin.flush()
            if worker.stdout.readline().strip() != step:
                raise RuntimeError(f"the worker stopped before {step}")
            counts[step] = (instructions(server.pid) - before) / requests
        worker.stdin.close()
        worker.wait(STARTUP_SECONDS)
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        server.terminate()
        server.wait(STARTUP_SECONDS)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "per_request": counts["pairs"],
        "admission": counts["admissions"],
        "release": counts["pairs"] - counts["admissions"],
        "ping": counts["pings"],
    }


def print_row(name: str, row: dict[str, float]) -> None:
    print(
        f"  {name}: Redis's own instructions per request under limits {row['per_request'] / 1000:,.1f}k "
        f"(admission {row['admission'] / 1000:,.1f}k, release {row['release'] / 1000:,.1f}k; "
        f"a PING {row['ping'] / 1000:,.1f}k)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the tree whose limiter is counted")
    parser.add_argument("--baseline-root", type=Path, default=None, help="another tree's limiter, counted too")
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "redis_scripts.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(_drive(args.worker[0], int(args.worker[1])))
        return
    trees = {"gateway": args.root, **({"gateway-base": args.baseline_root} if args.baseline_root else {})}
    figures: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "requests": args.requests}
    for name, root in trees.items():
        figures[name] = row = count(root.resolve(), args.requests)
        print_row(name, row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
