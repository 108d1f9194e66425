"""The container image (Containerfile), built and run with podman.

Once per session: a base image from the Debian archive (mmdebstrap, imported into a private podman
storage; no container registry is needed), the project's wheels built here, then ``podman build`` of the
Containerfile on that base. Then a relay container and a connector container from the one image, both
with a read-only root filesystem, /tmp on tmpfs and their data on volumes, print a job to a RAW printer
on this machine byte for byte; the image's user, health check, entrypoint and contents are checked, and
its size is printed.

Needs root (rootful podman, mmdebstrap) and the Debian packages podman, buildah, runc and mmdebstrap
(scripts/install-system-deps.sh); a missing one fails the test, it is never skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from fixtures_printers import RawSink, free_port

# Whichever test runs first builds the image (minutes on a loaded host): room for the build's own step
# timeouts to fire first.
pytestmark = [pytest.mark.image, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "localhost/debian-base:bookworm"
IMAGE = "localhost/printrelay:test"
UID = 10001
TOOLS = {"podman": "podman", "runc": "runc", "mmdebstrap": "mmdebstrap"}  # command -> Debian package
# The base: Python and its venv module, as python:3.11-slim-bookworm has them; documentation and
# translations left out, as Debian's slim images do.
MMDEBSTRAP = [
    "mmdebstrap", "--quiet", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
    "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*", "bookworm",
]  # fmt: skip
# runc (crun cannot run containers on hosts with hybrid cgroups); explicit ulimits, as root may lack
# CAP_SYS_RESOURCE; no systemd or journald needed.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
# What the project's wheel is built from (pyproject.toml's packages): a copy, so the checkout is untouched.
SOURCES = ("pyproject.toml", "README.md", "relay", "connector", "tunnel", "ipp", "service", "printrelay")
STARTUP_TIMEOUT = 30.0


@dataclass
class Podman:
    """podman with its storage, run state and configuration in one directory of its own."""

    directory: Path
    containers: list[str] = field(default_factory=list)

    def __call__(
        self, *args: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = ["podman", "--root", str(self.directory / "storage"),
                   "--runroot", str(self.directory / "run"), *args]  # fmt: skip
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "CONTAINERS_CONF": str(self.directory / "containers.conf")},
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args[:3])} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                f"{result.stderr[-3000:]}"
            )
        return result

    async def run(
        self, *args: str, seconds: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """The same from a trio test, leaving its event loop free (the RAW printer is served there)."""
        return await trio.to_thread.run_sync(lambda: self(*args, timeout=seconds, check=check))

    def inspect(self, *args: str) -> Any:
        return json.loads(self(*args).stdout)[0]

    def logs(self, name: str) -> str:
        result = self("logs", name, check=False)
        return (result.stdout + result.stderr)[-4000:]

    def remove_containers(self) -> None:
        for name in self.containers:
            self("rm", "--force", "--time", "5", name, check=False)
        self.containers.clear()


@dataclass(frozen=True)
class Image:
    name: str
    size: int
    build_seconds: float


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    missing = [
        f"{tool} (Debian package {package})" for tool, package in TOOLS.items() if not shutil.which(tool)
    ]
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)}; scripts/install-system-deps.sh installs them")
    if os.geteuid() != 0:
        pytest.fail("the image test runs podman and mmdebstrap as root: run it as root")
    directory = tmp_path_factory.mktemp("podman")
    (directory / "containers.conf").write_text(CONTAINERS_CONF)
    engine = Podman(directory)
    yield engine
    engine.remove_containers()
    engine("rmi", "--all", "--force", check=False, timeout=120)
    with open("/proc/self/mounts") as mounts:  # nothing of it should be mounted any more; make sure
        leftover = [line.split()[1] for line in mounts if line.split()[1].startswith(str(directory))]
    for mountpoint in sorted(leftover, reverse=True):
        subprocess.run(["umount", "--lazy", mountpoint], check=False, timeout=30)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The base image and the project's image, built once per session."""
    started = time.monotonic()
    work = tmp_path_factory.mktemp("image-build")
    rootfs = work / "rootfs.tar"
    with (work / "mmdebstrap.log").open("wb") as log:
        debootstrap = subprocess.Popen([*MMDEBSTRAP, str(rootfs)], stdout=log, stderr=subprocess.STDOUT)
    try:
        source = work / "source"
        for name in SOURCES:
            if (REPO / name).is_dir():
                shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                source.mkdir(exist_ok=True)
                shutil.copy2(REPO / name, source / name)
        context = work / "context"
        context.mkdir()
        shutil.copy2(REPO / ".dockerignore", context / ".dockerignore")
        # The versions this checkout is tested with (pip wheel resolves the dependencies the same way
        # without them; with them the image runs what the rest of the suite ran).
        freeze = subprocess.run(
            [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        (work / "constraints.txt").write_text(freeze.stdout)
        wheel = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--constraint", str(work / "constraints.txt"),
             "--wheel-dir", str(context / "dist" / "wheels"), str(source)],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert wheel.returncode == 0, f"pip wheel failed:\n{wheel.stdout[-3000:]}\n{wheel.stderr[-3000:]}"
        debootstrap.wait(timeout=180)
    finally:
        if debootstrap.poll() is None:
            debootstrap.kill()
            debootstrap.wait()
    assert debootstrap.returncode == 0, (work / "mmdebstrap.log").read_text(errors="replace")[-3000:]
    podman("import", str(rootfs), BASE_IMAGE, timeout=120)
    rootfs.unlink()
    podman("build", "--format", "docker", "--build-arg", f"BASE={BASE_IMAGE}", "--tag", IMAGE,
           "--file", str(REPO / "Containerfile"), str(context), timeout=180)  # fmt: skip
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    return Image(IMAGE, size, time.monotonic() - started)


def one_off(*args: str, entrypoint: str = "") -> list[str]:
    """``podman run`` arguments for a short command in the image, as it runs in production."""
    return ["run", "--rm", "--no-healthcheck", "--network=none", "--read-only", "--tmpfs", "/tmp",
            *(["--entrypoint", entrypoint] if entrypoint else []), *args]  # fmt: skip


def test_image_user_entrypoint_healthcheck_and_contents(
    podman: Podman, image: Image, capsys: pytest.CaptureFixture[str]
) -> None:
    with capsys.disabled():
        print(f"\nimage {image.name}: {image.size / 1e6:.1f} MB "
              f"(base {BASE_IMAGE}; built in {image.build_seconds:.0f} s)")  # fmt: skip
    inspected = podman.inspect("image", "inspect", image.name)
    config = inspected["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["printrelay"]
    assert config["Cmd"] == ["serve"]
    # Kept only in the docker image format (podman build --format docker; docker build always).
    assert inspected.get("Healthcheck", {}).get("Test", [])[:2] == ["CMD", "python3"], inspected.keys()
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PRINTRELAY_DATA_DIR"] == "/var/lib/printrelay"
    assert env["PRINTRELAY_STATE_DIR"] == "/var/lib/printrelay-connector"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert config["Labels"]["org.opencontainers.image.title"] == "printrelay"
    assert "org.opencontainers.image.version" in config["Labels"]

    probe = (
        "import errno, glob, importlib.util, json, os, shutil\n"
        "compilers = [c for c in ('gcc', 'cc', 'c++', 'g++', 'clang') if shutil.which(c)]\n"
        "compilers += glob.glob('/usr/bin/*-gcc*') + glob.glob('/usr/local/bin/*gcc*')\n"
        "def write(path):\n"
        "    try:\n"
        "        with open(path, 'w') as f: f.write('x')\n"
        "        return 'ok'\n"
        "    except OSError as exc: return errno.errorcode[exc.errno]\n"
        "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'compilers': compilers,\n"
        "    'pip': importlib.util.find_spec('pip') is not None, 'usr': write('/usr/x'),\n"
        "    'tmp': write('/tmp/x'), 'printrelay': shutil.which('printrelay')}))\n"
    )
    result = podman(*one_off(image.name, "-c", probe, entrypoint="python3"))
    seen = json.loads(result.stdout)
    assert seen["uid"] == UID and seen["gid"] == UID, seen
    assert seen["compilers"] == [], seen
    assert not seen["pip"], "pip is left in the image's venv"
    assert seen["usr"] == "EROFS", seen  # read-only root filesystem, not merely a permission error
    assert seen["tmp"] == "ok", seen
    assert seen["printrelay"] == "/opt/printrelay/bin/printrelay", seen


def volume(directory: Path) -> Path:
    """A host directory for a container volume, owned by the image's user (a bind mount keeps the owner)."""
    directory.mkdir()
    os.chown(directory, UID, UID)
    return directory


async def wait_http(podman: Podman, container: str, url: str, *, within: float = STARTUP_TIMEOUT) -> None:
    """Poll ``url`` until it answers 200 (a process in a container: nothing else to wait on)."""
    async with httpx.AsyncClient(timeout=2) as client:
        with trio.fail_after(within):
            while True:
                try:
                    if (await client.get(url)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                state = (await podman.run("inspect", "--format", "{{.State.Status}}", container)).stdout
                if state.strip() not in ("created", "running"):
                    raise AssertionError(f"{container} is {state.strip()}:\n{podman.logs(container)}")
                await trio.sleep(0.1)  # polling another process: there is no event to wait on


async def test_relay_and_connector_containers_print_a_job(
    podman: Podman, image: Image, raw_sink: RawSink, tmp_path: Path
) -> None:
    data, state = volume(tmp_path / "relay-data"), volume(tmp_path / "connector-state")
    http_port, tunnel_port, relay_metrics, connector_metrics = (free_port() for _ in range(4))
    suffix = uuid.uuid4().hex[:8]
    relay, connector = f"printrelay-relay-{suffix}", f"printrelay-connector-{suffix}"
    data_volume = ["--volume", f"{data}:/var/lib/printrelay"]

    # Tokens with the image itself, on the relay's volume (PRINTRELAY_DATA_DIR is the image's default).
    async def token(*args: str) -> str:
        argv = one_off(*data_volume, image.name, "token", "create", "--tenant", "acme", *args)
        return (await podman.run(*argv)).stdout.strip()

    api_token = await token("--kind", "api", "--scopes", "admin")
    connector_token = await token("--kind", "connector", "--connector", "site-1")

    running = ["run", "--detach", "--network=host", "--read-only", "--tmpfs", "/tmp"]
    podman.containers.append(relay)
    try:
        await podman.run(
            *running, "--name", relay, *data_volume,
            "--env", f"PRINTRELAY_LISTEN=127.0.0.1:{http_port}",
            "--env", f"PRINTRELAY_TUNNEL_LISTEN=127.0.0.1:{tunnel_port}",
            "--env", f"PRINTRELAY_METRICS_LISTEN=127.0.0.1:{relay_metrics}",
            image.name,  # CMD: serve
        )  # fmt: skip
        await wait_http(podman, relay, f"http://127.0.0.1:{http_port}/readyz")
        podman.containers.append(connector)
        await podman.run(
            *running, "--name", connector, "--volume", f"{state}:/var/lib/printrelay-connector",
            "--env", f"PRINTRELAY_METRICS_LISTEN=127.0.0.1:{connector_metrics}",
            "--env", f"PRINTRELAY_TOKEN={connector_token}",
            image.name, "connector", "--relay", f"ws://127.0.0.1:{tunnel_port}/v1/tunnel",
            "--printer", f"labels={raw_sink.uri}",
        )  # fmt: skip
        await wait_http(podman, connector, f"http://127.0.0.1:{connector_metrics}/healthz")

        body = os.urandom(300_000)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{http_port}", headers={"authorization": f"Bearer {api_token}"},
            timeout=10,
        ) as client:  # fmt: skip
            with trio.fail_after(STARTUP_TIMEOUT):
                while True:
                    printers = (await client.get("/v1/printers")).json()["printers"]
                    if any(p["id"] == "labels" and p["online"] for p in printers):
                        break
                    await trio.sleep(0.1)  # polling another process: there is no event to wait on
            response = await client.post("/v1/printers/labels/jobs", content=body)
            assert response.status_code == 201, response.text
            job_id = response.json()["id"]
            [document] = await raw_sink.wait_for(1, within=30)
            with trio.fail_after(30):
                while True:
                    job = (await client.get(f"/v1/jobs/{job_id}")).json()
                    if job["state"] in ("completed", "failed", "canceled", "expired"):
                        break
                    await trio.sleep(0.1)  # as above
        assert job["state"] == "completed", (job, podman.logs(relay), podman.logs(connector))
        assert document.sha256 == hashlib.sha256(body).hexdigest()
        assert document.path.read_bytes() == body

        for name in (relay, connector):
            # The health check of the image, run by podman in the container (no systemd timer needed).
            result = await podman.run("healthcheck", "run", name, check=False)
            assert result.returncode == 0, (name, result.stdout, result.stderr, podman.logs(name))
            pid = (await podman.run("inspect", "--format", "{{.State.Pid}}", name)).stdout.strip()
            status = await trio.Path(f"/proc/{pid}/status").read_text()
            uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
            assert uids == [str(UID)] * 4, (name, uids)  # no user namespace: the host sees uid 10001
        assert (
            await podman.run("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", relay)
        ).stdout.strip() == "true"
        assert (data / "relay.sqlite3").stat().st_uid == UID
        assert any(state.iterdir()), "the connector kept nothing on its state volume"

        # SIGTERM reaches the program (PID 1 of its container) and it drains and exits 0.
        for name in (connector, relay):
            await podman.run("stop", "--time", "30", name, seconds=60)
            code = (await podman.run("inspect", "--format", "{{.State.ExitCode}}", name)).stdout.strip()
            assert code == "0", (name, code, podman.logs(name))
    finally:
        await trio.to_thread.run_sync(podman.remove_containers)
