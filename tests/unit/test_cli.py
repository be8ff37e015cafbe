"""`python -m gateway keygen | check | run` as a real subprocess (SPEC §1, §2)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.sessions.seal import decode_key
from tests.support import REPO, TEST_KEY, free_port

VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BFF_CONFIG", "BFF_SESSION_KEY")}
    env.update(extra)
    return env


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "gateway", *args],
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def good_config(**server: Any) -> dict[str, Any]:
    return {
        "server": {
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
            **server,
        },
        "session": {"secure": False, "keys": [{"id": "k1", "secret": "${BFF_SESSION_KEY}"}]},
        "providers": {"demo": {"type": "password", "login_url": "http://127.0.0.1:9/auth/login"}},
        "routes": [{"path": "/api/demo/", "upstream": "http://127.0.0.1:9/", "auth": "demo"}],
    }


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line message, got: {text!r}"
    return lines[0]


# -- keygen --------------------------------------------------------------------------------


def test_keygen_prints_a_fresh_32_byte_base64url_key(tmp_path: Path) -> None:
    first = cli("keygen", cwd=tmp_path)
    second = cli("keygen", cwd=tmp_path)
    keys = []
    for result in (first, second):
        assert result.returncode == 0, result.stderr
        key = one_line(result.stdout)
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", key)
        assert len(decode_key(key)) == 32
        keys.append(key)
    assert keys[0] != keys[1]


def test_a_generated_key_is_accepted_by_check(tmp_path: Path) -> None:
    key = cli("keygen", cwd=tmp_path).stdout.strip()
    path = write(tmp_path / "gw.yaml", good_config())
    result = cli("check", "--config", str(path), cwd=tmp_path, env=clean_env(BFF_SESSION_KEY=key))
    assert result.returncode == 0, result.stderr


# -- check -----------------------------------------------------------------------------------


def test_check_accepts_a_good_config(tmp_path: Path) -> None:
    path = write(tmp_path / "good.yaml", good_config())
    result = cli(
        "check", "--config", str(path), cwd=tmp_path, env=clean_env(BFF_SESSION_KEY=TEST_KEY)
    )
    assert result.returncode == 0, result.stderr
    assert str(path) in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("relative", ["config.yaml", "deploy/config.docker.yaml"])
def test_check_accepts_the_repository_configs(relative: str) -> None:
    result = cli("check", "--config", relative, cwd=REPO, env=clean_env(BFF_SESSION_KEY=TEST_KEY))
    assert result.returncode == 0, result.stderr


def test_check_prints_every_problem_with_its_key_path_and_exits_2(tmp_path: Path) -> None:
    data = good_config(limitz=1)
    data["session"] = {
        "store": "redis",
        "secure": False,
        "same_site": "None",
        "keys": [{"id": "k1", "secret": "c2hvcnQta2V5LTE2LWJ5dA"}],
    }
    data["routes"] = [
        {"path": "/api/", "upstream": "http://x/", "auth": "nobody"},
        {"path": "/api", "upstream": "http://y/"},
        {"path": "/u/", "upsteam": "http://x/"},
        {"path": "/k/", "upstream": "http://x/", "inject_headers": {"X-Key": "${UNSET_FOR_CHECK}"}},
    ]
    path = write(tmp_path / "bad.yaml", data)
    result = cli("check", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    expected = {
        "server.limitz",
        "session.redis_url",
        "session.same_site",
        "session.keys.0.secret",
        "routes.0.auth",
        "routes.1.path",
        "routes.2.upsteam",
        "routes.2",  # with the typo it has neither upstream nor static
        "routes.3.inject_headers.X-Key",
    }
    for key_path in expected:
        assert any(line.startswith(f"{path}: {key_path}: ") for line in lines), (key_path, lines)
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    assert len(lines) == len(expected), lines
    assert "UNSET_FOR_CHECK" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_on_a_missing_file_exits_2(tmp_path: Path) -> None:
    result = cli("check", "--config", str(tmp_path / "absent.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "absent.yaml: cannot read" in one_line(result.stderr)


# -- run: failures to start -------------------------------------------------------------------


def test_run_with_an_unset_variable_exits_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "gw.yaml", good_config())
    result = cli("run", "--config", str(path), cwd=tmp_path, timeout=30)
    assert result.returncode != 0
    line = one_line(result.stderr)
    assert "BFF_SESSION_KEY" in line
    assert "session.keys.0.secret" in line
    assert "Traceback" not in result.stderr + result.stdout


def test_run_with_several_problems_still_prints_one_line(tmp_path: Path) -> None:
    data = good_config(limitz=1)
    data["routes"][0]["auth"] = "nobody"
    path = write(tmp_path / "gw.yaml", data)
    result = cli("run", "--config", str(path), cwd=tmp_path, timeout=30)
    assert result.returncode != 0
    line = one_line(result.stderr)
    assert "bff-gateway check" in line


@pytest.mark.parametrize("which", ["listen", "admin_listen"])
def test_run_on_a_taken_port_exits_with_one_line_naming_the_address(
    tmp_path: Path, which: str
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        path = write(tmp_path / "gw.yaml", good_config(**{which: taken}))
        result = cli(
            "run",
            "--config",
            str(path),
            cwd=tmp_path,
            env=clean_env(BFF_SESSION_KEY=TEST_KEY),
            timeout=30,
        )
    assert result.returncode != 0
    line = one_line(result.stderr)
    assert taken in line
    assert "Traceback" not in result.stderr + result.stdout


def test_run_rejects_a_negative_worker_count(tmp_path: Path) -> None:
    path = write(tmp_path / "gw.yaml", good_config())
    env = clean_env(BFF_SESSION_KEY=TEST_KEY)
    result = cli("run", "--config", str(path), "--workers", "-1", cwd=tmp_path, env=env, timeout=30)
    assert result.returncode != 0
    assert "workers" in one_line(result.stderr)


def _time_wait_port() -> int:
    """A port with no listener but a TIME_WAIT connection (as after a restart)."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = int(server.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end goes to TIME_WAIT
        time.sleep(0.05)  # let the FIN reach the client before it closes too
        client.close()
    return port


