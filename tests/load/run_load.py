"""`make load`: the demo API + the gateway under a locust multi-user scenario.

Writes locust's HTML report (charts) and a summary to test-output/, and
exits non-zero if any request failed or a refresh storm happened: the demo
API revokes a token family when a refresh token is presented twice, so a
single revoked family means two refreshes raced for one expiry; and the
number of refresh calls may not exceed one per user per token lifetime
(the "limit" in the summary).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "test-output"
USERS = int(os.environ.get("LOAD_USERS", "200"))
DURATION = int(os.environ.get("LOAD_SECONDS", "60"))
ACCESS_TTL = int(os.environ.get("LOAD_ACCESS_TTL", "10"))
WORKERS = int(os.environ.get("LOAD_WORKERS", "1"))
KEY = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tests.ports import free_port  # noqa: E402


def wait_for(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError as exc:
            if getattr(exc, "code", None):  # an HTTP error status: the server is up
                return
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def get_json(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return dict(json.loads(answer.read()))


def main() -> int:
    OUT.mkdir(exist_ok=True)
    api_port, gw_port, admin_port = free_port(), free_port(), free_port()
    tmp = Path(tempfile.mkdtemp(prefix="bff-load-"))
    config = tmp / "gateway.yaml"
    config.write_text(
        f"""
server: {{listen: "127.0.0.1:{gw_port}", admin_listen: "127.0.0.1:{admin_port}",
          workers: {WORKERS}}}
session:
  secure: false
  keys: [{{id: k1, secret: "{KEY}"}}]
providers:
  demo:
    type: password
    login_url: http://127.0.0.1:{api_port}/auth/login
    refresh_url: http://127.0.0.1:{api_port}/refresh-token
    refresh_skew: 1
routes:
  - {{path: /api/demo/, upstream: "http://127.0.0.1:{api_port}/", auth: demo}}
logging: {{level: warning, access_log: false}}
"""
    )
    python = sys.executable
    procs = [
        subprocess.Popen(
            [
                python,
                "-m",
                "gateway.demo.api",
                "--host",
                "127.0.0.1",
                "--port",
                str(api_port),
                "--access-ttl",
                str(ACCESS_TTL),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [python, "-m", "gateway", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        wait_for(f"http://127.0.0.1:{api_port}/stats")
        wait_for(f"http://127.0.0.1:{admin_port}/readyz")
        started = time.monotonic()
        locust = subprocess.run(
            [
                python,
                "-m",
                "locust",
                "-f",
                str(Path(__file__).with_name("locustfile.py")),
                "--headless",
                "-u",
                str(USERS),
                "-r",
                str(max(1, USERS // 10)),
                "-t",
                f"{DURATION}s",
                "--stop-timeout",
                "10",
                "--host",
                f"http://127.0.0.1:{gw_port}",
                "--html",
                str(OUT / "load-report.html"),
                "--csv",
                str(OUT / "load"),
                "--only-summary",
            ],
            check=False,
        )
        elapsed = time.monotonic() - started
        stats = get_json(f"http://127.0.0.1:{api_port}/stats")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)

    total = failures = 0
    with (OUT / "load_stats.csv").open() as handle:
        for row in csv.DictReader(handle):
            if row["Name"] == "Aggregated":
                total, failures = int(row["Request Count"]), int(row["Failure Count"])
                rps, p50, p99 = row["Requests/s"], row["50%"], row["99%"]
    lifetimes = math.ceil(elapsed / ACCESS_TTL) + 1
    allowed = stats["logins"] * lifetimes
    storms = stats["revoked_families"]
    ok = (
        locust.returncode == 0
        and failures == 0
        and storms == 0
        and stats["refresh_calls"] <= allowed
    )
    title = f"{USERS} users, {DURATION} s, access tokens live {ACCESS_TTL} s, {WORKERS} worker(s)"
    summary = f"""# make load: {title}

| measure | value |
|---|---|
| requests | {total} |
| failed requests | {failures} |
| requests/s | {float(rps):.0f} |
| p50 / p99 latency (ms) | {p50} / {p99} |
| logins | {stats["logins"]} |
| refresh calls at the token endpoint | {stats["refresh_calls"]} (limit {allowed}) |
| refresh tokens presented twice (storms) | {storms} |
| refresh rejected | {stats["refresh_rejected"]} |

Result: {"PASS" if ok else "FAIL"}. Report with charts: test-output/load-report.html
"""
    (OUT / "load-summary.md").write_text(summary)
    print(summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
