"""The container image's checks for `make container-test` (run by container/test/run.sh).

Each check prints one ``PASS name`` or ``FAIL name: why`` line; the exit status is 1 if any
failed. Every wait is on state (a probe answering, a request in flight, a container's exit),
bounded in time. Every container, pod, volume and compose project made here is removed on exit.

The security settings of the runs below come from container/k8s/deployment.yaml (user, group,
read-only root, dropped capabilities, no privilege escalation, the HOME and /tmp volumes), so
the image is checked as the manifest runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "container/k8s"
COMPOSE = ROOT / "container/compose.yaml"
CLI_VERSION = "2.1.332"
PREFIX = "ccwrap-ct"  # every container, pod, volume and project made here starts with it
STANDIN_PORT = 8765

# Runs inside the container as its command (under tini): the stand-in API, then the server with
# SIGTERM forwarded to it; when the server has exited, it reports any CLI process still alive
# (an orphan would now be tini's) and exits with the server's status.
INSIDE = textwrap.dedent(f"""
    import os, signal, subprocess, sys, time, urllib.request
    standin = subprocess.Popen([sys.executable, "-m", "ccwrap_trio.standin",
                                "--host", "127.0.0.1", "--port", "{STANDIN_PORT}"])
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen("http://127.0.0.1:{STANDIN_PORT}/", timeout=1)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            if time.monotonic() > deadline:
                sys.exit("stand-in did not start")
            time.sleep(0.05)
    def clis():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.readlink(f"/proc/{{pid}}/exe") == "/usr/local/bin/claude":
                    found.append(int(pid))
            except OSError:
                pass
        return found
    server = subprocess.Popen(["ccwrap-trio", "serve"])
    def forward(*_):
        print("CLI processes at SIGTERM:", clis(), flush=True)
        server.send_signal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, forward)
    status = server.wait()
    print("CLI processes left after the server exited:", clis() or "none", flush=True)
    standin.terminate()
    standin.wait()
    sys.exit(status)
""")

results: list[tuple[str, bool]] = []
selected: list[str] = []  # -k: run only the checks whose name contains one of these


def check(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Run the decorated function at once as the check ``name``; record PASS or FAIL."""

    def run(function: Callable[[], None]) -> Callable[[], None]:
        if selected and not any(word.lower() in name.lower() for word in selected):
            return function
        started = time.monotonic()
        try:
            function()
        except Exception as exc:  # a check's failure is a FAIL line, never the end of the run
            results.append((name, False))
            detail = str(exc) or traceback.format_exc()
            print(f"FAIL {name}: {detail.strip()}", flush=True)
        else:
            results.append((name, True))
            print(f"PASS {name} ({time.monotonic() - started:.1f}s)", flush=True)
        return function

    return run


def podman(*args: str, check: bool = True, timeout: float = 300, **kwargs: Any) -> str:
    result = subprocess.run(["podman", *args], capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])}... exit {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()[-2000:]}")
    out: str = result.stdout.strip()
    return out


def wait_until(what: str, predicate: Callable[[], bool], *, timeout: float = 120) -> None:
    """Poll ``predicate`` until true; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.2)


def http_get(url: str, *, timeout: float = 5) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError):
        return 0, None


def container_get(name: str, path: str) -> int:
    """GET ``path`` on the server from inside container ``name``; the HTTP status (0: none)."""
    code = ("import sys, urllib.request, urllib.error\n"
            "try: print(urllib.request.urlopen('http://127.0.0.1:8204' + sys.argv[1],"
            " timeout=4).status)\n"
            "except urllib.error.HTTPError as e: print(e.code)\n"
            "except OSError: print(0)\n")
    out = podman("exec", name, "python", "-c", code, path, check=False, timeout=30)
    return int(out) if out.isdigit() else 0


def manifest_pod() -> dict[str, Any]:
    for doc in yaml.safe_load_all((K8S / "deployment.yaml").read_text()):
        if doc and doc["kind"] == "Deployment":
            pod: dict[str, Any] = doc["spec"]["template"]["spec"]
            return pod
    raise LookupError("no Deployment in deployment.yaml")


def security_flags() -> list[str]:
    """podman run flags for the manifest's securityContext and its HOME and /tmp volumes."""
    pod = manifest_pod()
    container = pod["containers"][0]
    context = {**pod["securityContext"], **container["securityContext"]}
    flags = ["--user", f"{context['runAsUser']}:{context['runAsGroup']}"]
    if context.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    for cap in context.get("capabilities", {}).get("drop", []):
        flags += ["--cap-drop", cap]
    if context.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    for volume in pod["volumes"]:
        path = mounts[volume["name"]]
        if "emptyDir" in volume:
            size = volume["emptyDir"]["sizeLimit"].replace("Mi", "m").replace("Gi", "g")
            flags += ["--tmpfs", f"{path}:rw,mode=1777,size={size}"]
        else:  # the login PVC: a fresh named volume, filled from the image like a new PVC
            flags += ["--volume", f"{PREFIX}-{volume['name']}-{os.getpid()}:{path}"]
    return flags


