"""Configuration: YAML, ``${ENV}`` interpolation, strict pydantic models (SPEC §2).

Every problem is reported with the file, the key path and the reason, and all
of them are collected before giving up, so one ``bff-gateway check`` shows
everything that is wrong.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from gateway.headers import HOP_BY_HOP
from gateway.sessions.seal import decode_key

_T = TypeVar("_T")

_SIZE_UNITS = {"": 1, "B": 1, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]iB|B)?\s*$", re.IGNORECASE)
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token (use fullmatch)
# Control characters other than HTAB cannot appear in a header value (RFC 9110 §5.5).
_HEADER_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Headers the gateway or its HTTP client own: injecting them would break framing or routing.
_NOT_INJECTABLE = HOP_BY_HOP | {"host", "content-length"}


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
    # Edge deadlines and caps (README "Limits and deadlines" says why these defaults).
    header_timeout: Seconds = 10  # the whole request head, from connect or its first byte
    body_timeout: Seconds = 30  # longest silence of a client mid-body
    keepalive_timeout: Seconds = 75  # an idle kept-alive connection (nginx's default)
    max_connections: int = Field(10_000, gt=0)  # open client connections per worker
    max_in_flight: int = Field(4096, gt=0)  # requests being handled per worker (streams count)
    upstream_connections: int = Field(1024, gt=0)  # in use per upstream endpoint, per worker
    upstream_queue_timeout: Seconds = 5  # wait for a free one; then 503 upstream_busy
    max_websockets: int = Field(1024, gt=0)  # WebSocket relays open (or opening) per worker


class Timeouts(_Strict):
    connect: Seconds | None = 5
    read: Seconds | None = 60
    total: Seconds | None = None


class ServerTLS(_Strict):
    cert_file: Path
    key_file: Path


def _parse_network(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value.strip())
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IP network in CIDR form (e.g. 10.0.0.0/8), "
                "with no host bits set"
            ) from None
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    # Not a number either: ipaddress reads `true` or `1` as 0.0.0.1/32, silently.
    raise ValueError("expected an IP network in CIDR form, e.g. 10.0.0.0/8")


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_parse_network)]


class Server(_Strict):
    listen: ListenAddress = Listen(host="127.0.0.1", port=8080)
    admin_listen: ListenAddress | None = Listen(host="127.0.0.1", port=9090)
    workers: int = Field(1, ge=0)
    tls: ServerTLS | None = None
    public_origin: str | None = None
    trusted_proxies: list[Network] = []
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
    redis_url: str | None = Field(None, repr=False)  # may carry a password
    cookie_prefix: str = Field("bff", pattern=r"^[A-Za-z0-9_]{1,32}$")
    secure: bool = True
    same_site: Literal["Strict", "Lax", "None"] = "Strict"
    idle_timeout: Seconds = 1800
    absolute_timeout: Seconds = 43200
    keys: list[SessionKey] = []
    csrf: CSRF = CSRF()
    # Rules that combine fields live in _cross_checks, so that all are reported together.


class PasswordProvider(_Strict):
    type: Literal["password"]
    login_url: str = Field(pattern=r"^https?://")
    refresh_url: str | None = Field(None, pattern=r"^https?://")
    logout_url: str | None = Field(None, pattern=r"^https?://")
    access_token_field: str = "token"  # noqa: S105 - a field name, not a secret
    refresh_token_field: str = "refresh_token"  # noqa: S105
    expires_in_field: str | None = None
    # May carry a client secret.
    refresh_body: dict[str, Any] = Field({"refresh_token": "{refresh_token}"}, repr=False)
    refresh_on: list[Annotated[int, Field(ge=400, le=599)]] = [401]
    refresh_skew: float = Field(30, ge=0)
    refresh_grace: float = Field(60, ge=0)
    session_claims: list[str] = ["sub", "name", "email", "preferred_username", "roles", "scope"]


_URL = r"^https?://[^\s]+$"
# Parameters of the authorization request that the gateway itself sets.
RESERVED_AUTHORIZE_PARAMS = frozenset(
    {
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "nonce",
        "code_challenge",
        "code_challenge_method",
    }
)


class OAuth2Provider(_Strict):
    """An OAuth 2.0 authorization server, OpenID Connect when ``scopes`` has ``openid``."""

    type: Literal["oauth2"]
    issuer: str | None = Field(None, pattern=_URL)  # OIDC discovery; the ID token's iss
    authorize_url: str | None = Field(None, pattern=_URL)  # each URL overrides discovery
    token_url: str | None = Field(None, pattern=_URL)
    jwks_url: str | None = Field(None, pattern=_URL)
    revocation_url: str | None = Field(None, pattern=_URL)
    end_session_url: str | None = Field(None, pattern=_URL)
    client_id: str = Field(min_length=1)
    client_secret: str | None = Field(None, repr=False)
    # Default: client_secret_basic with a secret, none (PKCE only) without.
    client_auth: Literal["client_secret_basic", "client_secret_post", "none"] | None = None
    scopes: list[str] = ["openid"]
    authorize_params: dict[str, str] = {}
    refresh_on: list[Annotated[int, Field(ge=400, le=599)]] = [401]
    refresh_skew: float = Field(30, ge=0)
    refresh_grace: float = Field(60, ge=0)
    session_claims: list[str] = ["sub", "name", "email", "preferred_username", "roles", "scope"]

    @property
    def oidc(self) -> bool:
        return "openid" in self.scopes

    @property
    def auth_method(self) -> str:
        if self.client_auth is not None:
            return self.client_auth
        return "client_secret_basic" if self.client_secret else "none"


def _oauth2_checks(name: str, provider: OAuth2Provider, dropped: frozenset[str]) -> list[str]:
    """Rules across an oauth2 provider's keys; a key in ``dropped`` did not validate
    (already reported), so the rules reading it are skipped."""
    where = f"providers.{name}"
    if any(key.startswith(f"{where}.") for key in dropped):
        return []
    problems = []
    if provider.oidc and provider.issuer is None:
        problems.append(
            f"{where}.issuer: needed with the openid scope (discovery, and the ID token's iss)"
        )
    elif provider.issuer is None:
        missing = [k for k in ("authorize_url", "token_url") if getattr(provider, k) is None]
        problems.extend(f"{where}.{key}: needed when no issuer is set" for key in missing)
    method = provider.auth_method
    if method != "none" and not provider.client_secret:
        problems.append(f"{where}.client_secret: needed when client_auth is {method}")
    if method == "none" and provider.client_secret:
        problems.append(
            f"{where}.client_auth: none sends no secret; remove client_secret or choose "
            "client_secret_basic or client_secret_post"
        )
    problems.extend(
        f"{where}.authorize_params.{key}: set by the gateway itself"
        for key in provider.authorize_params
        if key in RESERVED_AUTHORIZE_PARAMS
    )
    return problems


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


class WebSocketSettings(_Strict):
    """A route's WebSocket relay (README "WebSockets" says why these defaults)."""

    max_message_size: Size = Field(1024**2, gt=0)  # one message, either way (aiohttp buffers it)
    idle_timeout: Seconds = 300  # nothing relayed either way (pings count) for this long: 1001
    session_check_interval: Seconds = 30  # a server-side store is asked if the session lives


