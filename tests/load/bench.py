"""`make bench`: throughput and latency of the gateway against its baselines, in one run.

Targets (same wrk settings for each; only ratios measured in one run mean much
on a small shared machine):

  a   the upstream, directly
  b   the gateway (`python -m gateway run`, default logging: JSON access log) on
      an `auth: none` route; b' the same with `logging: {access_log: false}`
  b2  the gateway on a session route (a login through the gateway first, the
      sealed cookie passed to wrk); b2' the same without the access log
  c   a minimal aiohttp pass-through proxy (tests/load/bench_servers.py)
  d   nginx proxying the same upstream (when nginx is installed)
  S   a low-level aiohttp hello-world server; C an in-process aiohttp client
      loop against the upstream; ceiling = 1 / (1/S + 1/C), the best a
      one-process aiohttp proxy could do (a proxy is one server + one client)
  C'  the same client loop with the gateway's own upstream client
      (gateway/upstream_client.py); ceiling' = 1 / (1/S + 1/C')

  w   WebSocket echo round trips to the upstream directly; w2 the same through
      the gateway's session route (Origin checked, token injected at the
      handshake): BENCH_CONNECTIONS sockets, each sending a message and
      awaiting its echo in a loop (tests/load/bench_servers.py ws-client)

Plus micro-benchmarks of the session codec (seal, unseal, SessionManager).

`python tests/load/bench.py --ws` (or `make bench-ws`) runs only the upstream,
one gateway and the two WebSocket rows: cheap enough to check them alone.

Method: every process is started once; then BENCH_ROUNDS interleaved rounds
(every other one in reverse order) give each target BENCH_DURATION / ROUNDS
seconds of wrk each, and each target keeps its best round. The machine is
shared, and noise only ever slows a run down, so the best round is the fairest
single number; the notes show every round.

CPU placement (2 cores): the upstream runs on CPU 0, every target under test
(gateway, baseline, nginx, hello server, client loop) on CPU 1, and wrk on the
CPU its target is not on. BENCH_PIN=0 disables pinning.

Environment: BENCH_DURATION (s per target over all rounds, default 10),
BENCH_ROUNDS (2), BENCH_CONNECTIONS (50), BENCH_THREADS (1), BENCH_WARMUP (s
before a target's first round, default 1), BENCH_PIN (1), BENCH_KEEP_TMP (0:
1 keeps the temp dir with logs and configs; it is always kept on a failure).

The table is printed and written to test-output/bench.md. Not a pytest module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_servers import HELLO_BODY, TOKEN_SIZE, jwt_like  # type: ignore[import-not-found]  # noqa: E402

from tests.ports import free_port  # noqa: E402

PYTHON = sys.executable
SERVERS = str(HERE / "bench_servers.py")
PROVIDER = "bench"


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value.strip() else default


DURATION = _env_float("BENCH_DURATION", 10)
CONNECTIONS = int(_env_float("BENCH_CONNECTIONS", 50))
THREADS = int(_env_float("BENCH_THREADS", 1))
ROUNDS = max(1, int(_env_float("BENCH_ROUNDS", 2)))
WARMUP = _env_float("BENCH_WARMUP", 1)
KEEP_TMP = os.environ.get("BENCH_KEEP_TMP", "0") not in ("", "0")


def _pinning() -> tuple[int, int] | None:
    """(upstream CPU, target CPU), or None when pinning is off or impossible."""
    if os.environ.get("BENCH_PIN", "1") in ("0", ""):
        return None
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


PIN = _pinning()
UPSTREAM_CPU = PIN[0] if PIN else None
TARGET_CPU = PIN[1] if PIN else None


def other_cpu(cpu: int | None) -> int | None:
    if PIN is None or cpu is None:
        return None
    return PIN[1] if cpu == PIN[0] else PIN[0]


# -- processes -----------------------------------------------------------------


class CpuBudget:
    """A CPU cgroup with a quota: the processes in it get at most ``cpus`` CPUs' time.

    Used to show `workers: 2` scaling on a 2-core machine: each worker gets a
    fixed budget, leaving the rest of the machine to wrk and the upstream.
    Needs root and the cgroup ``cpu`` controller (v1 ``cpu.cfs_quota_us`` or
    v2 ``cpu.max``); ``create`` returns None otherwise.
    """

    PERIOD_US = 20_000  # short periods: less waiting when a budget runs out mid-burst

    def __init__(self, path: Path, v2: bool) -> None:
        self.path = path
        self.v2 = v2

    @classmethod
    def create(cls, name: str, processes: int) -> CpuBudget | None:
        """A new cgroup weighted like ``processes`` ordinary processes (so that, without a
        quota, its processes compete for CPU as they would outside of it)."""
        for root, v2 in ((Path("/sys/fs/cgroup/cpu"), False), (Path("/sys/fs/cgroup"), True)):
            if v2 and "cpu" not in _read(root / "cgroup.subtree_control").split():
                continue
            if not v2 and not (root / "cpu.cfs_quota_us").exists():
                continue
            try:
                (root / name).mkdir()
            except OSError:
                continue
            budget = cls(root / name, v2)
            try:
                if v2:
                    (budget.path / "cpu.weight").write_text(str(100 * processes))
                else:
                    (budget.path / "cpu.shares").write_text(str(1024 * processes))
            except OSError:
                budget.remove()
                continue
            return budget
        return None

    def limit(self, cpus: float | None) -> None:
        quota = -1 if cpus is None else int(cpus * self.PERIOD_US)
        if self.v2:
            text = "max" if quota < 0 else str(quota)
            (self.path / "cpu.max").write_text(f"{text} {self.PERIOD_US}")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))

    def join(self) -> None:
        """Move the calling process in (from a child's preexec_fn)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self, timeout: float = 10) -> None:
        """Remove the cgroup once its processes are gone (killing stragglers such as
        multiprocessing's resource tracker, which outlives its parent for a moment)."""
        deadline = time.monotonic() + timeout
        while True:
            left = [int(pid) for pid in _read(self.path / "cgroup.procs").split()]
            if not left:
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                print(f"bench: could not remove {self.path}; remove it by hand", file=sys.stderr)
                return
            if time.monotonic() > deadline - timeout / 2:
                for pid in left:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class Processes:
    """Every child this run started; all stopped on exit, whatever happens."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.running: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        cpu: int | None,
        env: dict[str, str] | None = None,
        stdout: Path | None = None,
        budget: CpuBudget | None = None,
    ) -> subprocess.Popen[bytes]:
        log = (stdout or self.tmp / f"{name}.log").open("wb")
        preexec: Callable[[], None] | None = None
        if cpu is not None or budget is not None:

            def preexec() -> None:
                if cpu is not None:
                    os.sched_setaffinity(0, {cpu})
                if budget is not None:
                    budget.join()  # children (the workers) inherit it

        try:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=REPO,
                start_new_session=True,  # own group: a Ctrl-C reaches only us; we stop it
                preexec_fn=preexec,
            )
        finally:
            log.close()
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # Still unreaped, so the group id is still ours (nginx: master + worker).
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.running)):
            self.stop(proc, timeout=5)


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    """Poll ``url`` until it answers 200 (the process must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited ({proc.returncode}): {_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout}s: {_tail(log)}")


def _tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return "(no log)"


# -- wrk -------------------------------------------------------------------------


@dataclass
class Run:
    """One measurement of one target."""

    rps: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    problems: list[str] = field(default_factory=list)


def _loop_run(
    procs: Processes, proc: subprocess.Popen[bytes], out: Path, timeout: float, what: str
) -> Run:
    """Wait for a client-loop child (bench_servers.py) and read the JSON line it prints."""
    try:
        code = proc.wait(timeout=timeout)
    finally:
        procs.stop(proc)
    if code != 0:
        raise RuntimeError(f"{what} failed: {_tail(out)}")
    data = json.loads(out.read_text().strip().splitlines()[-1])
    problems = [f"{data['errors']} errors"] if data["errors"] else []
    return Run(data["requests"] / data["seconds"], problems=problems)


@dataclass
class Result:
    """A target's best run, with the others kept to show the spread."""

    key: str
    label: str
    rps: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    note: str = ""
    problems: list[str] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> Run:
    """Requests/s, p50, p99 and any errors from `wrk --latency` output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if rps is None or p50 is None or p99 is None:
        raise RuntimeError(f"could not parse wrk output:\n{output}")
    problems = []
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        problems.append(f"{non2xx.group(1)} non-2xx")
    socket_errors = re.search(r"Socket errors:\s+(.*)", output)
    if socket_errors:
        problems.append(f"socket errors: {socket_errors.group(1).strip()}")
    return Run(float(rps.group(1)), _ms(p50.group(1)), _ms(p99.group(1)), problems)


def wrk(
    procs: Processes,
    url: str,
    *,
    server_cpu: int | None,
    headers: tuple[str, ...] = (),
    seconds: float,
) -> str:
    argv = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--latency"]
    for header in headers:
        argv += ["-H", header]
    argv.append(url)
    out = procs.tmp / "wrk.out"
    proc = procs.start("wrk", argv, cpu=other_cpu(server_cpu), stdout=out)
    try:
        proc.wait(timeout=seconds + 30)
    finally:
        procs.stop(proc)
    return out.read_text(errors="replace")


# -- the targets -------------------------------------------------------------------


@dataclass
class Target:
    """Something wrk measures: a URL served by a process on ``server_cpu``."""

    key: str
    label: str
    url: str
    server_cpu: int | None
    note: str
    # Called before each run: the extra request headers (the session route logs in).
    prepare: Callable[[], tuple[str, ...]] = lambda: ()

    def run(self, procs: Processes, seconds: float, warmup: float) -> Run:
        return self.measure(procs, self.ready(procs, warmup), seconds)

    def ready(self, procs: Processes, warmup: float) -> tuple[str, ...]:
        """Check the answer, warm up; return the request headers to measure with."""
        headers = self.prepare()
        check_hello(self.url, dict(h.split(": ", 1) for h in headers))
        if warmup > 0:
            wrk(procs, self.url, server_cpu=self.server_cpu, headers=headers, seconds=warmup)
        return headers

    def measure(self, procs: Processes, headers: tuple[str, ...], seconds: float) -> Run:
        return parse_wrk(
            wrk(procs, self.url, server_cpu=self.server_cpu, headers=headers, seconds=seconds)
        )


@dataclass
class ClientLoop:
    """C: the aiohttp client alone; C': the gateway's own upstream client alone."""

    url: str
    key: str = "C"
    label: str = "aiohttp client loop"
    note: str = f"{CONNECTIONS} tasks, one ClientSession (settings of the gateway's auth client)"
    role: str = "client"

    def run(self, procs: Processes, seconds: float, warmup: float) -> Run:
        out = procs.tmp / f"{self.role}.out"
        argv = [PYTHON, SERVERS, self.role, self.url, str(seconds), str(CONNECTIONS)]
        argv.append(str(max(warmup, 0.3)))  # its own fresh pool always needs a moment
        proc = procs.start("client", argv, cpu=TARGET_CPU, stdout=out)
        return _loop_run(procs, proc, out, seconds + warmup + 30, "client loop")


@dataclass
class WsLoop:
    """w / w2: WebSocket echo round trips, run by a client process on the CPU its
    target is not on (as wrk is)."""

    key: str
    label: str
    url: str
    server_cpu: int | None
    note: str
    # Called before each run: the handshake's headers (the gateway's route logs in).
    prepare: Callable[[], dict[str, str]] = dict

    def run(self, procs: Processes, seconds: float, warmup: float) -> Run:
        out = procs.tmp / f"ws-client-{self.key}.out"
        argv = [PYTHON, SERVERS, "ws-client", self.url, str(seconds), str(CONNECTIONS)]
        argv += [str(max(warmup, 0.3)), json.dumps(self.prepare())]
        proc = procs.start("ws-client", argv, cpu=other_cpu(self.server_cpu), stdout=out)
        return _loop_run(procs, proc, out, seconds + warmup + 60, "WebSocket client loop")


def ws_targets(upstream: str, gateway: str) -> list[WsLoop]:
    def handshake() -> dict[str, str]:
        return {"Cookie": asyncio.run(_login(gateway)), "Origin": gateway}

    ws_upstream = "ws" + upstream.removeprefix("http")
    ws_gateway = "ws" + gateway.removeprefix("http")
    note = f"{CONNECTIONS} sockets, {len(HELLO_BODY)}-byte text echoed; round trips/s"
    return [
        WsLoop("w", "WebSocket echo, upstream direct", f"{ws_upstream}/ws", UPSTREAM_CPU, note),
        WsLoop(
            "w2",
            "WebSocket echo through the gateway",
            f"{ws_gateway}/api/ws",
            TARGET_CPU,
            note + "; session route, token injected at the handshake",
            handshake,
        ),
    ]


def check_hello(url: str, headers: dict[str, str] | None = None) -> None:
    """One request before measuring: the target must answer the upstream's body."""
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=5) as answer:
        body = answer.read()
        if answer.status != 200 or body != HELLO_BODY:
            raise RuntimeError(f"{url} answered {answer.status} {body[:200]!r}")
        if answer.headers.get("Set-Cookie"):
            raise RuntimeError(f"{url} set a cookie on a plain call: every request would re-seal")


def start_server(procs: Processes, name: str, argv: list[str], ready: str, log: Path) -> str:
    proc = procs.start(name, argv, cpu=TARGET_CPU if name != "upstream" else UPSTREAM_CPU)
    wait_http(ready, proc, log)
    return ready


def start_upstream(procs: Processes) -> str:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [PYTHON, SERVERS, "upstream", str(port)]
    start_server(procs, "upstream", argv, f"{url}/hello", procs.tmp / "upstream.log")
    return url


def gateway_config(upstream: str, access_log: bool, workers: int = 1) -> dict[str, Any]:
    data: dict[str, Any] = {
        "server": {
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
            "workers": workers,
            "shutdown_timeout": 1,
        },
        "session": {"secure": False, "keys": [{"id": "k1", "secret": "${BFF_BENCH_KEY}"}]},
        "providers": {
            PROVIDER: {
                "type": "password",
                "login_url": f"{upstream}/login",
                "refresh_url": f"{upstream}/refresh",
            }
        },
        "routes": [
            {"path": "/open/", "upstream": f"{upstream}/", "auth": "none"},
            {"path": "/api/", "upstream": f"{upstream}/", "auth": PROVIDER},
        ],
    }
    if not access_log:
        data["logging"] = {"access_log": False}
    return data


def start_gateway(
    procs: Processes,
    upstream: str,
    access_log: bool,
    *,
    workers: int = 1,
    cpu: int | None = TARGET_CPU,
    budget: CpuBudget | None = None,
    name: str | None = None,
) -> tuple[str, subprocess.Popen[bytes]]:
    """`python -m gateway run`; its stdout (the access log) goes to a file.

    Returns its public URL and its process (with workers, the supervisor)."""
    from gateway.sessions.seal import new_key_text

    data = gateway_config(upstream, access_log, workers)
    name = name or ("gateway" if access_log else "gateway-nolog")
    path = procs.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    log = procs.tmp / f"{name}.log"
    proc = procs.start(
        name,
        [PYTHON, "-m", "gateway", "run", "--config", str(path)],
        cpu=cpu,
        env={"BFF_BENCH_KEY": new_key_text()},
        stdout=log,
        budget=budget,
    )
    wait_http(f"http://{data['server']['admin_listen']}/readyz", proc, log)
    return f"http://{data['server']['listen']}", proc


async def _login(gateway: str) -> str:
    """Log in through the gateway; return the Cookie header value a browser would send."""
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client,
        client.post(
            f"{gateway}/auth/{PROVIDER}/login",
            json={"username": "bench", "password": "bench"},
            headers={"X-CSRF": "1"},
        ) as answer,
    ):
        body = await answer.read()
        if answer.status != 200:
            raise RuntimeError(f"login answered {answer.status}: {body[:200]!r}")
        pairs = [line.split(";", 1)[0] for line in answer.headers.getall("Set-Cookie", ())]
    if not pairs:
        raise RuntimeError("login set no cookie")
    return "; ".join(pairs)


