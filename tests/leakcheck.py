"""The suite-wide leak check (issue 12): no token or code in any response or log line.

Every secret a test provider issues is recorded here for the whole pytest session
(``record_secret``: the OpenID Connect provider's access, refresh and ID tokens and
authorization codes, see tests/oauth_support.py, and those of the small providers
in the oauth2 tests); so is everything that could carry one out of the gateway:

- every record created on the gateway's loggers (``bff.gateway``, ``bff.access``),
  seen by a logging *filter* (it records and lets everything through, and unlike
  a handler it does not change where records go, so the access sink's fast path
  and its tests are unaffected), formatted by the production JsonFormatter;
- every line the access sink writes straight to its stream (``_AccessSink.flush``,
  wrapped here; production code is not touched);
- every response a test's ``Browser`` (tests/session_support.py) gets from a
  gateway, redirects it followed included (status, all headers, body), and the
  gateway's responses Chromium saw in tests/e2e/test_browser_oidc.py.

While a test of the oauth2 modules runs, the ``bff`` loggers are set to DEBUG so
that every record the gateway would write exists and is searched (elsewhere the
levels are the tests' own: raising them would change what their caplog sees).

At the end of the session every capture is searched for every 16-character window
of every recorded secret (a set of windows built once, each text scanned once; a
secret of 10 to 15 characters is searched whole, a shorter one not at all) and
the run fails naming the test and the place, with a short hash of the secret,
never the secret. The one allowed appearance: the ID token as ``id_token_hint``
in a Location that points at a provider's end-session endpoint (SPEC, README: the
RP-initiated logout carries it); that one parameter value is left out of the
capture, and only when it is a recorded ID token.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import pytest

from gateway.observability import logs

WINDOW = 16  # as tests/e2e/test_browser.py: a 16-character piece of a secret is a leak
SHORTEST = 10  # a shorter "secret" is a fixture such as code=c: searched, it would be everywhere
GATEWAY_LOGGERS = ("bff.gateway", "bff.access")
# The modules whose tests talk to a test provider: logs at DEBUG while they run.
OAUTH_MODULES = ("test_oauth2_", "test_browser_oidc")


def fingerprint(secret: str) -> str:
    """What a report shows of a secret: enough to tell two apart, nothing to use."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Secret:
    kind: str  # access_token, refresh_token, id_token, code
    test: str  # the test during which the provider issued it


@dataclass(frozen=True)
class Captured:
    test: str
    where: str
    text: str


@dataclass(frozen=True)
class Leak:
    test: str
    where: str
    kind: str
    issued_in: str
    hash: str

    def __str__(self) -> str:
        return (
            f"{self.kind} {self.hash} (issued in {self.issued_in}) "
            f"found in {self.where} during {self.test}"
        )


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


@dataclass
class LeakRegistry:
    secrets: dict[str, Secret] = field(default_factory=dict)
    captured: list[Captured] = field(default_factory=list)
    end_sessions: set[str] = field(default_factory=set)
    test: str = "(outside any test)"
    too_short: int = 0  # secrets under SHORTEST characters: fixtures like "c", not searched
    allowed_hints: int = 0  # id_token_hint values left out of end-session Locations
    capture_errors: list[str] = field(default_factory=list)  # a hole in the search: fails
    lock: threading.Lock = field(default_factory=threading.Lock)  # providers run on threads

    # -- what the providers issue

    def record_secret(self, kind: str, value: object) -> None:
        if not isinstance(value, str) or not value:
            return
        with self.lock:
            if len(value) < SHORTEST:
                self.too_short += 1
            elif value not in self.secrets:
                self.secrets[value] = Secret(kind, self.test)

    def record_end_session(self, url: str) -> None:
        """A provider's end-session endpoint: an ``id_token_hint`` sent there is allowed."""
        with self.lock:
            self.end_sessions.add(_endpoint(url))

    # -- what could leak

    def record_text(self, where: str, text: str | bytes) -> None:
        with self.lock:
            self.captured.append(Captured(self.test, where, _text(text)))

    def record_response(
        self, url: str, status: int, headers: Iterable[tuple[str, str]], body: bytes | None
    ) -> None:
        """A gateway's response to ``url`` (the request's own query is not part of it:
        a test may send a code to the callback)."""
        lines = [f"HTTP {status}"]
        for name, value in headers:
            if name.lower() == "location":
                value = self._without_allowed_hint(value)
            lines.append(f"{name}: {value}")
        if body:
            lines.append(_text(body))
        self.record_text(f"response {status} to {urlsplit(url).path}", "\n".join(lines))

    def _without_allowed_hint(self, location: str) -> str:
        if _endpoint(location) not in self.end_sessions:
            return location
        query = parse_qsl(urlsplit(location).query, keep_blank_values=True)
        kept = [
            f"{k}={v}"
            for k, v in query
            if not (k == "id_token_hint" and self._kind(v) == "id_token")
        ]
        if len(kept) == len(query):
            return location
        with self.lock:
            self.allowed_hints += 1
        return location.split("?", 1)[0] + "?" + "&".join(kept) + " (id_token_hint left out)"

    def _kind(self, value: str) -> str:
        with self.lock:
            secret = self.secrets.get(value)
        return secret.kind if secret else ""

    # -- the search

    def leaks(self) -> list[Leak]:
        with self.lock:
            secrets = dict(self.secrets)
            captured = list(self.captured)
        windows: dict[str, str] = {}
        short = [value for value in secrets if len(value) < WINDOW]  # searched whole
        for value in secrets:
            for i in range(len(value) - WINDOW + 1):
                windows.setdefault(value[i : i + WINDOW], value)
        found: list[Leak] = []
        for item in captured:
            hits = list(_secrets_in(item.text, windows))
            hits += [value for value in short if value in item.text]
            for value in hits:
                secret = secrets[value]
                found.append(
                    Leak(item.test, item.where, secret.kind, secret.test, fingerprint(value))
                )
        return found