_METHOD_RE = re.compile(r"^[A-Z]+$")


def _inject_name(name: str) -> str:
    if not _TOKEN_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid header name")
    if name.lower() in _NOT_INJECTABLE:
        raise ValueError(f"{name} is managed by the gateway and cannot be injected")
    return name


def _inject_value(value: str) -> str:
    # The value is a secret: never echo it.
    if _HEADER_VALUE_BAD.search(value):
        raise ValueError("a header value cannot contain CR, LF, NUL or other control characters")
    return value


InjectName = Annotated[str, AfterValidator(_inject_name)]
InjectValue = Annotated[str, AfterValidator(_inject_value)]


class Route(_Strict):
    path: str = Field(pattern=r"^/")
    upstream: str | None = Field(None, pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$")
    static: Path | None = None
    auth: str = "none"
    methods: list[str] | None = None
    max_body_size: Size | None = None
    timeouts: RouteTimeouts = RouteTimeouts()
    forward_cookies: bool = False
    inject_headers: dict[InjectName, InjectValue] = Field({}, repr=False)
    inject_query: dict[str, str] = Field({}, repr=False)
    tls: UpstreamTLS = UpstreamTLS()
    websocket: WebSocketSettings = WebSocketSettings()
    # "exactly one of upstream or static" and "static is public" are in _cross_checks.

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
        """Rules that span fields or sections; each problem as 'key.path: reason'."""
        return _cross_checks(self.server, self.session, dict(self.providers), list(self.routes))


def _cross_checks(
    server: Server | None,
    session: SessionConfig | None,
    providers: Mapping[str, PasswordProvider | OAuth2Provider | None] | None,
    routes: Sequence[Route | None] | None,
    dropped: frozenset[str] = frozenset(),
) -> list[str]:
    """The rules pydantic cannot express field by field.

    A part that is None did not validate (its own problems are already
    reported): the rules that need it are skipped, the others still run, so a
    typo in one section does not hide a rule broken in another. A provider
    that did not validate still counts as named. ``dropped`` lists the key
    paths left out to make a part valid: rules that would read their defaults
    as the user's choice skip them.
    """
    problems: list[str] = []
    valid_routes = [(index, route) for index, route in enumerate(routes or ()) if route]
    seen: dict[str, int] = {}
    for index, route in valid_routes:
        where = f"routes.{index}"
        chosen = {f"{where}.upstream", f"{where}.static"}
        if not chosen & dropped and (route.upstream is None) == (route.static is None):
            problems.append(f"{where}: a route needs exactly one of upstream or static")
        if route.static is not None and route.auth != "none":
            problems.append(f"{where}.auth: static routes are public: auth must be none")
        elif route.auth != "none" and providers is not None and route.auth not in providers:
            problems.append(f"{where}.auth: no provider named {route.auth!r}")
        key = route.path.rstrip("/") or "/"
        if key in seen:
            problems.append(f"{where}.path: {route.path!r} is also the path of routes.{seen[key]}")
        seen.setdefault(key, index)
        if route.static is not None and not _exists(route.static, Path.is_dir):
            problems.append(f"{where}.static: {str(route.static)!r} is not a directory")
        ca = route.tls.ca_file
        if ca is not None and not _exists(ca, Path.is_file):
            problems.append(f"{where}.tls.ca_file: {str(ca)!r} does not exist")
    for name, provider in (providers or {}).items():
        if isinstance(provider, OAuth2Provider):
            problems.extend(_oauth2_checks(name, provider, dropped))
    if session is not None:
        if (
            session.store == "redis"
            and not session.redis_url
            and "session.redis_url" not in dropped
        ):
            problems.append("session.redis_url: needed when session.store is redis")
        if not session.secure and session.same_site == "None":
            problems.append(
                "session.same_site: None needs secure: true (browsers reject it otherwise)"
            )
        first: dict[str, int] = {}
        for index, session_key in enumerate(session.keys):
            if session_key.id in first:
                problems.append(
                    f"session.keys.{index}.id: {session_key.id!r} is also the id of "
                    f"session.keys.{first[session_key.id]}"
                )
            first.setdefault(session_key.id, index)
        if server is not None and session.store == "memory" and server.workers != 1:
            problems.append(
                "session.store: memory keeps sessions in one process; it needs server.workers: 1"
            )
        needs_session = bool(providers) or any(
            r.auth != "none" and r.static is None for _, r in valid_routes
        )
        if needs_session and not session.keys and "session.keys" not in dropped:
            problems.append(
                "session.keys: at least one key is needed when a provider or a route with "
                "auth is configured"
            )
    if server is not None and server.tls is not None:
        for field in ("cert_file", "key_file"):
            path = getattr(server.tls, field)
            if not _exists(path, Path.is_file):
                problems.append(f"server.tls.{field}: {str(path)!r} does not exist")
    return problems


def _exists(path: Path, test: Callable[[Path], bool]) -> bool:
    """``test(path)``, where a path that cannot be checked at all (a name too long, a
    directory we may not search) counts as missing instead of raising OSError."""
    try:
        return test(path)
    except OSError:
        return False


_PROVIDER_ADAPTER: TypeAdapter[PasswordProvider | OAuth2Provider] = TypeAdapter(Provider)


def _salvage(validate: Callable[[Any], _T], value: Any, where: str, dropped: set[str]) -> _T | None:
    """``validate(value)``; else the same without the keys that have problems; else None.

    Each key left out is added to ``dropped`` as a key path, so that the rules
    which would misread its default can skip it.
    """
    try:
        return validate(value)
    except ValidationError as exc:
        errors = exc.errors()
    if not isinstance(value, dict):
        return None
    tag_at = 0 if where.startswith("providers.") else None
    keys = set()
    for error in errors:
        loc = _yaml_loc(error["loc"], tag_at)
        if loc:
            keys.add(loc[0])
    try:
        part = validate({k: v for k, v in value.items() if k not in keys})
    except ValidationError:
        return None
    dropped.update(f"{where}.{key}" for key in keys)
    return part


def _partial_cross_checks(raw: Mapping[str, Any]) -> list[str]:
    """Cross checks on the parts of an invalid config that can be made valid."""
    dropped: set[str] = set()
    server = _salvage(Server.model_validate, raw.get("server", {}), "server", dropped)
    session = _salvage(SessionConfig.model_validate, raw.get("session", {}), "session", dropped)
    raw_providers = raw.get("providers", {})
    providers = (
        {
            str(name): _salvage(
                _PROVIDER_ADAPTER.validate_python, value, f"providers.{name}", dropped
            )
            for name, value in raw_providers.items()
        }
        if isinstance(raw_providers, dict)
        else None
    )
    raw_routes = raw.get("routes", [])
    routes = (
        [
            _salvage(Route.model_validate, value, f"routes.{index}", dropped)
            for index, value in enumerate(raw_routes)
        ]
        if isinstance(raw_routes, list)
        else None
    )
    return _cross_checks(server, session, providers, routes, frozenset(dropped))


def _interpolate(
    node: Any, env: Mapping[str, str], path: str, missing: dict[str, list[str]]
) -> Any:
    """Replace ``${NAME}`` and ``${NAME:-default}`` in every string.

    As in a POSIX shell, the default also applies when NAME is set but empty.
    Each unset variable is recorded in ``missing`` as {key path: [problem, ...]}.
    """
    if isinstance(node, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = env.get(name)
            if value is not None and (value or default is None):
                return value
            if default is not None:
                return default
            where = path or "<root>"
            missing.setdefault(where, []).append(f"{where}: environment variable {name} is not set")
            return ""

        return _ENV_RE.sub(substitute, node)
    if isinstance(node, dict):
        return {
            key: _interpolate(value, env, f"{path}.{key}" if path else str(key), missing)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [
            _interpolate(item, env, f"{path}.{index}" if path else str(index), missing)
            for index, item in enumerate(node)
        ]
    return node


_PROVIDER_TAGS = ("password", "oauth2")


def _yaml_loc(loc: tuple[int | str, ...], tag_at: int | None) -> list[int | str]:
    """Pydantic's error location as YAML keys.

    Left out: the provider type tag pydantic adds after ``providers.<name>``
    (position ``tag_at``), and its markers ``[key]`` (the key of a mapping is
    wrong) and ``function-...`` (a validator).
    """
    return [
        part
        for index, part in enumerate(loc)
        if not (index == tag_at and part in _PROVIDER_TAGS)
        and part != "[key]"
        and not (isinstance(part, str) and part.startswith("function-"))
    ]


def _format_validation_error(error: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for item in error.errors(include_url=False, include_input=False):
        # Keys are the user's text: escape any that would break the line.
        tag_at = 2 if item["loc"][:1] == ("providers",) else None
        loc = [
            str(p) if str(p).isprintable() else repr(str(p)) for p in _yaml_loc(item["loc"], tag_at)
        ]
        where = ".".join(loc) or "<root>"
        message = item["msg"].removeprefix("Value error, ")
        problems.append((where, message))
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


# Far beyond any real config, small enough to check at once: aliases can make a short
# document expand to billions of values (or contain itself), and what follows walks it.
_MAX_VALUES = 100_000
_MAX_DEPTH = 64


def _shape_problem(raw: Any) -> str | None:
    """Why the loaded document is too big or too deep to validate, or None.

    Walked without recursion, counting every value as often as aliases repeat it,
    and stopping at the first limit crossed.
    """
    stack: list[tuple[Any, int]] = [(raw, 0)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > _MAX_VALUES:
            return f"more than {_MAX_VALUES} values once YAML aliases are expanded"
        if depth > _MAX_DEPTH:
            return f"nested more than {_MAX_DEPTH} levels deep"
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
    return None


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (the last would win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges are allowed to repeat keys
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                break
            if duplicate:
                raise _DuplicateKeyError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config_text(
    text: str,
    env: Mapping[str, str] | None = None,
    source: str = "<config>",
    base_dir: Path | None = None,
) -> Config:
    """Parse, interpolate and validate; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "?"
        # Only our own message is shown: PyYAML's may quote the text, secrets included.
        reason = exc.problem if isinstance(exc, _DuplicateKeyError) else "not valid YAML"
        raise ConfigError([f"{source}: {where}: {reason}"]) from None
    except Exception:
        # PyYAML's constructors let plain exceptions through for some scalars and
        # explicit tags (`2001-13-45`, `!!int x`, `!!bool maybe`), and its composer
        # recurses once per nesting level (RecursionError on `[[[[...`).
        raise ConfigError([f"{source}: ?: not valid YAML"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: <root>: expected a mapping of sections"])
    shape = _shape_problem(raw)
    if shape is not None:
        raise ConfigError([f"{source}: <root>: {shape}"])
    missing: dict[str, list[str]] = {}
    raw = _resolve_static_dirs(_interpolate(raw, env, "", missing), base_dir)
    problems: list[str] = [problem for listed in missing.values() for problem in listed]
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        # A value emptied by an unset variable fails validation too: the unset
        # variable is the problem to report, not its consequence.
        problems.extend(
            f"{where}: {message}"
            for where, message in _format_validation_error(exc)
            if where not in missing
        )
        problems.extend(_partial_cross_checks(raw))
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
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: cannot read: not UTF-8 text"]) from None
    return load_config_text(text, env, str(path), path.resolve().parent)


def default_config_path(explicit: str | None) -> str:
    """``--config``, else ``./config.yaml`` if present, else ``$BFF_CONFIG``."""
    if explicit:
        return explicit
    from_env = os.environ.get("BFF_CONFIG")
    if Path("config.yaml").is_file() or not from_env:
        return "config.yaml"
    return from_env