def session_headers(gateway: str) -> Callable[[], tuple[str, ...]]:
    # A fresh login before every run keeps the session younger than the 60 s
    # touch interval: no response of the run re-seals the cookie.
    return lambda: (f"Cookie: {asyncio.run(_login(gateway))}",)


def gateway_targets(gateway: str, access_log: bool) -> list[Target]:
    suffix = "" if access_log else "'"
    note = "JSON access log to a file" if access_log else "logging: {access_log: false}"
    return [
        Target(f"b{suffix}", "gateway, auth: none", f"{gateway}/open/hello", TARGET_CPU, note),
        Target(
            f"b2{suffix}",
            "gateway, session route",
            f"{gateway}/api/hello",
            TARGET_CPU,
            note + "; cookie from a login through the gateway",
            session_headers(gateway),
        ),
    ]


NGINX_CONF = """\
daemon off;
worker_processes 1;
error_log {tmp}/nginx-error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(path, os.X_OK):
            return path
    return None


def start_nginx(procs: Processes, nginx: str, upstream: str) -> str:
    port = free_port()
    conf = procs.tmp / "nginx.conf"
    upstream_port = upstream.rsplit(":", 1)[1]
    conf.write_text(NGINX_CONF.format(tmp=procs.tmp, port=port, upstream_port=upstream_port))
    argv = [nginx, "-p", str(procs.tmp), "-e", str(procs.tmp / "nginx-error.log"), "-c", str(conf)]
    url = f"http://127.0.0.1:{port}/hello"
    return start_server(procs, "nginx", argv, url, procs.tmp / "nginx-error.log")


def start_targets(procs: Processes, upstream: str) -> list[Target | ClientLoop | WsLoop]:
    """Every target process, started once and kept for all rounds."""
    targets: list[Target | ClientLoop | WsLoop] = [
        Target("a", "upstream direct", f"{upstream}/hello", UPSTREAM_CPU, "aiohttp web.Application")
    ]
    port = free_port()
    hello = start_server(
        procs,
        "hello",
        [PYTHON, SERVERS, "hello", str(port)],
        f"http://127.0.0.1:{port}/hello",
        procs.tmp / "hello.log",
    )
    targets.append(
        Target("S", "aiohttp hello-world server", hello, TARGET_CPU, "web.Server, fixed answer")
    )
    targets.append(ClientLoop(f"{upstream}/hello"))
    targets.append(
        ClientLoop(
            f"{upstream}/hello",
            key="C'",
            label="gateway's upstream client loop",
            note=f"{CONNECTIONS} tasks, one UpstreamClient (what the gateway forwards with)",
            role="upstream-client",
        )
    )
    port = free_port()
    baseline = start_server(
        procs,
        "baseline",
        [PYTHON, SERVERS, "proxy", str(port), upstream],
        f"http://127.0.0.1:{port}/hello",
        procs.tmp / "baseline.log",
    )
    targets.append(
        Target(
            "c", "minimal aiohttp proxy", baseline, TARGET_CPU, "one ClientSession, streamed body"
        )
    )
    nginx = find_nginx()
    if nginx is None:
        print("nginx is not installed: no (d) row", flush=True)
    else:
        url = start_nginx(procs, nginx, upstream)
        targets.append(
            Target("d", "nginx proxy", url, TARGET_CPU, "1 worker, keepalive 32, access_log off")
        )
    for access_log in (True, False):
        url, _ = start_gateway(procs, upstream, access_log)
        targets += gateway_targets(url, access_log)
        if access_log:
            targets += ws_targets(upstream, url)
    return targets


def measure_all(procs: Processes, targets: list[Target | ClientLoop | WsLoop]) -> dict[str, Result]:
    """ROUNDS interleaved rounds (every other one in reverse order); keep each target's best."""
    runs: dict[str, list[Run]] = {t.key: [] for t in targets}
    seconds = DURATION / ROUNDS
    for index in range(ROUNDS):
        print(f"round {index + 1}/{ROUNDS} ({seconds:g} s per target)", flush=True)
        for target in targets if index % 2 == 0 else list(reversed(targets)):
            run = target.run(procs, seconds, WARMUP if index == 0 else 0)
            runs[target.key].append(run)
            latency = (
                f"  p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms"
                if run.p50_ms is not None and run.p99_ms is not None
                else ""
            )
            trouble = f"  ({'; '.join(run.problems)})" if run.problems else ""
            unit = "round trips/s" if isinstance(target, WsLoop) else "req/s"
            print(f"  {target.key:<4} {run.rps:>10,.0f} {unit}{latency}{trouble}", flush=True)
    results = {}
    for target in targets:
        best = max(runs[target.key], key=lambda r: r.rps)
        problems = [p for r in runs[target.key] for p in r.problems]
        results[target.key] = Result(
            target.key,
            target.label,
            best.rps,
            best.p50_ms,
            best.p99_ms,
            target.note,
            problems,
            [r.rps for r in runs[target.key]],
        )
    return results