def _endpoint(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _secrets_in(text: str, windows: dict[str, str]) -> Iterator[str]:
    """Each secret (once) of which ``text`` holds a 16-character window."""
    seen: set[str] = set()
    get = windows.get
    for i in range(len(text) - WINDOW + 1):
        value = get(text[i : i + WINDOW])
        if value is not None and value not in seen:
            seen.add(value)
            yield value


REGISTRY = LeakRegistry()


# --------------------------------------------------------------------------- capture


class _LogRecorder(logging.Filter):
    """On the gateway's loggers: records each record as the production formatter
    writes it, and lets it through."""

    def __init__(self, registry: LeakRegistry) -> None:
        super().__init__()
        self.registry = registry
        self.formatter = logs.JsonFormatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = self.formatter.format(record)
        except Exception as exc:  # never break the gateway's logging; fail the check instead
            self.registry.capture_errors.append(f"{record.name}: {type(exc).__name__}")
        else:
            self.registry.record_text(f"log record of {record.name}", text)
        return True


def _install(registry: LeakRegistry) -> None:
    recorder = _LogRecorder(registry)
    for name in GATEWAY_LOGGERS:
        logging.getLogger(name).addFilter(recorder)
    flush = logs._AccessSink.flush

    def recorded_flush(self: logs._AccessSink) -> None:
        with self.handler.lock:  # type: ignore[union-attr]
            for line in self.pending:
                registry.record_text("access sink line", line)
            flush(self)

    logs._AccessSink.flush = recorded_flush  # type: ignore[method-assign]


_install(REGISTRY)


# --------------------------------------------------------------------------- pytest wiring


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    REGISTRY.test = item.nodeid
    oauth = any(part in item.path.name for part in OAUTH_MODULES)
    bff = logging.getLogger("bff")
    level = bff.level
    if oauth:
        bff.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        if oauth:
            bff.setLevel(level)
        REGISTRY.test = "(between tests)"


_verdict: list[str] = []  # the summary line, written by pytest_terminal_summary


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Search everything captured; a leak fails the run (exit status 1)."""
    if not REGISTRY.secrets:
        return
    started = time.perf_counter()
    found = REGISTRY.leaks()
    took = time.perf_counter() - started
    kinds = Counter(secret.kind for secret in REGISTRY.secrets.values())
    places = Counter(item.where.split(" ", 1)[0] for item in REGISTRY.captured)
    _verdict.append(
        f"leak check: {len(REGISTRY.secrets)} secrets ({_counts(kinds)}; "
        f"{REGISTRY.too_short} under {SHORTEST} characters not searched) in "
        f"{len(REGISTRY.captured)} captures ({_counts(places)}; "
        f"{sum(len(c.text) for c in REGISTRY.captured)} characters), "
        f"{REGISTRY.allowed_hints} end-session id_token_hint(s) allowed, "
        f"{took:.2f} s: {len(found)} leak(s)"
    )
    problems = [str(leak) for leak in found]
    problems += [f"a log record could not be captured ({e})" for e in REGISTRY.capture_errors]
    if not REGISTRY.captured:
        problems.append("secrets were issued but nothing was captured: the capture is broken")
    if problems:
        _verdict.append(
            "LEAK CHECK FAILED: a token or code reached a gateway response or log line, "
            "or the capture failed "
            "(secrets shown by hash only):\n" + "\n".join(f"  {p}" for p in problems)
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counter.items()))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _verdict:
        failed = line.startswith("LEAK CHECK FAILED")
        if failed:
            terminalreporter.write_sep("=", "leak check", red=True)
        terminalreporter.write_line(line, red=failed)
