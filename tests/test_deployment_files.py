"""The deployment files (container/) and the operator's guide (docs/operations.md), checked
without Docker or a cluster: they parse, they use only real settings with valid values, their
ports, probe paths, metric names and grace periods agree with the server, and the Hypercorn
config file really serves the app and shuts it down gracefully.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio
import yaml
from hypercorn.config import Config as HypercornConfig

from ccwrap_trio.config import SETTINGS, Config

from .conftest import ROOT, running_server

CONTAINER = ROOT / "container"
DOCKERFILE = CONTAINER / "Dockerfile"
COMPOSE = CONTAINER / "compose.yaml"
HYPERCORN_TOML = CONTAINER / "hypercorn.toml"
RULES = CONTAINER / "prometheus-rules.yaml"
K8S = CONTAINER / "k8s"
OPERATIONS = ROOT / "docs" / "operations.md"
SCALE_OUT, ADAPTER = "deployment-scale-out.yaml", "prometheus-adapter.yaml"

SETTING = {setting.env: setting for setting in SETTINGS}
DEFAULT_PORT = int(SETTING["CCWRAP_PORT"].default)
DEFAULT_QUERY_TIMEOUT_S = float(SETTING["CCWRAP_QUERY_TIMEOUT"].default)
CLAUDE_CODE_PACKAGE = "@anthropic-ai/claude-code"
LIVE, READY = "/health/live", "/health/ready"
# Measured (docs/operations.md, "Sizing"): the server's RSS and one CLI session's, in MiB.
SERVER_MIB, CLI_SESSION_MIB = 90, 220

# Values the container files set on purpose to something other than the default (each is
# explained by a comment in the file).
CONTAINER_OVERRIDES = {
    "CCWRAP_HOST": "0.0.0.0",  # reachable through the published port / the pod IP
    "CCWRAP_CLAUDE_BIN": "/usr/local/bin/claude",  # where the image puts the CLI
    "CCWRAP_SHUTDOWN_GRACE": None,  # above the query timeout (checked below)
    "CCWRAP_CLI_RSS_LIMIT_MB": None,  # well below the memory limit (checked below)
}
K8S_OVERRIDES = {**CONTAINER_OVERRIDES, "CCWRAP_LOG_FORMAT": "json"}


# ---------------------------------------------------------------------------------------------
# Reading the files


def container_files() -> list[Path]:
    return sorted(path for path in CONTAINER.rglob("*") if path.is_file())


def yaml_files() -> list[Path]:
    return sorted(CONTAINER.rglob("*.yaml"))


def load_yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_object(kind: str, filename: str = "deployment.yaml") -> dict[str, Any]:
    found = [doc for doc in load_yaml_documents(K8S / filename) if doc.get("kind") == kind]
    assert len(found) == 1, f"one {kind} in {filename}"
    obj: dict[str, Any] = found[0]
    return obj


def k8s_container() -> dict[str, Any]:
    containers = k8s_object("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def k8s_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in k8s_container()["env"] if "value" in e}


def compose_service() -> dict[str, Any]:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert list(services) == ["ccwrap-trio"]
    service: dict[str, Any] = services["ccwrap-trio"]
    return service


_INTERPOLATION = re.compile(r"\$\{(\w+)(?::-([^}]*)|:\?[^}]*)?\}")


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set in the environment: the default."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def compose_env() -> dict[str, str]:
    return {k: interpolate(str(v)) for k, v in compose_service()["environment"].items()}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        command, _, arguments = (pending + line).partition(" ")
        instructions.append((command.upper(), arguments.strip()))
        pending = ""
    return instructions


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in dockerfile_instructions(DOCKERFILE.read_text()):
        if instruction[0] == "FROM":
            stages.append([])
        assert stages, "the Dockerfile starts with FROM"
        stages[-1].append(instruction)
    return stages


def dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for command, arguments in stage:
        if command == "ENV":
            for word in shlex.split(arguments):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def seconds(duration: str) -> float:
    """A compose duration ("340s", "5m30s") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    return sum(float(number) * scale[unit] for number, unit in parts)