# -- workers: 2 ---------------------------------------------------------------------

WORKER_CPUS = _env_float("BENCH_WORKER_CPUS", 0.5)


@dataclass
class ScalingRow:
    workers: int
    budget: str
    run: Run
    cores: float  # CPU time the gateway's processes used per second of the run


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of a process and all its live descendants (/proc)."""
    children: dict[int, list[int]] = {}
    seconds: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        seconds[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += seconds.get(pid, 0.0)
        stack.extend(children.get(pid, ()))
    return total


def measure_workers(procs: Processes, upstream: str) -> list[ScalingRow]:
    """The session route with `workers: 1` and `workers: 2`, twice.

    First with the whole machine (no pinning): on 2 cores two workers, the
    upstream and wrk compete for the same CPUs, so req/s cannot show scaling;
    req/s per core the gateway used can. Then with a CPU budget of
    BENCH_WORKER_CPUS per worker (a cgroup quota), which leaves CPU time over
    for wrk and the upstream, as a machine with a core for the load generator
    would. Run it last: it stops every process.
    """
    seconds = max(1.0, DURATION / ROUNDS)
    rows: list[ScalingRow] = []
    budgets: dict[int, CpuBudget | None] = {}
    try:
        for workers in (1, 2):
            budgets[workers] = CpuBudget.create(f"bff-bench-{os.getpid()}-w{workers}", workers)
        gateways: dict[int, tuple[str, int]] = {}
        for workers in (1, 2):
            url, proc = start_gateway(
                procs,
                upstream,
                True,
                workers=workers,
                cpu=None,
                budget=budgets[workers],
                name=f"gateway-workers-{workers}",
            )
            gateways[workers] = (url, proc.pid)
        phases: list[tuple[str, float | None]] = [("whole machine", None)]
        if all(budgets.values()):
            phases.append((f"{WORKER_CPUS:g} CPU per worker", WORKER_CPUS))
        else:
            print("workers: no CPU cgroup (needs root): budgeted rows skipped", flush=True)
        for label, per_worker in phases:
            for workers, (gateway, pid) in gateways.items():
                budget = budgets[workers]
                if budget is not None:
                    budget.limit(None if per_worker is None else per_worker * workers)
                target = Target(
                    f"w{workers}", "", f"{gateway}/api/hello", None, "", session_headers(gateway)
                )
                headers = target.ready(procs, max(WARMUP, 1))
                measured = []
                for _ in range(ROUNDS):
                    cpu_before, started = tree_cpu_seconds(pid), time.monotonic()
                    run = target.measure(procs, headers, seconds)
                    cores = (tree_cpu_seconds(pid) - cpu_before) / (time.monotonic() - started)
                    measured.append((run, cores))
                best, cores = max(measured, key=lambda m: m[0].rps)
                print(
                    f"  workers {workers}, {label}: {best.rps:,.0f} req/s, "
                    f"gateway {cores:.2f} cores",
                    flush=True,
                )
                rows.append(ScalingRow(workers, label, best, cores))
    finally:
        procs.stop_all()  # a cgroup can only be removed once its processes are gone
        for budget in budgets.values():
            if budget is not None:
                budget.remove()
    return rows


def render_workers(rows: list[ScalingRow]) -> str:
    lines = [
        "",
        "### `workers: 2`",
        "",
        "Session route, access log on, nothing pinned; each row the best of "
        f"{ROUNDS} runs. On the whole machine, wrk, the upstream and both workers share "
        "2 CPUs; with a CPU budget (a cgroup quota per gateway) the rest of the machine "
        "is left to wrk and the upstream, as a dedicated load-generator core would be. "
        "'cores' is the CPU time the gateway's processes used per second of the run.",
        "",
        "| workers | CPU | req/s | p99 | ÷ 1 worker | cores | req/s per core |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    single = {row.budget: row.run.rps for row in rows if row.workers == 1}
    for row in rows:
        base = single.get(row.budget, 0.0)
        ratio = f"{row.run.rps / base:.2f}" if base > 0 else "n/a"
        per_core = _fmt_rps(row.run.rps / row.cores) if row.cores > 0 else "n/a"
        problems = f" ({'; '.join(row.run.problems)})" if row.run.problems else ""
        lines.append(
            f"| {row.workers} | {row.budget} | {_fmt_rps(row.run.rps)}{problems} | "
            f"{_fmt_ms(row.run.p99_ms)} | {ratio} | {row.cores:.2f} | {per_core} |"
        )
    return "\n".join(lines) + "\n"


# -- micro-benchmarks -------------------------------------------------------------


def _per_op_us(statement: Callable[[], object], budget: float = 0.4) -> float:
    """Best of 5 repeats of a loop sized to take about ``budget`` seconds."""
    timer = timeit.Timer(statement)
    number, elapsed = timer.autorange()
    number = max(1, int(number * budget / max(elapsed, 1e-9) / 5))
    return min(timer.repeat(repeat=5, number=number)) / number * 1e6


def micro_benchmarks() -> list[tuple[str, float, str]]:
    from gateway.config import SessionConfig
    from gateway.sessions.manager import SessionManager
    from gateway.sessions.model import Session
    from gateway.sessions.seal import KeyRing, decode_key, new_key_text
    from gateway.sessions.stores import CookieStore

    key = new_key_text()
    keyring = KeyRing([("k1", decode_key(key))])
    now = time.time()
    session = Session(
        provider=PROVIDER,
        access_token=jwt_like("access"),
        refresh_token=jwt_like("refresh"),
        expires_at=now + 3600,
        created_at=now,
        last_seen=now,
        claims={"sub": "user-0001", "name": "Bench User", "email": "bench@example.com"},
    )
    plaintext = session.to_bytes()
    config = SessionConfig.model_validate({"secure": False, "keys": [{"id": "k1", "secret": key}]})
    manager = SessionManager(config, keyring, CookieStore())
    name = manager.cookie_name(PROVIDER)
    sealed = keyring.seal(plaintext, name)
    assert keyring.unseal(sealed, name) is not None
    cookies = {name: sealed, "theme": "dark"}
    cookie_header = f"theme=dark; {name}={sealed}"
    size = f"{len(plaintext)}-byte session, {len(sealed)}-byte cookie value"

    rows = [
        ("KeyRing.seal", _per_op_us(lambda: keyring.seal(plaintext, name)), size),
        ("KeyRing.unseal", _per_op_us(lambda: keyring.unseal(sealed, name)), size),
        ("Session.to_bytes", _per_op_us(session.to_bytes), "JSON encode"),
        ("Session.from_bytes", _per_op_us(lambda: Session.from_bytes(plaintext)), "JSON decode"),
    ]

    async def per_op_async(make: Callable[[], Any], rounds: int = 2000) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(rounds):
                await make()
            best = min(best, (time.perf_counter() - start) / rounds)
        return best * 1e6

    async def manager_rows() -> list[tuple[str, float, str]]:
        load_us = await per_op_async(lambda: manager.load(cookies, PROVIDER, time.time()))
        state = await manager.load(cookies, PROVIDER, time.time())
        assert state.session is not None

        async def commit() -> list[str]:
            manager.replace(state, session)
            return await manager.commit(state)

        commit_us = await per_op_async(commit)
        return [
            ("SessionManager.load", load_us, "same cookie again: unseal remembered (LRU)"),
            ("SessionManager.commit", commit_us, "encode + seal + Set-Cookie line (after refresh)"),
        ]

    rows += asyncio.run(manager_rows())
    try:
        from types import MappingProxyType

        from aiohttp._cookie_helpers import parse_cookie_header

        def parse() -> object:
            return MappingProxyType({k: m.value for k, m in parse_cookie_header(cookie_header)})

        rows.append(("aiohttp request.cookies", _per_op_us(parse), "parse the Cookie header"))
    except ImportError:  # a private helper of aiohttp: skip when it moves
        pass
    for label, us, _ in rows:
        print(f"  {label:<24} {us:8.1f} µs/op", flush=True)
    return rows


# -- the report ---------------------------------------------------------------------


def _fmt_rps(value: float) -> str:
    return f"{value:,.0f}"


def _fmt_ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} ms"


def _ratio(results: dict[str, Result], top: str, bottom: str) -> str:
    if top not in results or bottom not in results or results[bottom].rps <= 0:
        return "n/a"
    return f"{results[top].rps / results[bottom].rps:.2f}"


RATIOS = [
    ("b/a", "b", "a", "gateway ÷ upstream direct"),
    ("b/c", "b", "c", "gateway ÷ minimal aiohttp proxy"),
    ("b/d", "b", "d", "gateway ÷ nginx"),
    ("b2/b", "b2", "b", "session route ÷ auth: none route"),
    ("b2/c", "b2", "c", "session route ÷ minimal aiohttp proxy"),
    ("b2'/c", "b2'", "c", "session route without access log ÷ minimal aiohttp proxy"),
    ("b2/ceiling", "b2", "ceiling", "session route ÷ 1/(1/S + 1/C)"),
    ("b2'/ceiling", "b2'", "ceiling", "session route without access log ÷ ceiling"),
    ("b'/b", "b'", "b", "access log off ÷ on, auth: none route"),
    ("b2'/b2", "b2'", "b2", "access log off ÷ on, session route"),
    ("c/ceiling", "c", "ceiling", "minimal aiohttp proxy ÷ ceiling"),
    ("b2'/ceiling'", "b2'", "ceiling'", "session route without access log ÷ 1/(1/S + 1/C')"),
    ("C'/C", "C'", "C", "the gateway's upstream client ÷ aiohttp's ClientSession"),
    ("w2/w", "w2", "w", "WebSocket round trips through the gateway ÷ upstream direct"),
]


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def render(
    results: dict[str, Result], micro: list[tuple[str, float, str]], load_before: str
) -> str:
    pin = (
        f"upstream on CPU {UPSTREAM_CPU}, the target on CPU {TARGET_CPU}, "
        "wrk on the CPU its target is not on"
        if PIN
        else "no CPU pinning"
    )
    seconds = max(1, round(DURATION / ROUNDS))
    lines = [
        "## make bench",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}: "
        + (
            f"`wrk -t{THREADS} -c{CONNECTIONS} -d{seconds}s --latency`"
            if "a" in results
            else f"a {CONNECTIONS}-socket WebSocket echo loop for {seconds} s"
        )
        + f" per target in each of {ROUNDS} interleaved rounds (a {WARMUP:g} s warm-up "
        f"first); each row is the target's best round (all rounds' req/s in brackets). "
        f"{os.cpu_count()} CPUs shared with whatever else runs: {pin}. Python processes on "
        f"uvloop. Upstream body {len(HELLO_BODY)} bytes; session tokens ~{TOKEN_SIZE} bytes each. "
        f"1-minute load average {load_before} before, {_load()} after (above 2 the machine was "
        "busy with other work: trust the ratios more than the absolute numbers).",
        "",
        "| target | req/s | p50 | p99 | notes |",
        "|---|---:|---:|---:|---|",
    ]
    keys = ["a", "b", "b'", "b2", "b2'", "c", "d", "S", "C", "C'", "ceiling", "ceiling'"]
    for key in [*keys, "w", "w2"]:
        result = results.get(key)
        if result is None:
            continue
        spread = " / ".join(_fmt_rps(r) for r in result.rounds)
        note = "; ".join(
            part
            for part in [result.note, f"[{spread}]" if spread else "", *result.problems]
            if part
        )
        lines.append(
            f"| ({key}) {result.label} | {_fmt_rps(result.rps)} | {_fmt_ms(result.p50_ms)} | "
            f"{_fmt_ms(result.p99_ms)} | {note} |"
        )
    lines.append("| **ratios** | | | | |")
    for label, top, bottom, meaning in RATIOS:
        if top not in results:
            continue  # a partial run (--ws)
        lines.append(f"| {label} | {_ratio(results, top, bottom)} | | | {meaning} |")
    if micro:
        lines.append("| **micro-benchmarks** | **µs/op** | | | |")
    for label, us, note in micro:
        lines.append(f"| {label} | {us:.1f} µs | | | {note} |")
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------


def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def clean_up(procs: Processes, tmp: Path, keep: bool, kept: str) -> None:
    """The end of a run (bench or soak), however it ends: every child stopped, the
    temporary directory removed, or kept (``kept`` says what is in it) to show why."""
    # A second Ctrl-C must not cut the cleanup short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    procs.stop_all()
    if keep:
        print(f"{kept} kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    if shutil.which("wrk") is None and "--ws" not in sys.argv[1:]:
        print("bench: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    # Explicitly, also for SIGINT: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    tmp = Path(tempfile.mkdtemp(prefix="bff-bench-"))
    procs = Processes(tmp)
    started = time.monotonic()
    keep = KEEP_TMP
    try:
        load_before = _load()
        if "--ws" in sys.argv[1:]:
            print("WebSocket rows only: the upstream and one gateway", flush=True)
            upstream = start_upstream(procs)
            gateway, _ = start_gateway(procs, upstream, access_log=True)
            results = measure_all(procs, list(ws_targets(upstream, gateway)))
            table = render(results, [], load_before)
            print()
            print(table)
            out_dir = REPO / "test-output"
            out_dir.mkdir(exist_ok=True)
            (out_dir / "bench-ws.md").write_text(table)
            return 0
        print("micro-benchmarks (this process):", flush=True)
        micro = micro_benchmarks()
        print("starting the upstream and every target", flush=True)
        upstream = start_upstream(procs)
        targets = start_targets(procs, upstream)
        results = measure_all(procs, targets)
        print("workers: 1 and 2", flush=True)
        scaling = measure_workers(procs, upstream)
        s = results["S"].rps
        for key, client, note in (
            ("ceiling", "C", "what one aiohttp server + one aiohttp client in one process can do"),
            ("ceiling'", "C'", "the same with the gateway's own upstream client"),
        ):
            c = results[client].rps
            results[key] = Result(
                key,
                f"ceiling 1/(1/S + 1/{client})",
                1 / (1 / s + 1 / c) if s > 0 and c > 0 else 0.0,
                note=note,
            )
            if c >= 0.9 * results["a"].rps:
                results[client].problems.append(
                    f"near the upstream's own rate: {client} may be upstream-bound"
                )
        table = render(results, micro, load_before) + render_workers(scaling)
        print()
        print(table)
        out_dir = REPO / "test-output"
        out_dir.mkdir(exist_ok=True)
        (out_dir / "bench.md").write_text(table)
        print(f"written to {out_dir / 'bench.md'} in {time.monotonic() - started:.0f} s")
        return 0
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    except BaseException:
        keep = True  # the logs say why
        raise
    finally:
        clean_up(procs, tmp, keep, "bench: logs and configs")


if __name__ == "__main__":
    sys.exit(main())