def test_run_starts_on_a_port_with_only_time_wait_connections(tmp_path: Path) -> None:
    port = _time_wait_port()
    # Precondition: the port is in TIME_WAIT, which the server's own bind tolerates.
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    with socket.socket() as reuse:
        reuse.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reuse.bind(("127.0.0.1", port))
    data = good_config(listen=f"127.0.0.1:{port}")
    path = write(tmp_path / "gw.yaml", data)
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(
        [PYTHON, "-m", "gateway", "run", "--config", str(path)],
        cwd=tmp_path,
        env=clean_env(BFF_SESSION_KEY=TEST_KEY),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        ready = False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                admin = f"http://{data['server']['admin_listen']}/readyz"
                with urllib.request.urlopen(admin, timeout=1) as answer:
                    ready = answer.status == 200
                    break
            except OSError:
                time.sleep(0.1)  # polling a subprocess: no event to await
        assert ready, (tmp_path / "run.log").read_text()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        log.close()


# -- where the config comes from --------------------------------------------------------------


def test_config_defaults_to_the_current_directory(tmp_path: Path) -> None:
    write(tmp_path / "config.yaml", good_config())
    result = cli("check", cwd=tmp_path, env=clean_env(BFF_SESSION_KEY=TEST_KEY))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config.yaml")


def test_config_falls_back_to_bff_config(tmp_path: Path) -> None:
    elsewhere = write(tmp_path / "elsewhere.yaml", good_config())
    work = tmp_path / "work"
    work.mkdir()
    env = clean_env(BFF_SESSION_KEY=TEST_KEY, BFF_CONFIG=str(elsewhere))
    result = cli("check", cwd=work, env=env)
    assert result.returncode == 0, result.stderr
    assert str(elsewhere) in result.stdout


def test_local_config_yaml_wins_over_bff_config(tmp_path: Path) -> None:
    write(tmp_path / "config.yaml", good_config())
    bad = write(tmp_path / "bad.yaml", {"server": {"limitz": 1}})
    env = clean_env(BFF_SESSION_KEY=TEST_KEY, BFF_CONFIG=str(bad))
    result = cli("check", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config.yaml")


def test_explicit_config_wins_over_both(tmp_path: Path) -> None:
    write(tmp_path / "config.yaml", good_config())
    good_elsewhere = write(tmp_path / "env.yaml", good_config())
    bad = write(tmp_path / "bad.yaml", {"server": {"limitz": 1}})
    env = clean_env(BFF_SESSION_KEY=TEST_KEY, BFF_CONFIG=str(good_elsewhere))
    result = cli("check", "--config", str(bad), cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert one_line(result.stderr).startswith(f"{bad}: server.limitz: ")


def test_without_any_config_the_default_path_is_named(tmp_path: Path) -> None:
    result = cli("check", cwd=tmp_path)
    assert result.returncode == 2
    assert one_line(result.stderr).startswith("config.yaml: cannot read")


def test_run_uses_the_default_config_too(tmp_path: Path) -> None:
    write(tmp_path / "config.yaml", good_config())
    result = cli("run", cwd=tmp_path, timeout=30)
    assert result.returncode != 0
    line = one_line(result.stderr)
    assert "config.yaml" in line
    assert "BFF_SESSION_KEY" in line