def mebibytes(quantity: str, *, docker: bool = False) -> float:
    """A memory quantity in MiB: Kubernetes ("640Mi", "1Gi", "700M") or Docker ("1280M")."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGkmg]i?)?[Bb]?", quantity)
    assert match, quantity
    number, unit = float(match.group(1)), match.group(2) or ""
    if docker or unit.endswith("i"):  # binary: Docker's k/m/g, Kubernetes' Ki/Mi/Gi
        return number * {"k": 2**-10, "m": 1, "g": 2**10, "": 2**-20}[unit[:1].lower()]
    return number * {"k": 1e3, "m": 1e6, "g": 1e9, "": 1}[unit.lower()] / 2**20


def parsed(name: str, value: str) -> Any:
    return SETTING[name].parser[0](value)


def effective(env: dict[str, str], name: str) -> Any:
    return parsed(name, env.get(name, SETTING[name].default))


# ---------------------------------------------------------------------------------------------
# Every file parses


def test_the_expected_files_exist() -> None:
    for path in (DOCKERFILE, CONTAINER / "Dockerfile.dockerignore", COMPOSE, HYPERCORN_TOML,
                 RULES, K8S / "deployment.yaml", K8S / "service.yaml", K8S / "README.md",
                 K8S / SCALE_OUT, K8S / ADAPTER, OPERATIONS):
        assert path.is_file(), path


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_parses(path: Path) -> None:
    documents = load_yaml_documents(path)
    assert documents and all(isinstance(doc, dict) for doc in documents)


def test_hypercorn_toml_is_accepted_by_hypercorn() -> None:
    data = tomllib.loads(HYPERCORN_TOML.read_text())
    # from_toml sets any key it is given, known or not: check the names against Hypercorn's.
    unknown = [key for key in data if not hasattr(HypercornConfig, key)]
    assert not unknown, f"not Hypercorn settings: {unknown}"
    config = HypercornConfig.from_toml(HYPERCORN_TOML)
    assert config.worker_class == "trio"
    assert config.workers == 1, "one worker per server: see the comment in the file"
    assert config.bind == [f"127.0.0.1:{DEFAULT_PORT}"]
    assert config.graceful_timeout > DEFAULT_QUERY_TIMEOUT_S
    assert config.keep_alive_timeout > 60  # above a proxy's idle timeout
    assert config.accesslog is None
    assert config.certfile is None and config.keyfile is None  # TLS settings are commented
    assert "# certfile = " in HYPERCORN_TOML.read_text()
    assert "# keyfile = " in HYPERCORN_TOML.read_text()
    # Hypercorn's lines go through the app's handler only (see test_hypercorn_serves_...).
    logger = config.logconfig_dict["loggers"]["hypercorn.error"]
    assert logger == {"handlers": [], "propagate": True}
    assert config.logconfig_dict["disable_existing_loggers"] is False


# ---------------------------------------------------------------------------------------------
# Settings: only real ones, with valid values, defaults unless deliberately changed

_CCWRAP_NAME = re.compile(r"\bCCWRAP_[A-Z0-9_]*[A-Z0-9]\b")


def test_every_ccwrap_variable_named_is_a_setting() -> None:
    for path in [*container_files(), OPERATIONS]:
        names = set(_CCWRAP_NAME.findall(path.read_text()))
        unknown = names - SETTING.keys()
        assert not unknown, f"{path.relative_to(ROOT)} names unknown settings: {unknown}"


@pytest.mark.parametrize(
    ("where", "overrides"),
    [("compose", CONTAINER_OVERRIDES), ("k8s", K8S_OVERRIDES)],
)
def test_container_environments_are_valid_and_are_the_defaults(
    where: str, overrides: dict[str, str | None]
) -> None:
    env = compose_env() if where == "compose" else k8s_env()
    Config.load(env)  # every value is accepted (ConfigError otherwise)
    assert "CCWRAP_QUERY_TIMEOUT" in env and "CCWRAP_SESSIONS" in env
    for name, value in env.items():
        if not name.startswith("CCWRAP_"):
            continue
        if name in overrides:
            expected = overrides[name]
            if expected is not None:
                assert value == expected, name
            continue
        assert parsed(name, value) == parsed(name, SETTING[name].default), (
            f"{where}: {name}={value!r} is not the default {SETTING[name].default!r}; "
            "change the default or list the override in this test with its reason"
        )


def test_no_secret_is_baked_into_the_image() -> None:
    for stage in dockerfile_stages():
        for command, arguments in stage:
            if command in ("ENV", "ARG"):
                assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD|ANTHROPIC_", arguments), arguments
    k8s_secrets = [e for e in k8s_container()["env"] if "valueFrom" in e]
    assert all("secretKeyRef" in e["valueFrom"] for e in k8s_secrets)
    assert not [e for e in k8s_container()["env"] if "KEY" in e["name"] and "value" in e and
                e["name"] != "CCWRAP_FORWARD_API_KEY"]
    assert compose_env()["CCWRAP_API_KEYS"] == ""  # from the operator's environment, not here


# ---------------------------------------------------------------------------------------------
# The Dockerfile


def test_dockerfile_pins_the_cli_and_matches_the_makefile() -> None:
    text = DOCKERFILE.read_text()
    pins = set(re.findall(re.escape(CLAUDE_CODE_PACKAGE) + r"@([0-9][\w.\-]*)", text))
    makefile = (ROOT / "Makefile").read_text()
    version = re.search(r"^CLAUDE_CODE_VERSION\s*:?=\s*(\S+)", makefile, re.M)
    assert version is not None
    assert pins == {version.group(1)} == {"2.1.332"}
    assert f"{CLAUDE_CODE_PACKAGE}@2.1.332" in text


def test_dockerfile_final_stage() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "npm runs in a build stage"
    final = stages[-1]
    base = final[0][1].split()[0]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
    final_text = " ".join(arguments for _, arguments in final)
    assert not re.search(r"\b(npm|nodejs|node:)", final_text), "no Node in the final image"
    users = [arguments for command, arguments in final if command == "USER"]
    assert users, "the final stage sets a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "numeric non-root (runAsNonRoot)"
    env = dockerfile_env(final)
    assert env["CCWRAP_HOST"] == "0.0.0.0"
    assert env.get("CCWRAP_PORT", SETTING["CCWRAP_PORT"].default) == str(DEFAULT_PORT)
    assert env["CCWRAP_CLAUDE_BIN"] == CONTAINER_OVERRIDES["CCWRAP_CLAUDE_BIN"]
    assert env["HOME"] == "/home/app"
    Config.load({k: v for k, v in env.items() if k.startswith("CCWRAP_")})
    exposed = [arguments for command, arguments in final if command == "EXPOSE"]
    assert exposed == [str(DEFAULT_PORT)]
    cmd = [arguments for command, arguments in final if command == "CMD"]
    assert [json.loads(c) for c in cmd] == [["ccwrap-trio", "serve"]]
    # The CLI binary comes from the npm stage; the runtime has no compiler or npm.
    copies = [arguments for command, arguments in final if command == "COPY"]
    assert any("--from=" in c and "/usr/local/bin/claude" in c for c in copies)


def test_dockerfile_healthcheck_uses_python_urllib_on_live() -> None:
    final = dockerfile_stages()[-1]
    checks = [arguments for command, arguments in final if command == "HEALTHCHECK"]
    assert len(checks) == 1
    exec_form = json.loads(checks[0].split(" CMD ", 1)[1])
    assert exec_form[:2] == ["python", "-c"]
    assert "urllib.request" in exec_form[2] and LIVE in exec_form[2]
    assert "curl" not in checks[0] and "wget" not in checks[0]


def test_dockerfile_copies_only_what_exists_and_the_context_lets_in() -> None:
    allowed = [
        line[1:] for line in (CONTAINER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for stage in dockerfile_stages():
        for command, arguments in stage:
            words = arguments.split()
            if command != "COPY" or any(w.startswith("--from=") for w in words):
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), source
                assert any(source == a or source.startswith(a.rstrip("/") + "/")
                           for a in allowed), f"{source} is excluded from the build context"


# ---------------------------------------------------------------------------------------------
# Ports and probe paths agree with the app


def test_ports_are_the_default_port() -> None:
    assert compose_env()["CCWRAP_PORT"] == str(DEFAULT_PORT)
    ports = compose_service()["ports"]
    assert ports == [f"127.0.0.1:{DEFAULT_PORT}:{DEFAULT_PORT}"]  # loopback: see the file
    container = k8s_container()
    assert k8s_env()["CCWRAP_PORT"] == str(DEFAULT_PORT)
    assert container["ports"] == [{"name": "http", "containerPort": DEFAULT_PORT,
                                   "protocol": "TCP"}]
    service = k8s_object("Service", "service.yaml")
    assert service["spec"]["ports"] == [{"name": "http", "port": DEFAULT_PORT,
                                         "targetPort": "http", "protocol": "TCP"}]
    pod = k8s_object("Deployment")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(DEFAULT_PORT)
    monitor = k8s_object("ServiceMonitor", "servicemonitor.yaml")
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()


def probe_paths() -> dict[str, str]:
    """Every HTTP path a deployment file makes something request, by who requests it."""
    container = k8s_container()
    paths = {
        f"k8s {probe}": container[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
    pod = k8s_object("Deployment")["spec"]["template"]
    paths["k8s scrape annotation"] = pod["metadata"]["annotations"]["prometheus.io/path"]
    monitor = k8s_object("ServiceMonitor", "servicemonitor.yaml")
    paths["ServiceMonitor"] = monitor["spec"]["endpoints"][0]["path"]
    compose_test = " ".join(compose_service()["healthcheck"]["test"])
    paths["compose healthcheck"] = re.findall(r"http://127\.0\.0\.1:\d+(/[\w/]+)", compose_test)[0]
    assert f"127.0.0.1:{DEFAULT_PORT}/" in compose_test
    healthcheck = next(a for c, a in dockerfile_stages()[-1] if c == "HEALTHCHECK")
    paths["Dockerfile HEALTHCHECK"] = re.findall(r"(/health/\w+)", healthcheck)[0]
    return paths


def test_probes_use_live_for_liveness_and_ready_for_readiness() -> None:
    paths = probe_paths()
    assert paths["k8s livenessProbe"] == LIVE
    assert paths["k8s startupProbe"] == LIVE
    assert paths["k8s readinessProbe"] == READY
    assert paths["compose healthcheck"] == LIVE
    assert paths["Dockerfile HEALTHCHECK"] == LIVE
    assert paths["k8s scrape annotation"] == paths["ServiceMonitor"] == "/metrics"
    container = k8s_container()
    startup, liveness = container["startupProbe"], container["livenessProbe"]
    # A slow first start must not be killed; a short hiccup must not kill a running server.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30
    assert liveness["timeoutSeconds"] >= 2
    assert container["readinessProbe"]["periodSeconds"] <= 10


# The routes docs/operations.md says stay open without an API key.
OPEN_ROUTES = ("/health", LIVE, READY, "/metrics", "/status", "/status/history")


async def test_every_probe_path_is_served_without_a_key(make_config: Any) -> None:
    paths = set(probe_paths().values()) | set(OPEN_ROUTES)
    guide = OPERATIONS.read_text()
    assert all(f"`{route}`" in guide for route in OPEN_ROUTES)
    config = make_config(api_keys=("a-client-key-0001",))
    async with running_server(config) as url, httpx.AsyncClient(base_url=url) as client:
        for path in sorted(paths):
            response = await client.get(path)
            assert response.status_code in (200, 503), (path, response.status_code)
        for _ in range(200):  # ready once the first session is up
            if (await client.get(READY)).status_code == 200:
                break
            await trio.sleep(0.05)
        assert (await client.get(READY)).status_code == 200
        assert (await client.get(LIVE)).json() == {"status": "alive"}
        # Other paths need the key (so 200/503 above means open), and a path the app does not
        # serve is a 404, never a 200/503: the check above would notice a typo.
        assert (await client.get("/health/alive")).status_code == 401
        key = {"Authorization": "Bearer a-client-key-0001"}
        assert (await client.get("/health/alive", headers=key)).status_code == 404


# ---------------------------------------------------------------------------------------------
# Grace periods: nobody is killed while a request may still be running


def test_grace_periods_exceed_the_query_timeout() -> None:
    env = compose_env()
    query_timeout = effective(env, "CCWRAP_QUERY_TIMEOUT")
    shutdown_grace = effective(env, "CCWRAP_SHUTDOWN_GRACE")
    stop_grace = seconds(compose_service()["stop_grace_period"])
    assert stop_grace > shutdown_grace > query_timeout >= DEFAULT_QUERY_TIMEOUT_S
    assert stop_grace > DEFAULT_QUERY_TIMEOUT_S

    env = k8s_env()
    query_timeout = effective(env, "CCWRAP_QUERY_TIMEOUT")
    shutdown_grace = effective(env, "CCWRAP_SHUTDOWN_GRACE")
    pod = k8s_object("Deployment")["spec"]["template"]["spec"]
    termination_grace = pod["terminationGracePeriodSeconds"]
    pre_stop = k8s_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # preStop, then the in-flight requests, then a few seconds to end the CLI.
    assert termination_grace >= int(pre_stop[1]) + shutdown_grace + 5
    assert shutdown_grace > query_timeout >= DEFAULT_QUERY_TIMEOUT_S

    graceful = HypercornConfig.from_toml(HYPERCORN_TOML).graceful_timeout
    assert graceful > DEFAULT_QUERY_TIMEOUT_S
    # The files also offer the Hypercorn command: its grace must fit in theirs too.
    assert graceful + 5 <= stop_grace
    assert int(pre_stop[1]) + graceful + 5 <= termination_grace


# ---------------------------------------------------------------------------------------------
# Kubernetes specifics


def test_k8s_pod_is_non_root_and_read_only_with_writable_volumes() -> None:
    pod = k8s_object("Deployment")["spec"]["template"]["spec"]
    container = k8s_container()
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    user = [a for c, a in dockerfile_stages()[-1] if c == "USER"][-1].split(":")[0]
    assert str(security["runAsUser"]) == user
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["enableServiceLinks"] is False  # no CCWRAP_* variables injected by Services
    if container["securityContext"].get("readOnlyRootFilesystem"):
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        home = dockerfile_env(dockerfile_stages()[-1])["HOME"]
        assert home in mounts and "/tmp" in mounts, "the CLI writes HOME and /tmp"
        volumes = {v["name"]: v for v in pod["volumes"]}
        for path in (home, "/tmp"):
            volume = volumes[mounts[path]]
            assert "emptyDir" in volume or "persistentVolumeClaim" in volume, path
            assert not volume.get("readOnly")


def test_k8s_login_volume_is_used_by_one_pod_at_a_time() -> None:
    deployment = k8s_object("Deployment")
    claims = [v for v in deployment["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    if claims:
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        pvc = k8s_object("PersistentVolumeClaim")
        assert pvc["metadata"]["name"] == claims[0]["persistentVolumeClaim"]["claimName"]
        assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_memory_is_sized_for_the_sessions(where: str) -> None:
    if where == "compose":
        env = compose_env()
        resources = compose_service()["deploy"]["resources"]
        request, limit = resources["reservations"]["memory"], resources["limits"]["memory"]
    else:
        env = k8s_env()
        resources = k8s_container()["resources"]
        request, limit = resources["requests"]["memory"], resources["limits"]["memory"]
    sessions = effective(env, "CCWRAP_SESSIONS")
    standby = int(effective(env, "CCWRAP_STANDBY"))
    cli_limit = effective(env, "CCWRAP_CLI_RSS_LIMIT_MB")
    steady = SERVER_MIB + (sessions + standby) * CLI_SESSION_MIB
    # Worst case: every session at its recycle limit, the standby, and one CLI being warmed.
    worst = SERVER_MIB + sessions * cli_limit + (standby + 1) * CLI_SESSION_MIB
    docker = where == "compose"
    assert mebibytes(str(request), docker=docker) >= steady
    assert mebibytes(str(limit), docker=docker) >= worst
    assert cli_limit < mebibytes(str(limit), docker=docker) / 2


# ---------------------------------------------------------------------------------------------
# Scaling out: deployment-scale-out.yaml (HPA, PDB) and the prometheus-adapter rule

QUEUE_METRIC = "ccwrap_queue_depth"
TOKEN_SECRET = {"name": "ccwrap-trio-claude-token", "key": "token"}


def adapter_rules() -> list[dict[str, Any]]:
    config_map = k8s_object("ConfigMap", ADAPTER)
    found: list[dict[str, Any]] = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    return found


def test_scale_out_pod_is_deployment_yaml_but_for_the_login() -> None:
    """One pod template in two files: only the login (a token, no volume) may differ."""
    single = k8s_object("Deployment")["spec"]["template"]
    scaled = k8s_object("Deployment", SCALE_OUT)["spec"]["template"]
    env = {e["name"]: e for e in scaled["spec"]["containers"][0]["env"]}
    assert env["CCWRAP_FORWARD_API_KEY"]["value"] == "1"  # else the CLI never sees the token
    # From a Secret, and required: a pod without it would start "Not logged in".
    assert env["CLAUDE_CODE_OAUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": TOKEN_SECRET}
    volumes = {v["name"]: v for v in scaled["spec"]["volumes"]}
    assert "emptyDir" in volumes["home"], "no login volume: every replica is stateless"

    def without_login(template: dict[str, Any]) -> dict[str, Any]:
        template = json.loads(json.dumps(template))
        spec = template["spec"]
        for key in ("fsGroup", "fsGroupChangePolicy"):  # only the login volume needs them
            spec["securityContext"].pop(key, None)
        spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "home"]
        container = spec["containers"][0]
        container["env"] = [e for e in container["env"] if e["name"] not in (
            "CCWRAP_FORWARD_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN")]
        return template

    assert without_login(scaled) == without_login(single)


def test_scale_out_rolls_one_pod_at_a_time_without_losing_capacity() -> None:
    spec = k8s_object("Deployment", SCALE_OUT)["spec"]
    assert spec["strategy"] == {"type": "RollingUpdate",
                                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"][
        "labels"].items()
    assert spec["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == READY
    assert not any("persistentVolumeClaim" in v for v in spec["template"]["spec"]["volumes"])


def test_hpa_scales_the_deployment_on_queue_depth_with_cpu_as_fallback() -> None:
    deployment = k8s_object("Deployment", SCALE_OUT)
    hpa = k8s_object("HorizontalPodAutoscaler", SCALE_OUT)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": deployment["apiVersion"],
                                             "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["metadata"].get("namespace") == deployment["metadata"].get("namespace")
    low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert 2 <= low <= deployment["spec"]["replicas"] <= high  # 2: a drain keeps one serving
    pods, cpu = hpa["spec"]["metrics"]
    assert pods["type"] == "Pods" and pods["pods"]["metric"]["name"] == QUEUE_METRIC
    assert pods["pods"]["target"]["type"] == "AverageValue"
    assert cpu == {"type": "Resource", "resource": {"name": "cpu", "target": {
        "type": "Utilization", "averageUtilization": cpu["resource"]["target"][
            "averageUtilization"]}}}
    # Utilization is measured against the request: without one the HPA cannot use CPU.
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["cpu"]
    # Scale-down waits longer than a pod may take to drain its requests.
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    down = hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
    assert down >= effective(env, "CCWRAP_QUERY_TIMEOUT")


def test_adapter_rule_serves_the_metric_the_hpa_reads() -> None:
    hpa = k8s_object("HorizontalPodAutoscaler", SCALE_OUT)
    wanted = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    (rule,) = adapter_rules()
    assert rule["name"]["as"] == wanted
    assert re.fullmatch(rule["name"]["matches"], QUEUE_METRIC)
    assert rule["seriesQuery"].startswith(QUEUE_METRIC + "{")
    # Per pod: the HPA's Pods metric is looked up by namespace and pod name.
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                              "pod": {"resource": "pod"}}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_pdb_covers_the_scaled_pods_and_leaves_one_serving() -> None:
    deployment = k8s_object("Deployment", SCALE_OUT)
    pdb = k8s_object("PodDisruptionBudget", SCALE_OUT)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    hpa = k8s_object("HorizontalPodAutoscaler", SCALE_OUT)
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    assert "minAvailable" not in pdb["spec"]


@pytest.mark.parametrize("filename", ["deployment.yaml", SCALE_OUT])
def test_termination_grace_covers_prestop_and_the_shutdown_grace(filename: str) -> None:
    pod = k8s_object("Deployment", filename)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    shutdown_grace = effective(env, "CCWRAP_SHUTDOWN_GRACE")
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    # The endpoint removal needs a few seconds to reach every proxy; more only delays a stop.
    assert 3 <= pre_stop <= 15
    # preStop runs inside terminationGracePeriodSeconds: then SIGTERM, the drain, ending the CLI.
    assert pod["terminationGracePeriodSeconds"] > pre_stop + shutdown_grace
    assert shutdown_grace > effective(env, "CCWRAP_QUERY_TIMEOUT")


def test_adapter_query_gives_each_pods_average_queue(promtool: str, tmp_path: Path) -> None:
    """The adapter's metricsQuery, filled in as the adapter does, evaluated by Prometheus."""
    (rule,) = adapter_rules()
    pods = ("ccwrap-trio-a", "ccwrap-trio-b")
    query = (rule["metricsQuery"].replace("<<.Series>>", QUEUE_METRIC)
             .replace("<<.LabelMatchers>>", f'namespace="default",pod=~"{"|".join(pods)}"')
             .replace("<<.GroupBy>>", "pod"))
    record = "adapter:ccwrap_queue_depth"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [
        {"name": "adapter", "rules": [{"record": record, "expr": query}]}]}))
    series = 'ccwrap_queue_depth{namespace="default",pod="%s",job="ccwrap-trio"}'
    samples = [{"labels": f'{record}{{pod="{pod}"}}', "value": value}
               for pod, value in zip(pods, (3, 0), strict=True)]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yaml"], "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": series % pods[0], "values": "3x10"},
                             {"series": series % pods[1], "values": "0x10"},
                             {"series": series % "other-pod", "values": "9x10"}],
            "promql_expr_test": [{"expr": record, "eval_time": "5m", "exp_samples": samples}],
        }],
    }))
    result = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Prometheus rules and the metrics the server really serves


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def rules() -> Iterator[dict[str, Any]]:
    for group in rule_groups():
        yield from group["rules"]


