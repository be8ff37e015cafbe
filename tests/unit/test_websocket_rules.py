"""The WebSocket relay's pure parts: upgrade detection, close codes and reasons, the
Origin rule, and the config it reads."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.auth.csrf import CsrfPolicy
from gateway.config import ConfigError
from gateway.errors import GatewayError
from gateway.websocket import close_reason, is_websocket_upgrade, sendable_close_code
from tests.support import build_config, config_dict


@pytest.mark.parametrize(
    ("method", "upgrade", "expected"),
    [
        ("GET", "websocket", True),
        ("GET", "WebSocket", True),
        ("GET", "h2c, websocket", True),
        ("GET", "h2c", False),
        ("GET", None, False),
        ("POST", "websocket", False),  # only a GET opens a WebSocket (RFC 6455 §4.1)
    ],
)
def test_upgrade_detection(method: str, upgrade: str | None, expected: bool) -> None:
    headers = CIMultiDict({"Upgrade": upgrade} if upgrade is not None else {})
    request = make_mocked_request(method, "/x", headers=headers)
    assert is_websocket_upgrade(request) is expected


@pytest.mark.parametrize(
    ("received", "sent"),
    [
        (None, 1000),
        (0, 1000),  # an empty close frame
        (1005, 1000),  # "no status": never on the wire
        (1000, 1000),
        (1001, 1001),
        (1008, 1008),
        (1014, 1014),
        (3000, 3000),
        (4999, 4999),
        (1006, 1002),  # reserved: a peer that sends it broke the protocol
        (1015, 1002),
        (1004, 1002),
        (2999, 1002),
        (5000, 1002),
    ],
)
def test_close_codes_passed_on_are_always_sendable(received: int | None, sent: int) -> None:
    assert sendable_close_code(received) == sent


def test_close_reason_fits_a_control_frame_without_cutting_a_character() -> None:
    assert close_reason("bye") == b"bye"
    long = close_reason("é" * 100)  # 200 bytes of UTF-8
    assert len(long) <= 123
    assert long.decode() == "é" * 61


def _origin_policy() -> CsrfPolicy:
    return CsrfPolicy("X-CSRF", None, ["https://app.example.com/"])


@pytest.mark.parametrize("origin", ["http://gw.test", "HTTP://GW.TEST", "https://app.example.com"])
def test_websocket_origin_accepted(origin: str) -> None:
    _origin_policy().check_origin(CIMultiDict({"Origin": origin}), "http://gw.test")


@pytest.mark.parametrize(
    "origin", [None, "null", "https://evil.example", "https://gw.test", "http://gw.test:81", ""]
)
def test_websocket_origin_refused(origin: str | None) -> None:
    headers = CIMultiDict({"Origin": origin} if origin is not None else {})
    with pytest.raises(GatewayError) as caught:
        _origin_policy().check_origin(headers, "http://gw.test")
    assert (caught.value.status, caught.value.code) == (403, "csrf_failed")


def test_public_origin_is_the_expected_websocket_origin() -> None:
    policy = CsrfPolicy("X-CSRF", "https://app.test", [])
    policy.check_origin(CIMultiDict({"Origin": "https://app.test"}), "http://internal:8080")
    with pytest.raises(GatewayError):
        policy.check_origin(CIMultiDict({"Origin": "http://internal:8080"}), "http://internal:8080")


def test_websocket_settings_defaults_and_overrides() -> None:
    route = {"path": "/a/", "upstream": "http://127.0.0.1:1/"}
    tuned = {**route, "path": "/b/", "websocket": {"max_message_size": "64KiB", "idle_timeout": 5}}
    config = build_config(config_dict([route, tuned], server={"limits": {"max_websockets": 7}}))
    default, custom = (r.websocket for r in config.routes)
    assert (default.max_message_size, default.idle_timeout) == (1024**2, 300)
    assert default.session_check_interval == 30
    assert (custom.max_message_size, custom.idle_timeout) == (64 * 1024, 5)
    assert config.server.limits.max_websockets == 7


@pytest.mark.parametrize(
    ("websocket", "where"),
    [
        ({"idle_timeout": 0}, "routes.0.websocket.idle_timeout"),
        ({"max_message_size": 0}, "routes.0.websocket.max_message_size"),
        ({"max_message_size": "lots"}, "routes.0.websocket.max_message_size"),
        ({"heartbeat": 5}, "routes.0.websocket.heartbeat"),
    ],
)
def test_bad_websocket_settings_are_reported_with_their_key(
    websocket: dict[str, object], where: str
) -> None:
    route = {"path": "/a/", "upstream": "http://127.0.0.1:1/", "websocket": websocket}
    with pytest.raises(ConfigError) as caught:
        build_config(config_dict([route]))
    assert any(where in problem for problem in caught.value.problems), caught.value.problems
