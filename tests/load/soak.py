"""`make soak`: mixed traffic against a real gateway process for a long while,
watching it for leaks (issue 13).

Starts the demo API (short access-token lifetimes, rotating refresh tokens with
reuse detection) and `python -m gateway run` with a generated config, like
run_load.py and bench.py, plus an in-process fault upstream; then runs the
users of soak_traffic.py for ``--duration`` seconds and samples the gateway
every ``--interval`` seconds: RSS, open descriptors (/proc/PID/fd), its
established TCP connections to the upstreams' ports and from clients,
requests answered and API-call latency.

Writes soak.png, soak-summary.json and soak-summary.md (to test-output/ or
``--out``) and exits non-zero on any of:

* growth over 10 % after warm-up (RSS, descriptors, upstream connections; how
  it is measured: soak_report.py);
* any 5xx the gateway produced itself (its own error JSON, not explained by an
  upstream fault the scenario caused), or an ``unhandled error`` in its log;
* any unexpected answer (wrong status or body, a broken stream, a slow client
  not cut by its deadline), a refresh token presented twice at the demo API,
  a scenario that never ran, or the gateway process exiting.

Settings (flag, environment variable, default): --duration SOAK_DURATION 600,
--interval SOAK_INTERVAL 10, --warmup SOAK_WARMUP (20 % of the duration),
--users SOAK_USERS 16, --access-ttl SOAK_ACCESS_TTL 5, --out SOAK_OUT
test-output, --seed SOAK_SEED.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench import Processes, _on_signal, clean_up, free_port, wait_http  # type: ignore[import-not-found]  # noqa: E402
from bench_servers import _run  # type: ignore[import-not-found]  # noqa: E402
from soak_report import (  # type: ignore[import-not-found]  # noqa: E402
    growth_dicts,
    growth_verdicts,
    percentile,
    plot,
    write_summary,
)
from soak_traffic import WEIGHTS, FaultUpstream, Rotation, Setup, Tally, User  # type: ignore[import-not-found]  # noqa: E402

from tests.support import parse_metrics  # noqa: E402

PYTHON = sys.executable
HEADER_TIMEOUT = 2.0  # short deadlines, so that slow clients are cut many times a run
BODY_TIMEOUT = 2.0
FAULT_READ_TIMEOUT = 1.0  # the /faults/ route: a hanging upstream becomes a 504 quickly


def _env(name: str, default: str | None) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or default


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="soak.py", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--duration", type=float, default=float(_env("SOAK_DURATION", "600") or 600))
    add("--interval", type=float, default=float(_env("SOAK_INTERVAL", "10") or 10))
    add("--warmup", type=float, default=_maybe_float(_env("SOAK_WARMUP", None)))
    add("--users", type=int, default=int(_env("SOAK_USERS", "16") or 16))
    add("--access-ttl", type=float, default=float(_env("SOAK_ACCESS_TTL", "5") or 5))
    add("--out", type=Path, default=Path(_env("SOAK_OUT", str(REPO / "test-output")) or "."))
    add("--seed", type=int, default=_maybe_int(_env("SOAK_SEED", None)))
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = round(0.2 * args.duration, 1)
    if args.duration <= 0 or args.interval <= 0 or args.users <= 0:
        parser.error("duration, interval and users must be positive")
    return args


def _maybe_float(text: str | None) -> float | None:
    return None if text is None else float(text)


def _maybe_int(text: str | None) -> int | None:
    return None if text is None else int(text)


def gateway_config(api: str, faults: str, refused: str) -> dict[str, Any]:
    return {
        "server": {
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
            "workers": 1,
            "shutdown_timeout": 1,
            "limits": {"header_timeout": HEADER_TIMEOUT, "body_timeout": BODY_TIMEOUT},
        },
        "session": {"secure": False, "keys": [{"id": "k1", "secret": "${BFF_SOAK_KEY}"}]},
        "providers": {
            "demo": {
                "type": "password",
                "login_url": f"{api}/auth/login",
                "refresh_url": f"{api}/refresh-token",
                "refresh_skew": 1,
            }
        },
        "routes": [
            {"path": "/api/demo/", "upstream": f"{api}/", "auth": "demo"},
            {"path": "/open/", "upstream": f"{api}/public/", "auth": "none"},
            {
                "path": "/faults/",
                "upstream": f"{faults}/",
                "auth": "none",
                "timeouts": {"read": FAULT_READ_TIMEOUT},
            },
            {"path": "/refused/", "upstream": f"{refused}/", "auth": "none"},
        ],
    }


# -- sampling ----------------------------------------------------------------------------


class Sampler:
    """What the gateway process holds right now."""

    def __init__(self, pid: int, public_port: int, upstream_ports: set[int], admin: str) -> None:
        self.process = psutil.Process(pid)
        self.public_port = public_port
        self.upstream_ports = upstream_ports
        self.admin = admin

    def take(self) -> dict[str, Any]:
        if self.process.status() == psutil.STATUS_ZOMBIE:  # dead, not yet reaped
            raise psutil.NoSuchProcess(self.process.pid)
        connections = self.process.net_connections(kind="tcp")
        established = [c for c in connections if c.status == psutil.CONN_ESTABLISHED]
        upstream = [c for c in connections if c.raddr and c.raddr.port in self.upstream_ports]
        try:
            metrics, _ = parse_metrics(_get(f"{self.admin}/metrics").decode())
        except OSError:
            metrics = {}
        return {
            "rss_mib": round(self.process.memory_info().rss / 2**20, 2),
            "fds": len(os.listdir(f"/proc/{self.process.pid}/fd")),
            "upstream_conns": sum(1 for c in upstream if c.status == psutil.CONN_ESTABLISHED),
            "upstream_other": sum(1 for c in upstream if c.status != psutil.CONN_ESTABLISHED),
            "client_conns": sum(1 for c in established if c.laddr.port == self.public_port),
            "open_connections_metric": metrics.get(("bff_open_connections", frozenset())),
            "active_requests_metric": metrics.get(("bff_active_requests", frozenset())),
        }


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return bytes(answer.read())


@dataclass
class Driven:
    samples: list[dict[str, Any]]
    tally: Tally
    elapsed: float  # seconds the users ran
    after: dict[str, Any]  # a sample once every client connection is closed
    fault_upstream_saw: dict[str, int]


async def drive(
    args: argparse.Namespace, setup: Setup, sampler: Sampler, fault_sock: socket.socket
) -> Driven:
    """Run the users for ``args.duration`` seconds, sampling every ``args.interval``."""
    rng = random.Random(args.seed)
    tally = Tally()
    faults = FaultUpstream(fault_sock)
    await faults.start()
    stop = asyncio.Event()
    rotation = Rotation()
    users = [User(setup, tally, random.Random(rng.random()), rotation) for _ in range(args.users)]
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    tasks = [asyncio.create_task(user.run(stop)) for user in users]

    async def sample() -> None:
        requests, latencies = tally.take_interval()
        now = time.monotonic() - started
        previous = samples[-1]["t"] if samples else 0.0
        taken = await asyncio.to_thread(sampler.take)
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        samples.append(
            {
                "t": round(now, 2),
                **taken,
                "requests": requests,
                "rps": round(requests / max(now - previous, 1e-9), 1),
                "p50_ms": None if p50 is None else round(p50 * 1000, 2),
                "p99_ms": None if p99 is None else round(p99 * 1000, 2),
            }
        )
        print(
            f"soak {now:6.0f}s  rss {taken['rss_mib']:6.1f} MiB  fds {taken['fds']:4d}  "
            f"upstream {taken['upstream_conns']:3d}  clients {taken['client_conns']:3d}  "
            f"{samples[-1]['rps']:6.1f} req/s  p99 {samples[-1]['p99_ms']} ms  "
            f"gateway-5xx {sum(tally.gateway_5xx.values())}  "
            f"unexpected {sum(tally.unexpected.values())}",
            flush=True,
        )

    try:
        ticks = 0
        while True:
            ticks += 1
            next_tick = started + ticks * args.interval
            if next_tick > started + args.duration + 1e-6:
                break
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            if any(task.done() for task in tasks):
                break  # a user crashed: its exception is raised below
            try:
                await sample()
            except psutil.NoSuchProcess:
                break  # the gateway died: main() reports it
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        # Let each user finish its current action (a slow client waits for its 408).
        _, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for user in users:
            await user.close()
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    # Everything closed on the client side: what does the gateway still hold?
    await asyncio.sleep(2)
    try:
        after = await asyncio.to_thread(sampler.take)
    except psutil.NoSuchProcess:
        after = {}
    await faults.close()
    return Driven(samples, tally, elapsed, after, dict(faults.seen))


def gateway_log_findings(log: Path) -> tuple[dict[str, int], int]:
    """From the gateway's JSON log: 5xx access lines by route and status, and
    the number of ``unhandled error`` events."""
    statuses: dict[str, int] = {}
    unhandled = 0
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        if entry.get("event") == "unhandled error":
            unhandled += 1
        status = entry.get("status")
        if entry.get("event") == "request" and isinstance(status, int) and status >= 500:
            key = f"{entry.get('route')} {entry.get('path')} {status}"
            statuses[key] = statuses.get(key, 0) + 1
    return statuses, unhandled


def log_5xx_unexplained(statuses: dict[str, int]) -> dict[str, int]:
    """Access-log 5xx lines that no scenario explains: not the status passthrough
    path and not the fault routes (the client-side judging covers those in detail)."""
    unexplained = {}
    for key, count in statuses.items():
        route, path, status = key.split(" ")
        if route in ("/faults/", "/refused/"):
            continue
        if path == f"/api/demo/status/{status}":
            continue
        unexplained[key] = count
    return unexplained


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # Explicitly, also for SIGINT: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bff-soak-"))
    procs = Processes(tmp)
    keep = False
    from gateway.sessions.seal import new_key_text

    try:
        api_port = free_port()
        api = f"http://127.0.0.1:{api_port}"
        ttl = str(args.access_ttl)
        argv = [PYTHON, "-m", "gateway.demo.api", "--port", str(api_port), "--access-ttl", ttl]
        demo = procs.start("demo-api", argv, cpu=None)
        wait_http(f"{api}/stats", demo, tmp / "demo-api.log")
        fault_sock = socket.socket()
        fault_sock.bind(("127.0.0.1", 0))
        fault_sock.listen(256)
        fault_port = fault_sock.getsockname()[1]
        refused_port = free_port()  # nothing listens there
        data = gateway_config(
            api, f"http://127.0.0.1:{fault_port}", f"http://127.0.0.1:{refused_port}"
        )
        config = tmp / "gateway.yaml"
        config.write_text(yaml.safe_dump(data))
        log = tmp / "gateway.log"
        gateway = procs.start(
            "gateway",
            [PYTHON, "-m", "gateway", "run", "--config", str(config)],
            cpu=None,
            env={"BFF_SOAK_KEY": new_key_text()},
            stdout=log,
        )
        admin = f"http://{data['server']['admin_listen']}"
        wait_http(f"{admin}/readyz", gateway, log)
        public_port = int(data["server"]["listen"].rsplit(":", 1)[1])
        setup = Setup("127.0.0.1", public_port, HEADER_TIMEOUT, BODY_TIMEOUT)
        sampler = Sampler(gateway.pid, public_port, {api_port, fault_port, refused_port}, admin)
        print(
            f"soak: {args.duration:g} s, {args.users} users, sampling every {args.interval:g} s, "
            f"warm-up {args.warmup:g} s; logs in {tmp}",
            flush=True,
        )
        driven = _run(drive(args, setup, sampler, fault_sock))
        samples, tally, elapsed = driven.samples, driven.tally, driven.elapsed
        alive = gateway.poll() is None
        stats = json.loads(_get(f"{api}/stats"))
        metrics, _ = parse_metrics(_get(f"{admin}/metrics").decode()) if alive else ({}, {})
        procs.stop_all()
        log_5xx, unhandled = gateway_log_findings(log)

        verdicts, failures = growth_verdicts(samples, args.warmup)
        if not alive:
            failures.append(f"the gateway exited with {gateway.returncode}")
        if tally.gateway_5xx:
            failures.append(f"the gateway produced 5xx itself: {dict(tally.gateway_5xx)}")
        unexplained = log_5xx_unexplained(log_5xx)
        if unexplained:
            failures.append(f"5xx in the gateway's access log on healthy routes: {unexplained}")
        if unhandled:
            failures.append(f"{unhandled} 'unhandled error' events in the gateway's log")
        if tally.unexpected:
            failures.append(f"unexpected answers: {dict(tally.unexpected)}")
        if stats["revoked_families"]:
            failures.append(f"{stats['revoked_families']} refresh token families revoked (reuse)")
        missing = [name for name in WEIGHTS if not _covered(name, tally)]
        if missing:
            failures.append(f"scenarios that never succeeded: {missing}")
        if elapsed >= 3 * args.access_ttl and stats["refresh_calls"] == 0:
            failures.append("no refresh happened: the tokens never expired mid-run")

        interval_p99s = [s["p99_ms"] for s in samples if s["p99_ms"] is not None]
        p50, p99 = percentile(tally.latencies, 0.5), percentile(tally.latencies, 0.99)
        summary = {
            "ok": not failures,
            "failures": failures,
            "run": {
                "duration_s": round(elapsed, 1),
                "interval_s": args.interval,
                "warmup_s": args.warmup,
                "users": args.users,
                "access_ttl_s": args.access_ttl,
                "header_timeout_s": HEADER_TIMEOUT,
                "body_timeout_s": BODY_TIMEOUT,
                "seed": args.seed,
            },
            "growth": growth_dicts(verdicts),
            "traffic": {
                "requests": tally.requests,
                "requests_per_s": tally.requests / elapsed if elapsed else 0.0,
                "api_p50_ms": None if p50 is None else round(p50 * 1000, 2),
                "api_p99_ms": None if p99 is None else round(p99 * 1000, 2),
                "api_worst_interval_p99_ms": max(interval_p99s) if interval_p99s else None,
                "logins": stats["logins"],
                "refresh_calls": stats["refresh_calls"],
                "refresh_rejected": stats["refresh_rejected"],
                "revoked_families": stats["revoked_families"],
                "refreshes_by_result": _by_label(metrics, "bff_token_refresh_total", "result"),
                "rejections_by_reason": _by_label(metrics, "bff_rejections_total", "reason"),
                "upstream_errors_by_kind": _by_label(metrics, "bff_upstream_errors_total", "kind"),
                "fault_upstream_saw": driven.fault_upstream_saw,
            },
            "outcomes": dict(tally.outcomes),
            "gateway_5xx": dict(tally.gateway_5xx),
            "unexpected": dict(tally.unexpected),
            "examples": tally.examples,
            "access_log_5xx": log_5xx,
            "after_traffic": driven.after,
            "samples": samples,
        }
        text = write_summary(summary, args.out / "soak-summary.json", args.out / "soak-summary.md")
        if samples:
            plot(samples, summary, args.out / "soak.png")
        print(text)
        print(f"written to {args.out}/soak.png, soak-summary.json, soak-summary.md")
        keep = not summary["ok"]
        return 0 if summary["ok"] else 1
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    except BaseException:
        keep = True
        raise
    finally:
        clean_up(procs, tmp, keep, "soak: logs and config")


def _covered(scenario: str, tally: Tally) -> bool:
    """Did ``scenario`` get at least one answer it must get?"""
    prefixes = {
        "api": ("api call",),
        "relogin": ("logout",),
        "sse": ("sse",),
        "upload": ("upload",),
        "download": ("download",),
        "slow_head": ("slow_head",),
        "slow_body": ("slow_body",),
        "trickle_ok": ("trickled",),
        "upstream_5xx": ("upstream",),
        "fault": ("fault",),
    }[scenario]
    return any(label.startswith(prefixes) for label in tally.outcomes)


def _by_label(metrics: dict[Any, float], name: str, label: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for (sample, labels), value in metrics.items():
        if sample == name:
            key = dict(labels).get(label, "")
            found[key] = found.get(key, 0.0) + value
    return found


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