def test_prometheusrule_carries_the_same_groups() -> None:
    crd = k8s_object("PrometheusRule", "prometheusrule.yaml")
    assert crd["apiVersion"] == "monitoring.coreos.com/v1"
    assert crd["spec"]["groups"] == rule_groups()


def test_rules_cover_what_the_quick_reference_asked_for() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in rules()}
    assert all(rule["labels"]["severity"] in ("critical", "warning", "info") for rule in rules())
    assert len(exprs) == len(list(rules())), "alert names are unique"
    joined = "\n".join(exprs.values())
    for needed in (
        "ccwrap_server_resident_memory_bytes > 500 * 1024 * 1024",
        "ccwrap_cli_resident_memory_bytes > 500 * 1024 * 1024",
        'ccwrap_requests_total{outcome="error"}',
        "ccwrap_recovery_attempts_total",
        "ccwrap_session_up == 0",
        'ccwrap_restarts_total{reason=~"crash|timeout"}',
        "up{",
        "ccwrap_queue_depth",
        "ccwrap_timeouts_total",
    ):
        assert needed in joined, needed
    assert any("> 0.05" in expr and "outcome=\"error\"" in expr for expr in exprs.values())


_METRIC = re.compile(r"\bccwrap_(?!trio)[a-z0-9_]*[a-z0-9]\b")
_MATCHER = re.compile(r"(ccwrap_[a-z0-9_]+)\{([^}]*)\}")


