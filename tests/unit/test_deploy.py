"""Static checks of the deployment files in deploy/.

Nothing is built or started: the Kubernetes manifests are validated against the
Kubernetes JSON schemas (strict: unknown fields fail), and the compose file,
the Dockerfile and the container configs are checked for the properties that
operators rely on (probes on the admin port, non-root, drain timing, ports
bound to loopback, configs that the gateway accepts).
"""

from __future__ import annotations

import base64
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import load_config_text

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
DOCKER_CONFIG = DEPLOY / "config.docker.yaml"

K8S_VERSION = kubernetes_validate.latest_version()
PUBLIC_PORT = 8080
ADMIN_PORT = 9090
UID = 10001
DEFAULT_SHUTDOWN_TIMEOUT = 25  # SPEC §2 server.shutdown_timeout
CONFIG_PATH = "/etc/bff/config.yaml"

SESSION_KEY = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
CONFIG_ENV = {"BFF_SESSION_KEY": SESSION_KEY, "REDIS_URL": "redis://localhost:6379/0"}


# --------------------------------------------------------------------- helpers


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _manifests() -> Iterator[dict[str, Any]]:
    for path in _manifest_files():
        yield from _load_all(path)


def _one(kind: str) -> dict[str, Any]:
    found = [doc for doc in _manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def _services() -> list[dict[str, Any]]:
    return [doc for doc in _manifests() if doc["kind"] == "Service"]


def _pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = _one("Deployment")["spec"]["template"]["spec"]
    return spec


def _gateway_container() -> dict[str, Any]:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _container_port(port: int | str) -> int:
    """A probe/service port (a number or a port name) as a container port number."""
    if isinstance(port, int):
        return port
    by_name = {p["name"]: p["containerPort"] for p in _gateway_container()["ports"]}
    assert port in by_name, f"port name {port!r} is not declared by the container"
    return int(by_name[port])


def _configmap_config_text() -> str:
    configmap = _one("ConfigMap")
    text: str = configmap["data"]["config.yaml"]
    return text


def _configmap_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(_configmap_config_text())
    return config


def _shutdown_timeout(config: dict[str, Any]) -> float:
    return float(config["server"].get("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT))


def _port_of(hostport: str) -> int:
    return int(hostport.rsplit(":", 1)[1])


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pod_labels() -> dict[str, str]:
    labels: dict[str, str] = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


# ------------------------------------------------- (a) Kubernetes schema checks


def _validate(doc: dict[str, Any], origin: str) -> None:
    """Validate one manifest strictly; fail with a short message (not the schema dump)."""
    where = f"{origin}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        field = ".".join(str(p) for p in exc.path)
        message = f"{where} is invalid for Kubernetes {K8S_VERSION} at {field}: {exc.message}"
    except kubernetes_validate.SchemaNotFoundError as exc:
        message = f"{where}: {exc.message}"
    else:
        return
    pytest.fail(message)


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    docs = _load_all(path)
    assert docs, f"{path.name} holds no manifest"
    for doc in docs:
        _validate(doc, path.name)


def test_strict_validation_rejects_unknown_fields() -> None:
    """Guard for the check above: strict mode must fail on a misspelt field."""
    deployment = _one("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container["livenessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_kustomization_lists_the_manifests_but_not_the_secret_template() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    for name in resources:
        assert (K8S / name).is_file(), f"kustomization.yaml lists missing {name}"
    # `kubectl apply -k` must never overwrite the real key with the placeholder.
    expected = {p.name for p in _manifest_files()} - {"secret.yaml"}
    assert set(resources) == expected
    assert kustomization["namespace"] == _one("Namespace")["metadata"]["name"]


# ---------------------------------------------------------- (b) the Deployment


def test_deployment_probes_use_admin_port_paths() -> None:
    container = _gateway_container()
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _container_port(get["port"]) == ADMIN_PORT, probe
        assert get.get("scheme", "HTTP") == "HTTP", probe


def test_deployment_ports_match_the_config_listeners() -> None:
    ports = {p["name"]: p["containerPort"] for p in _gateway_container()["ports"]}
    assert ports == {"http": PUBLIC_PORT, "admin": ADMIN_PORT}
    server = _configmap_config()["server"]
    assert _port_of(server["listen"]) == PUBLIC_PORT
    assert _port_of(server["admin_listen"]) == ADMIN_PORT
    # Probes come from the kubelet over the pod IP: not loopback-only listeners.
    assert server["admin_listen"].startswith("0.0.0.0:")
    assert server["listen"].startswith("0.0.0.0:")


def test_deployment_runs_non_root_and_locked_down() -> None:
    pod = _pod_spec()
    container = _gateway_container()
    pod_ctx = pod["securityContext"]
    ctx = container["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True
    assert pod_ctx["runAsUser"] == UID
    assert ctx.get("runAsNonRoot", True) is True
    assert ctx.get("runAsUser", UID) == UID
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx.get("privileged", False) is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert not ctx["capabilities"].get("add")
    seccomp = ctx.get("seccompProfile") or pod_ctx.get("seccompProfile")
    assert seccomp == {"type": "RuntimeDefault"}
    assert pod.get("hostNetwork", False) is False
    assert pod.get("automountServiceAccountToken") is False
    # A read-only root needs a writable /tmp (tempfile, prometheus_client).
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_deployment_drains_before_the_kill() -> None:
    pod = _pod_spec()
    container = _gateway_container()
    grace = pod["terminationGracePeriodSeconds"]
    shutdown_timeout = _shutdown_timeout(_configmap_config())
    assert grace > shutdown_timeout

    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep")
    pre_stop = float(command[1])
    assert pre_stop == 5
    # SIGTERM comes only after preStop, and both count against the grace period.
    assert grace > pre_stop + shutdown_timeout


def test_deployment_config_secret_and_resources() -> None:
    deployment = _one("Deployment")
    pod = _pod_spec()
    container = _gateway_container()
    configmap = _one("ConfigMap")
    secret = _one("Secret")

    assert deployment["spec"]["replicas"] == 2
    assert _matches(deployment["spec"]["selector"]["matchLabels"], _pod_labels())

    # config: the ConfigMap mounted at /etc/bff, read by `run --config`
    args = container["args"]
    assert args[:3] == ["run", "--config", CONFIG_PATH]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/bff"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_volume = volumes[mounts["/etc/bff"]["name"]]
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert "config.yaml" in configmap["data"]

    # workers pinned to the CPU limit (workers: 0 would count the node's CPUs)
    limits = container["resources"]["limits"]
    requests = container["resources"]["requests"]
    assert {"cpu", "memory"} <= set(limits)
    assert {"cpu", "memory"} <= set(requests)
    if "--workers" in args:
        assert args[args.index("--workers") + 1] == str(limits["cpu"])

    # the session key comes from the Secret, never from the manifest itself
    env = {e["name"]: e for e in container["env"]}
    key_ref = env["BFF_SESSION_KEY"]["valueFrom"]["secretKeyRef"]
    assert key_ref["name"] == secret["metadata"]["name"]
    assert key_ref["key"] in secret["stringData"]
    assert not key_ref.get("optional", False)
    assert all("value" not in e for e in container["env"])
    for e in container["env"]:
        ref = e["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
    # every ${NAME} without a default in the config is provided
    for name in re.findall(r"\$\{(\w+)\}", _uncommented(_configmap_config_text())):
        assert name in env, f"the config needs {name} but the Deployment does not set it"


def _uncommented(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def test_deployment_spreads_and_is_scraped() -> None:
    pod = _pod_spec()
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ADMIN_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    constraints = pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} >= {"kubernetes.io/hostname"}
    for c in constraints:
        assert _matches(c["labelSelector"]["matchLabels"], _pod_labels())


def test_secret_is_a_placeholder() -> None:
    secret = _one("Secret")
    assert secret["type"] == "Opaque"
    assert secret["stringData"] == {"BFF_SESSION_KEY": "REPLACE_ME_with_bff-gateway_keygen"}
    assert "data" not in secret


# ---------------------------------------------------- Services, HPA, PDB


def test_public_service_exposes_only_the_public_listener() -> None:
    public = [s for s in _services() if s["spec"].get("clusterIP") != "None"]
    assert len(public) == 1
    spec = public[0]["spec"]
    assert spec.get("type", "ClusterIP") == "ClusterIP"
    assert _matches(spec["selector"], _pod_labels())
    assert [(p["port"], _container_port(p["targetPort"])) for p in spec["ports"]] == [
        (80, PUBLIC_PORT)
    ]


def test_admin_port_only_on_a_headless_service() -> None:
    for service in _services():
        spec = service["spec"]
        assert spec.get("type", "ClusterIP") == "ClusterIP"
        assert _matches(spec["selector"], _pod_labels())
        for port in spec["ports"]:
            if _container_port(port["targetPort"]) == ADMIN_PORT:
                assert spec.get("clusterIP") == "None", service["metadata"]["name"]


def test_hpa_and_pdb() -> None:
    deployment = _one("Deployment")
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 10)
    [metric] = spec["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    assert spec["minReplicas"] <= deployment["spec"]["replicas"] <= spec["maxReplicas"]

    pdb = _one("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["minAvailable"] < spec["minReplicas"]
    assert _matches(pdb["spec"]["selector"]["matchLabels"], _pod_labels())


# ------------------------------------------------------------- (c) compose


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return compose


def _published(port: str | dict[str, Any]) -> tuple[str, int]:
    """(host ip, container port) of a compose `ports` entry."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), int(port["target"])
    parts = str(port).split(":")
    host_ip = parts[0] if len(parts) == 3 else ""
    return host_ip, int(parts[-1].split("/")[0])


def _duration(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        total += float(number) * units[unit]
    return total


def test_compose_services() -> None:
    services = _compose()["services"]
    assert set(services) == {"gateway", "redis", "demo-api"}

    gateway = services["gateway"]
    build = gateway["build"]
    assert build["context"] == ".."
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE

    assert services["redis"]["image"] == "redis:7-alpine"

    demo = services["demo-api"]
    assert demo["image"] == gateway["image"]
    assert demo["entrypoint"] == [
        "python",
        "-m",
        "gateway.demo.api",
        "--host",
        "0.0.0.0",
        "--port",
        "8081",
    ]
    assert "ports" not in demo
    assert "ports" not in services["redis"]

    env = gateway["environment"]
    assert env["BFF_SESSION_KEY"] == "${BFF_SESSION_KEY:?set it with bff-gateway keygen}"

    [volume] = gateway["volumes"]
    assert volume["target"] == CONFIG_PATH
    assert volume["read_only"] is True
    assert (COMPOSE.parent / volume["source"]).resolve() == DOCKER_CONFIG

    stop = _duration(gateway["stop_grace_period"])
    assert stop > _shutdown_timeout(yaml.safe_load(DOCKER_CONFIG.read_text()))


def test_compose_healthchecks_and_dependencies() -> None:
    services = _compose()["services"]
    redis_test = services["redis"]["healthcheck"]["test"]
    assert redis_test[0] == "CMD"
    assert redis_test[1:] == ["redis-cli", "ping"]
    demo_test = services["demo-api"]["healthcheck"]["test"]
    assert demo_test[0] == "CMD"
    assert "8081" in " ".join(demo_test)

    depends = services["gateway"]["depends_on"]
    assert set(depends) == {"redis", "demo-api"}
    for name, dep in depends.items():
        assert dep["condition"] == "service_healthy", name
        assert "healthcheck" in services[name], name
    # the gateway's own health check is the image's HEALTHCHECK
    assert "healthcheck" not in services["gateway"] or not services["gateway"]["healthcheck"].get(
        "disable"
    )


def test_compose_publishes_on_loopback_only() -> None:
    services = _compose()["services"]
    published: list[int] = []
    for name, service in services.items():
        for port in service.get("ports", []):
            host_ip, target = _published(port)
            assert host_ip == "127.0.0.1", f"{name} publishes {port!r} beyond loopback"
            published.append(target)
    assert sorted(published) == [PUBLIC_PORT, ADMIN_PORT]


# ------------------------------------------------------------ (d) Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation line"
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_dockerfile_is_multi_stage_on_python_slim() -> None:
    instructions = _dockerfile()
    build_args = {}
    for keyword, args in instructions:
        if keyword == "ARG" and "=" in args:
            name, _, default = args.partition("=")
            build_args[name] = default
    images = []
    for keyword, args in instructions:
        if keyword == "FROM":
            image = args.split()[0]
            image = re.sub(r"\$\{(\w+)\}", lambda m: build_args[m.group(1)], image)
            images.append(image)
    assert len(images) >= 2
    assert all(image.split("@")[0] == "python:3.11-slim" for image in images)

    final = _final_stage()
    runs = " ".join(args for keyword, args in final if keyword == "RUN")
    assert "--no-index" in runs, "the runtime stage installs the built wheels only"
    copies = [args for keyword, args in final if keyword == "COPY"]
    assert not any(re.search(r"(^|\s)gateway/?(\s|$)", c) for c in copies), "no sources"


def test_dockerfile_copy_sources_exist() -> None:
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    copied: set[str] = set()
    for keyword, args in _dockerfile():
        if keyword != "COPY" or "--from" in args:
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        copied.update(sources)
    # The wheel build needs pyproject's readme; it may be written by then.
    if isinstance(readme, str):
        assert readme in copied
    for source in copied - {readme}:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_dockerfile_runtime_contract() -> None:
    final = _final_stage()

    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "the runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user == str(UID)  # numeric, so Kubernetes can check runAsNonRoot

    healthchecks = [args for keyword, args in final if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    options, _, command = healthchecks[0].partition("CMD ")
    assert "NONE" not in options
    check = _exec_form(command)
    assert check[:2] == ["python", "-c"]
    assert f"http://127.0.0.1:{ADMIN_PORT}/healthz" in check[2]
    assert "urllib" in check[2]
    compile(check[2], "HEALTHCHECK", "exec")

    def last(keyword: str) -> str:
        values = [args for k, args in final if k == keyword]
        assert values, f"no {keyword} in the runtime stage"
        return values[-1]

    assert _exec_form(last("ENTRYPOINT")) == ["bff-gateway"]
    assert _exec_form(last("CMD")) == ["run", "--config", CONFIG_PATH]
    assert last("STOPSIGNAL") == "SIGTERM"
    exposed = {p for args in (a for k, a in final if k == "EXPOSE") for p in args.split()}
    assert exposed == {str(PUBLIC_PORT), str(ADMIN_PORT)}
    env = " ".join(args for keyword, args in final if keyword == "ENV")
    assert re.search(r"\bPYTHONDONTWRITEBYTECODE=1\b", env)
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)


def test_image_user_matches_the_pod_user() -> None:
    users = [args for keyword, args in _final_stage() if keyword == "USER"]
    uid, _, gid = users[-1].partition(":")
    pod_ctx = _pod_spec()["securityContext"]
    assert int(uid) == pod_ctx["runAsUser"]
    if gid:
        assert int(gid) == pod_ctx.get("runAsGroup", int(gid))


# ------------------------------------------------- (e) the configs load


def _config_texts() -> list[Any]:
    return [
        pytest.param(_configmap_config_text(), "deploy/k8s/configmap.yaml", id="configmap"),
        pytest.param(DOCKER_CONFIG.read_text(), "deploy/config.docker.yaml", id="docker"),
    ]


def test_configmap_and_docker_config_agree() -> None:
    assert _configmap_config() == yaml.safe_load(DOCKER_CONFIG.read_text())


@pytest.mark.parametrize(("text", "source"), _config_texts())
def test_config_loads(text: str, source: str) -> None:
    config = load_config_text(text, CONFIG_ENV, source)
    # attribute names follow the YAML keys of SPEC §2
    assert config.session.redis_url == CONFIG_ENV["REDIS_URL"]
    assert config.server.shutdown_timeout == DEFAULT_SHUTDOWN_TIMEOUT
    assert config.server.workers == 0


@pytest.mark.parametrize(("text", "source"), _config_texts())
def test_config_needs_the_session_key(text: str, source: str) -> None:
    env = {k: v for k, v in CONFIG_ENV.items() if k != "BFF_SESSION_KEY"}
    with pytest.raises(Exception, match="BFF_SESSION_KEY"):
        load_config_text(text, env, source)