STANDIN_ENV = [
    "-e", "CCWRAP_HOST=0.0.0.0",
    "-e", f"ANTHROPIC_BASE_URL=http://127.0.0.1:{STANDIN_PORT}",
    "-e", "ANTHROPIC_API_KEY=sk-standin-container-test",
    "-e", "CCWRAP_FORWARD_API_KEY=1",
    "-e", "CCWRAP_STANDBY=0",
    "-e", "CCWRAP_SHUTDOWN_GRACE=60",
]


@contextmanager
def standin_container(image: str, name: str, *extra: str) -> Iterator[str]:
    """The image running the stand-in and the server (INSIDE) as the manifest's pod would."""
    podman("run", "-d", "--name", name, *security_flags(), *STANDIN_ENV, *extra,
           image, "python", "-c", INSIDE)
    try:
        yield name
    finally:
        podman("rm", "-f", "-t", "0", "-v", name, check=False)
        podman("volume", "rm", "-f", f"{PREFIX}-home-{os.getpid()}", check=False)


def completion(base: str, content: str, *, timeout: float = 120) -> dict[str, Any]:
    body = json.dumps({"model": "haiku", "messages": [{"role": "user", "content": content}]})
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", required=True)
    parser.add_argument("--state", required=True, type=Path, help=".tools/container")
    parser.add_argument("-k", action="append", default=[], metavar="WORD",
                        help="run only the checks whose name contains WORD (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra server environment in the stand-in containers")
    args = parser.parse_args()
    selected.extend(args.k)
    STANDIN_ENV.extend(arg for env in args.env for arg in ("-e", env))
    image: str = args.image
    state: Path = args.state
    uid = os.getpid()
    # The name the manifests and compose.yaml use.
    podman("tag", image, "localhost/ccwrap-trio:0.1.0")

    @check(f"the CLI inside the image is {CLI_VERSION}")
    def _version() -> None:
        out = podman("run", "--rm", "--network=none", image, "claude", "--version")
        if not out.startswith(f"{CLI_VERSION} "):
            raise AssertionError(f"claude --version printed {out!r}")

    with standin_container(image, f"{PREFIX}-e2e-{uid}", "--network=none") as name:

        @check("a chat completion inside the image, --network=none, with the stand-in")
        def _e2e() -> None:
            wait_until("/health/ready", lambda: container_get(name, "/health/ready") == 200)
            code = (
                "import json, urllib.request\n"
                "body = json.dumps({'model': 'haiku', 'messages': [{'role': 'user', "
                "'content': 'hello from the container'}]}).encode()\n"
                "r = urllib.request.Request('http://127.0.0.1:8204/v1/chat/completions', "
                "data=body, headers={'Content-Type': 'application/json'})\n"
                "print(json.load(urllib.request.urlopen(r, timeout=120))"
                "['choices'][0]['message']['content'])\n"
            )
            out = podman("exec", name, "python", "-c", code, timeout=150)
            if "hello from the container" not in out:
                raise AssertionError(f"answer: {out!r}")
            # A body over 256 KB is parsed in a worker process (offload.py): it must start
            # under the read-only root and the non-root user too.
            big = code.replace("'hello from the container'", "'big ' * 80000")
            out = podman("exec", name, "python", "-c", big, timeout=150)
            if not out.startswith("echo: big big"):
                raise AssertionError(f"answer to a 320 KB body: {out[:200]!r}")

        @check("the image's HEALTHCHECK passes (podman healthcheck run)")
        def _healthcheck() -> None:
            podman("healthcheck", "run", name, timeout=60)

        @check("non-root, read-only root, no capabilities, as deployment.yaml sets them")
        def _security() -> None:
            pod = manifest_pod()
            context = {**pod["securityContext"], **pod["containers"][0]["securityContext"]}
            code = (
                "import os\n"
                "server = [p for p in os.listdir('/proc') if p.isdigit() and any("
                "a.endswith(b'/ccwrap-trio') for a in open(f'/proc/{p}/cmdline', 'rb')"
                ".read().split(bytes(1)))]\n"
                "s = dict(l.split(':\\t', 1) for l in open(f'/proc/{server[0]}/status').read()"
                ".splitlines() if ':\\t' in l)\n"
                "ro = 'read-only' if os.statvfs('/').f_flag & os.ST_RDONLY else 'writable'\n"
                "print(s['Uid'].split()[0], s['Gid'].split()[0], s['CapEff'].strip(), "
                "s['CapBnd'].strip(), s['NoNewPrivs'].strip(), ro)\n"
            )
            out = podman("exec", name, "python", "-c", code).split()
            want = [str(context["runAsUser"]), str(context["runAsGroup"]),
                    "0000000000000000", "0000000000000000", "1", "read-only"]
            if out != want:
                raise AssertionError(f"uid gid CapEff CapBnd NoNewPrivs root: {out}, want {want}")

    busy = f"{PREFIX}-busy-{uid}"
    with standin_container(image, busy, "-p", "127.0.0.1::8204"):

        @check("SIGTERM to a busy container: the request is answered, exit 0, no CLI left")
        def _sigterm() -> None:
            port = podman("port", busy, "8204/tcp").rsplit(":", 1)[1]
            base = f"http://127.0.0.1:{port}"
            wait_until("/health/ready", lambda: http_get(f"{base}/health/ready")[0] == 200)
            answer: dict[str, Any] = {}

            def ask() -> None:
                try:
                    answer.update(completion(base, "still there [standin:latency=4]"))
                except Exception as exc:
                    answer["error"] = repr(exc)

            asking = threading.Thread(target=ask)
            asking.start()
            wait_until("the request to be running", lambda: (
                (http_get(f"{base}/health")[1] or {}).get("active_queries", 0) >= 1))
            podman("kill", "--signal", "TERM", busy)
            asking.join(timeout=120)
            status = podman("wait", busy, timeout=120)
            logs = podman("logs", busy)
            content = answer.get("choices", [{}])[0].get("message", {}).get("content", "")
            if "still there" not in content:
                raise AssertionError(f"in-flight request: {answer}")
            if status != "0":
                raise AssertionError(f"exit status {status}; logs: {logs[-1500:]}")
            if "CLI processes at SIGTERM: []" in logs or (
                    "CLI processes left after the server exited: none" not in logs):
                raise AssertionError(f"logs: {logs[-1500:]}")

    @check("podman kube play container/k8s/deployment.yaml: every probe answers 200")
    def _kube_play() -> None:
        pod = manifest_pod()
        container = pod["containers"][0]
        manifest = str(K8S / "deployment.yaml")
        try:
            played = podman("kube", "play", manifest, timeout=300).splitlines()
            name = played[played.index("Container:") + 1]
            paths = {container[p]["httpGet"]["path"]
                     for p in ("startupProbe", "livenessProbe", "readinessProbe")}
            for path in sorted(paths):

                def answers(path: str = path) -> bool:
                    return container_get(name, path) == 200

                wait_until(f"{path} in the pod", answers)
            security = podman("inspect", name, "--format",
                              "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}")
            if security != "10001:10001 true":
                raise AssertionError(f"user and read-only root in the pod: {security}")
        finally:
            podman("kube", "down", manifest, check=False)
            podman("volume", "rm", "-f", "ccwrap-trio-home", check=False)

    @check("every manifest is valid against the Kubernetes schemas (--strict; CRDs too)")
    def _manifests() -> None:
        files = sorted(str(p) for p in K8S.glob("*.yaml"))
        core = [f for f in files if "monitoring.coreos.com" not in Path(f).read_text()]
        result = subprocess.run([str(state / "venv/bin/kubernetes-validate"), "--strict",
                                 "--quiet", *core], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise AssertionError(f"kubernetes-validate: {result.stdout}{result.stderr}")
        result = subprocess.run(["node", str(state / "k8s-models/validate.mjs"), *files],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise AssertionError(f"kubernetes-models: {result.stdout}{result.stderr}")
        print(textwrap.indent(result.stdout.strip(), "     "))

    @check("compose.yaml up with podman-compose 1.6.0, its health check passing")
    def _compose() -> None:
        project = f"{PREFIX}-compose-{uid}"
        home = Path(tempfile.mkdtemp(prefix="ccwrap-ct-home-"))
        # The login paths the compose file mounts must exist (create_host_path: false).
        (home / ".claude").mkdir()
        (home / ".claude.json").write_text("{}\n")
        os.chown(home / ".claude", 10001, 10001)
        os.chown(home / ".claude.json", 10001, 10001)
        # Another port than 8204 (other servers may use it): the file's own list, replaced.
        override = home / "ports.yaml"
        override.write_text('services:\n  ccwrap-trio:\n    ports: !override ["127.0.0.1::8204"]\n')
        env = {**os.environ, "HOME": str(home), "HOST_UID": ""}
        compose = [str(state / "venv/bin/podman-compose"), "-p", project,
                   "-f", str(COMPOSE), "-f", str(override)]
        try:
            result = subprocess.run([*compose, "up", "-d", "--no-build"], env=env,
                                    capture_output=True, text=True, timeout=300, check=False)
            if result.returncode != 0:
                raise AssertionError(f"up: {result.stdout[-1500:]}{result.stderr[-1500:]}")
            name = podman("ps", "--filter", f"label=io.podman.compose.project={project}",
                          "--format", "{{.Names}}")
            if not name:
                raise AssertionError("no container running")
            wait_until("/health/live", lambda: container_get(name, "/health/live") == 200)
            podman("healthcheck", "run", name, timeout=60)
            limit = podman("inspect", name, "--format", "{{.HostConfig.Memory}}")
            if limit != str(1280 * 1024 * 1024):
                raise AssertionError(f"memory limit {limit}, want 1280M")
        finally:
            subprocess.run([*compose, "down", "-t", "5"], env=env, capture_output=True,
                           timeout=120, check=False)
            shutil.rmtree(home, ignore_errors=True)

    failed = [name for name, ok in results if not ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
