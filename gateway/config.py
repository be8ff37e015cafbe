"""Configuration: YAML, ``${ENV}`` interpolation, strict pydantic models (SPEC §2).

Every problem is reported with the file, the key path and the reason, and all
of them are collected before giving up, so one ``bff-gateway check`` shows
everything that is wrong.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.sessions.seal import decode_key

_SIZE_UNITS = {"": 1, "B": 1, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]iB|B)?\s*$", re.IGNORECASE)
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token


class ConfigError(Exception):
    """One or more configuration problems, each already formatted for a person."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes or a string like 10MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()]
    raise ValueError(f"invalid size {value!r}: use bytes or a number with KiB, MiB or GiB")


Size = Annotated[int, BeforeValidator(parse_size)]
Seconds = Annotated[float, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _split_listen(value: str) -> tuple[str, int]:
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port or [v6]:port, got {value!r}")
    return host, int(port)


class Listen(_Strict):
    host: str
    port: int

    @classmethod
    def parse(cls, value: Any) -> Any:
        if isinstance(value, str):
            host, port = _split_listen(value)
            return {"host": host, "port": port}
        return value

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


ListenAddress = Annotated[Listen, BeforeValidator(Listen.parse)]


class Limits(_Strict):
    max_header_size: Size = 16 * 1024
    max_headers: int = Field(100, gt=0)
    max_body_size: Size = 10 * 1024**2
    retry_buffer_size: Size = 1024**2


class Timeouts(_Strict):
    connect: Seconds | None = 5
    read: Seconds | None = 60
    total: Seconds | None = None


class ServerTLS(_Strict):
    cert_file: Path
    key_file: Path


class Server(_Strict):
    listen: ListenAddress = Listen(host="127.0.0.1", port=8080)
    admin_listen: ListenAddress | None = Listen(host="127.0.0.1", port=9090)
    workers: int = Field(1, ge=0)
    tls: ServerTLS | None = None
    public_origin: str | None = None
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    shutdown_timeout: float = Field(25, ge=0)
    limits: Limits = Limits()
    timeouts: Timeouts = Timeouts()

    @field_validator("public_origin")
    @classmethod
    def _origin(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/?#\s]+$", value):
            raise ValueError(
                "expected scheme://host[:port] with no path, e.g. https://app.example.com"
            )
        return value.lower()


class SessionKey(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    secret: str = Field(repr=False)

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str) -> str:
        try:
            decode_key(value)
        except ValueError:
            raise ValueError(
                "must be base64url of exactly 32 bytes (make one with `bff-gateway keygen`)"
            ) from None
        return value

    def key_bytes(self) -> bytes:
        return decode_key(self.secret)


class CSRF(_Strict):
    header: str = Field("X-CSRF", pattern=_TOKEN_RE.pattern)
    allowed_origins: list[str] = []


class SessionConfig(_Strict):
    store: Literal["cookie", "memory", "redis"] = "cookie"
    redis_url: str | None = None
    cookie_prefix: str = Field("bff", pattern=r"^[A-Za-z0-9_]{1,32}$")
    secure: bool = True
    same_site: Literal["Strict", "Lax", "None"] = "Strict"
    idle_timeout: Seconds = 1800
    absolute_timeout: Seconds = 43200
    keys: list[SessionKey] = []
    csrf: CSRF = CSRF()

    @model_validator(mode="after")
    def _rules(self) -> SessionConfig:
        if self.store == "redis" and not self.redis_url:
            raise ValueError("store: redis needs session.redis_url")
        if not self.secure and self.same_site == "None":
            raise ValueError("same_site: None needs secure: true (browsers reject it otherwise)")
        ids = [key.id for key in self.keys]
        if len(ids) != len(set(ids)):
            raise ValueError("two keys share an id")
        return self


class PasswordProvider(_Strict):
    type: Literal["password"]
    login_url: str = Field(pattern=r"^https?://")
    refresh_url: str | None = Field(None, pattern=r"^https?://")
    logout_url: str | None = Field(None, pattern=r"^https?://")
    access_token_field: str = "token"  # noqa: S105 - a field name, not a secret
    refresh_token_field: str = "refresh_token"  # noqa: S105
    expires_in_field: str | None = None
    refresh_body: dict[str, Any] = {"refresh_token": "{refresh_token}"}
    refresh_on: list[Annotated[int, Field(ge=400, le=599)]] = [401]
    refresh_skew: float = Field(30, ge=0)
    refresh_grace: float = Field(60, ge=0)
    session_claims: list[str] = ["sub", "name", "email", "preferred_username", "roles", "scope"]


class OAuth2Provider(_Strict):
    type: Literal["oauth2"]
    issuer: str | None = None
    authorize_url: str | None = None
    token_url: str | None = None
    revocation_url: str | None = None
    client_id: str
    client_secret: str | None = Field(None, repr=False)
    scopes: list[str] = ["openid"]
    refresh_on: list[Annotated[int, Field(ge=400, le=599)]] = [401]
    refresh_skew: float = Field(30, ge=0)
    refresh_grace: float = Field(60, ge=0)
    session_claims: list[str] = ["sub", "name", "email", "preferred_username", "roles", "scope"]


Provider = Annotated[PasswordProvider | OAuth2Provider, Field(discriminator="type")]


class RouteTimeouts(_Strict):
    """Per-route overrides: a key that is not set inherits ``server.timeouts``."""

    connect: Seconds | None = None
    read: Seconds | None = None
    total: Seconds | None = None

    def over(self, base: Timeouts) -> Timeouts:
        return base.model_copy(update={k: getattr(self, k) for k in self.model_fields_set})


class UpstreamTLS(_Strict):
    ca_file: Path | None = None
    verify: bool = True


_METHOD_RE = re.compile(r"^[A-Z]+$")


class Route(_Strict):
    path: str = Field(pattern=r"^/")
    upstream: str | None = Field(None, pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$")
    static: Path | None = None
    auth: str = "none"
    methods: list[str] | None = None
    max_body_size: Size | None = None
    timeouts: RouteTimeouts = RouteTimeouts()
    forward_cookies: bool = False
    inject_headers: dict[str, str] = Field({}, repr=False)
    inject_query: dict[str, str] = Field({}, repr=False)
    tls: UpstreamTLS = UpstreamTLS()

    @model_validator(mode="after")
    def _target(self) -> Route:
        if (self.upstream is None) == (self.static is None):
            raise ValueError("a route needs exactly one of upstream or static")
        if self.static is not None and self.auth != "none":
            raise ValueError("static routes are public: auth must be none")
        for name in self.inject_headers:
            if not _TOKEN_RE.match(name):
                raise ValueError(f"inject_headers: {name!r} is not a valid header name")
        for value in self.inject_headers.values():
            if any(ch in value for ch in "\r\n\0"):
                raise ValueError("inject_headers: values cannot contain CR, LF or NUL")
        return self

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        upper = [m.upper() for m in value]
        for method in upper:
            if not _METHOD_RE.match(method):
                raise ValueError(f"{method!r} is not an HTTP method")
        return upper


class Logging(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"
    access_log: bool = True

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class Config(_Strict):
    server: Server = Server()
    session: SessionConfig = SessionConfig()
    providers: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")], Provider] = {}
    routes: list[Route] = []
    logging: Logging = Logging()

    def cross_checks(self) -> list[str]:
        """Rules that span sections; each problem as 'key.path: reason'."""
        problems: list[str] = []
        seen: dict[str, int] = {}
        for index, route in enumerate(self.routes):
            where = f"routes.{index}"
            if route.auth != "none" and route.auth not in self.providers:
                problems.append(f"{where}.auth: no provider named {route.auth!r}")
            key = route.path.rstrip("/") or "/"
            if key in seen:
                problems.append(
                    f"{where}.path: {route.path!r} is also the path of routes.{seen[key]}"
                )
            seen[key] = index
            if route.static is not None and not route.static.is_dir():
                problems.append(f"{where}.static: {str(route.static)!r} is not a directory")
        for name, provider in self.providers.items():
            if isinstance(provider, OAuth2Provider):
                problems.append(
                    f"providers.{name}.type: oauth2 is planned but not available in this version"
                )
        if self.session.store == "memory" and self.server.workers != 1:
            problems.append(
                "session.store: memory keeps sessions in one process; it needs server.workers: 1"
            )
        needs_session = bool(self.providers) or any(r.auth != "none" for r in self.routes)
        if needs_session and not self.session.keys:
            problems.append(
                "session.keys: at least one key is needed when a provider is configured"
            )
        if self.server.tls is not None:
            for field in ("cert_file", "key_file"):
                path = getattr(self.server.tls, field)
                if not path.is_file():
                    problems.append(f"server.tls.{field}: {str(path)!r} does not exist")
        for index, route in enumerate(self.routes):
            ca = route.tls.ca_file
            if ca is not None and not ca.is_file():
                problems.append(f"routes.{index}.tls.ca_file: {str(ca)!r} does not exist")
        return problems


def _interpolate(node: Any, env: Mapping[str, str], path: str, problems: list[str]) -> Any:
    if isinstance(node, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path or '<root>'}: environment variable {name} is not set")
            return ""

        return _ENV_RE.sub(substitute, node)
    if isinstance(node, dict):
        return {
            key: _interpolate(value, env, f"{path}.{key}" if path else str(key), problems)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [
            _interpolate(item, env, f"{path}.{index}" if path else str(index), problems)
            for index, item in enumerate(node)
        ]
    return node


def _format_validation_error(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors(include_url=False, include_input=False):
        # Drop pydantic's union/discriminator tags from the path: users wrote YAML keys.
        loc = [str(p) for p in item["loc"] if p not in ("password", "oauth2", "function-after")]
        where = ".".join(loc) or "<root>"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return problems


def _resolve_static_dirs(raw: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """Relative ``static`` directories are relative to the config file, not the cwd."""
    routes = raw.get("routes")
    if base_dir is None or not isinstance(routes, list):
        return raw
    resolved = []
    for route in routes:
        if isinstance(route, dict) and isinstance(route.get("static"), str):
            route = {**route, "static": str(base_dir / route["static"])}
        resolved.append(route)
    return {**raw, "routes": resolved}


def load_config_text(
    text: str,
    env: Mapping[str, str] | None = None,
    source: str = "<config>",
    base_dir: Path | None = None,
) -> Config:
    """Parse, interpolate and validate; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "?"
        raise ConfigError([f"{source}: {where}: not valid YAML"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: <root>: expected a mapping of sections"])
    problems: list[str] = []
    raw = _interpolate(raw, env, "", problems)
    try:
        config = Config.model_validate(_resolve_static_dirs(raw, base_dir))
    except ValidationError as exc:
        problems.extend(_format_validation_error(exc))
        raise ConfigError([f"{source}: {p}" for p in problems]) from None
    problems.extend(config.cross_checks())
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    return config


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return load_config_text(text, env, str(path), path.resolve().parent)


def default_config_path(explicit: str | None) -> str:
    """``--config``, else ``./config.yaml`` if present, else ``$BFF_CONFIG``."""
    if explicit:
        return explicit
    if Path("config.yaml").is_file() or "BFF_CONFIG" not in os.environ:
        return "config.yaml"
    return os.environ["BFF_CONFIG"]