def served_metrics(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Sample and family names in a /metrics text, and every label's values."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            sample = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s", line)
            assert sample, line
            names.add(sample.group(1))
            for label, value in re.findall(r'(\w+)="([^"]*)"', sample.group(2) or ""):
                labels.setdefault(label, set()).add(value)
    return names, labels


async def test_every_metric_in_the_rules_and_the_guide_is_served(make_config: Any) -> None:
    async with running_server(make_config()) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    names, labels = served_metrics(response.text)

    for path in (RULES, K8S / "prometheusrule.yaml", OPERATIONS, K8S / "README.md",
                 K8S / SCALE_OUT, K8S / ADAPTER):
        used = set(_METRIC.findall(path.read_text()))
        missing = used - names
        assert not missing, f"{path.relative_to(ROOT)} uses metrics the server lacks: {missing}"

    # Label values the rules select on exist too (job/instance come from Prometheus).
    for rule in rules():
        for _metric, matchers in _MATCHER.findall(rule["expr"]):
            for label, op, value in re.findall(r'(\w+)\s*(=~|!=|=)\s*"([^"]*)"', matchers):
                if label in ("job", "instance") or op == "!=":
                    continue
                wanted = value.split("|") if op == "=~" else [value]
                assert set(wanted) <= labels[label], (rule["alert"], label, wanted)


def test_runbook_links_point_to_sections_of_the_guide() -> None:
    anchors = guide_anchors()
    for rule in rules():
        runbook = rule["annotations"]["runbook"]
        page, _, anchor = runbook.partition("#")
        assert page == "docs/operations.md" and anchor in anchors, (rule["alert"], runbook)


def guide_anchors() -> set[str]:
    """GitHub's anchors for the guide's headings."""
    anchors = set()
    for line in OPERATIONS.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("path", [OPERATIONS, K8S / "README.md"], ids=lambda p: p.name)
def test_guide_links_resolve(path: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        file_part, _, anchor = target.partition("#")
        if not file_part:
            assert path == OPERATIONS and anchor in guide_anchors(), target
            continue
        assert (path.parent / file_part).exists(), target


# ---------------------------------------------------------------------------------------------
# promtool, where it is installed (Debian: apt-get install prometheus)

MiB = 1024 * 1024
_SERIES = 'job="ccwrap-trio",instance="a"'


def _fires(alert: str, at: str, severity: str, **labels: str) -> dict[str, Any]:
    expected = {"severity": severity, "job": "ccwrap-trio", "instance": "a", **labels}
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": expected}]}


def _quiet(alert: str, at: str) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


def _case(series: dict[str, str], *checks: dict[str, Any], interval: str = "1m") -> Any:
    return {
        "interval": interval,
        "input_series": [
            {"series": name.replace("{", "{" + _SERIES + ",").replace(",}", "}")
             if "{" in name else f"{name}{{{_SERIES}}}", "values": values}
            for name, values in series.items()
        ],
        "alert_rule_test": list(checks),
    }


def _requests(success: str, error: str, rejected: str = "0x40") -> dict[str, str]:
    return {
        'ccwrap_requests_total{outcome="success"}': success,
        'ccwrap_requests_total{outcome="error"}': error,
        'ccwrap_requests_total{outcome="rejected"}': rejected,
    }


PROMTOOL_CASES = [
    _case({"up": "1 1 0x5"}, _quiet("CcwrapTargetDown", "2m"),
          _fires("CcwrapTargetDown", "4m", "critical")),
    _case({"ccwrap_session_up": "1 1 0x10"}, _quiet("CcwrapSessionDown", "5m"),
          _fires("CcwrapSessionDown", "8m", "critical")),
    # 10% errors: fires; the same 10% made of client disconnects: does not.
    _case({**_requests("0+9x40", "0+1x40"), "ccwrap_disconnects_total": "0x40"},
          _quiet("CcwrapErrorRateHigh", "5m"), _fires("CcwrapErrorRateHigh", "30m", "critical")),
    _case({**_requests("0+9x40", "0+1x40"), "ccwrap_disconnects_total": "0+1x40"},
          _quiet("CcwrapErrorRateHigh", "30m")),
    # Half of 4 requests per 10 minutes fail: too few requests to page.
    _case({**_requests("0+1x20", "0+1x20", "0x20"), "ccwrap_disconnects_total": "0x20"},
          _quiet("CcwrapErrorRateHigh", "60m"), interval="5m"),
    _case(_requests("0+8x40", "0x40", "0+2x40"),
          _fires("CcwrapRejectingRequests", "30m", "warning")),
    _case({"ccwrap_server_resident_memory_bytes": f"{600 * MiB}+{MiB}x60"},
          _fires("CcwrapServerMemoryHigh", "50m", "critical")),
    _case({"ccwrap_server_resident_memory_bytes": f"{600 * MiB}x60"},
          _quiet("CcwrapServerMemoryHigh", "50m")),
    _case({"ccwrap_server_resident_memory_bytes": f"{250 * MiB}x90",
           "ccwrap_memory_trend_bytes_per_second": "0 0 1000x90"},
          _quiet("CcwrapServerMemoryGrowing", "30m"),
          _fires("CcwrapServerMemoryGrowing", "80m", "warning")),
    # One session and its standby at 450 MiB is normal; 700 MiB and rising is not, unless there
    # are two sessions.
    _case({"ccwrap_cli_resident_memory_bytes": f"{450 * MiB}+{MiB // 10}x60",
           "ccwrap_sessions": "1x60"}, _quiet("CcwrapCliMemoryHigh", "50m")),
    _case({"ccwrap_cli_resident_memory_bytes": f"{700 * MiB}+{MiB}x60",
           "ccwrap_sessions": "1x60"}, _fires("CcwrapCliMemoryHigh", "50m", "warning")),
    _case({"ccwrap_cli_resident_memory_bytes": f"{700 * MiB}+{MiB}x60",
           "ccwrap_sessions": "2x60"}, _quiet("CcwrapCliMemoryHigh", "50m")),
    # Crash restarts page; proactive ones, however many, do not.
    _case({'ccwrap_restarts_total{reason="crash"}': "0+1x20",
           'ccwrap_restarts_total{reason="timeout"}': "0x20",
           'ccwrap_restarts_total{reason="proactive"}': "0+5x20"},
          _fires("CcwrapCrashLoop", "15m", "warning")),
    _case({'ccwrap_restarts_total{reason="crash"}': "0x20",
           'ccwrap_restarts_total{reason="timeout"}': "0x20",
           'ccwrap_restarts_total{reason="proactive"}': "0+5x20"},
          _quiet("CcwrapCrashLoop", "15m")),
    _case({"ccwrap_recovery_attempts_total": "0 1 2 3 4 5"},
          _fires("CcwrapRecoveryFailing", "5m", "warning")),
    _case({'ccwrap_restarts_total{reason="hard"}': "0 0 1 1"},
          _fires("CcwrapHardRestarts", "3m", "info", reason="hard")),
    _case({'ccwrap_restarts_total{reason="memory"}': "0+1x10"},
          _fires("CcwrapMemoryRestartsFrequent", "10m", "warning", reason="memory")),
    _case({"ccwrap_context_turns": "10x20", "ccwrap_context_turn_limit": "10x20",
           "ccwrap_context_tokens": "100x20", "ccwrap_context_token_limit": "150000x20"},
          _quiet("CcwrapRestartsStuck", "5m"), _fires("CcwrapRestartsStuck", "15m", "warning")),
    _case({"ccwrap_queue_depth": "60x10", "ccwrap_queue_limit": "64x10"},
          _fires("CcwrapQueueSaturated", "7m", "warning")),
    _case({"ccwrap_timeouts_total": "0 0 1 2 3 3"}, _fires("CcwrapTimeouts", "5m", "warning")),
    _case({'ccwrap_request_duration_seconds_bucket{le="30"}': "0x40",
           'ccwrap_request_duration_seconds_bucket{le="60"}': "0+1x40",
           'ccwrap_request_duration_seconds_bucket{le="+Inf"}': "0+1x40"},
          _fires("CcwrapSlowResponses", "30m", "warning")),
]


@pytest.fixture
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def test_promtool_accepts_the_rules(promtool: str) -> None:
    for path in (RULES,):
        result = subprocess.run([promtool, "check", "rules", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_when_they_should_and_only_then(promtool: str, tmp_path: Path) -> None:
    # Expressions only: promtool compares annotations too, which would freeze their wording.
    groups = rule_groups()
    for rule in (r for g in groups for r in g["rules"]):
        rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    tested = {check["alertname"] for case in PROMTOOL_CASES for check in case["alert_rule_test"]}
    assert tested >= {rule["alert"] for rule in rules()} - {"CcwrapTargetMissing"}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": PROMTOOL_CASES}
    ))
    result = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# The second way to run: the Hypercorn command with container/hypercorn.toml


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _get(client: httpx.Client, path: str) -> httpx.Response | None:
    try:
        return client.get(path)
    except httpx.TransportError:
        return None


def _fake_clis(pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if any("fake_claude" in part for part in child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue  # ended meanwhile
    return found


def test_hypercorn_serves_the_app_and_shuts_down_gracefully(
    fake_cli: Path, tmp_path: Path
) -> None:
    port = _free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "CCWRAP_CLAUDE_BIN": str(fake_cli),
        "CCWRAP_WORKDIR": str(tmp_path / "work"),
        "CCWRAP_LOG_FORMAT": "json",
        "CCWRAP_MEMORY_SAMPLE_INTERVAL": "0.5",
    }
    stderr_path = tmp_path / "stderr.log"
    command = [sys.executable, "-m", "hypercorn", "--config", str(HYPERCORN_TOML),
               "--bind", f"127.0.0.1:{port}", "ccwrap_trio.asgi:app"]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                   stdout=stderr, stderr=stderr)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            def ready() -> bool:
                response = _get(client, READY)
                return response is not None and response.status_code == 200

            _wait_until(ready, 30, "/health/ready")
            assert client.get(LIVE).json() == {"status": "alive"}
            answer = client.post("/v1/chat/completions", json={
                "model": "haiku", "messages": [{"role": "user", "content": "hi"}]})
            assert answer.status_code == 200
            assert answer.json()["choices"][0]["message"]["content"] == "echo: hi"
            cli_processes = _fake_clis(process.pid)
            assert cli_processes, "the worker runs the fake CLI"

            # SIGTERM while a request runs: it is answered, then everything exits.
            with ThreadPoolExecutor(1) as pool:
                slow = pool.submit(client.post, "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "FAKE:sleep=2 slow"}]})

                def running() -> bool:
                    response = _get(client, "/health")
                    return response is not None and response.json()["active_queries"] == 1

                _wait_until(running, 10, "the slow request to reach the CLI")
                process.send_signal(signal.SIGTERM)
                response = slow.result(timeout=30)
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"] == "echo: slow"
        assert process.wait(timeout=30) == 0
        _gone, alive = psutil.wait_procs(cli_processes, timeout=10)
        assert not alive, "no CLI outlives the server"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = [line for line in stderr_path.read_text().splitlines() if line.strip()]
    # With CCWRAP_LOG_FORMAT=json every line is JSON, Hypercorn's included, and none is doubled
    # (the [logconfig_dict] table of hypercorn.toml).
    records = [json.loads(line) for line in lines]
    running_on = [r for r in records if r["event"].startswith("Running on")]
    assert len(running_on) == 1 and running_on[0]["logger"] == "hypercorn.error"
    assert any(r["marker"] == "DONE" for r in records)
