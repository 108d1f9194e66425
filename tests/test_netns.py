"""The zero-trust topology itself, in network namespaces: client -> cloud <- site -> printer.

* ``client`` reaches only the cloud (10.77.1.0/24), ``site`` reaches the cloud (10.77.2.0/24) and the
  printer network (10.77.3.0/24); nothing forwards packets and no namespace has a default route, so the
  client has no path to the printer at all.
* The relay runs in ``cloud`` with TLS (a trustme certificate for its two addresses), the connector in
  ``site`` dialing out over WSS with ``--ca-file``, a RAW printer in ``printer``.
* A job the client submits over HTTPS arrives at the printer; the client's own connection attempt to the
  printer fails. Every probe of a namespace address runs inside a namespace (``ip netns exec``), never
  from the root namespace; the namespaces are deleted afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

CLOUD_FOR_CLIENT, CLIENT = "10.77.1.1", "10.77.1.2"
CLOUD_FOR_SITE, SITE = "10.77.2.1", "10.77.2.2"
SITE_FOR_PRINTER, PRINTER = "10.77.3.1", "10.77.3.2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Topology:
    prefix: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def run_in(self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        with log.open("ab") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(name), *args], stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )  # fmt: skip
        self.processes.append(process)


@pytest.fixture
def topology() -> Iterator[Topology]:
    topo = Topology(f"pr{os.getpid() % 100000}")
    names = ("client", "cloud", "site", "printer")
    links = [("client", CLIENT, "cloud", CLOUD_FOR_CLIENT), ("site", SITE, "cloud", CLOUD_FOR_SITE),
             ("site", SITE_FOR_PRINTER, "printer", PRINTER)]  # fmt: skip
    try:
        for name in names:
            ip("netns", "add", topo.ns(name))
            ip("-n", topo.ns(name), "link", "set", "lo", "up")
        for i, (a, a_ip, b, b_ip) in enumerate(links):
            va, vb = f"{topo.prefix}a{i}", f"{topo.prefix}b{i}"
            ip(
                "link",
                "add",
                va,
                "netns",
                topo.ns(a),
                "type",
                "veth",
                "peer",
                "name",
                vb,
                "netns",
                topo.ns(b),
            )
            for ns, dev, addr in ((a, va, a_ip), (b, vb, b_ip)):
                ip("-n", topo.ns(ns), "addr", "add", f"{addr}/24", "dev", dev)
                ip("-n", topo.ns(ns), "link", "set", dev, "up")
        yield topo
    finally:
        for process in topo.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        for name in names:
            subprocess.run(["ip", "netns", "del", topo.ns(name)], capture_output=True, timeout=30)


SINK = textwrap.dedent(
    """
    import socket, sys
    server = socket.create_server((sys.argv[1], 9100))
    n = 0
    while True:
        conn, _ = server.accept()
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.close()
        if data:
            n += 1
            open(f"{sys.argv[2]}/{n}.raw", "wb").write(data)
    """
)

CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, socket, ssl, sys, time
    import httpx
    base, ca, token, printer_ip = sys.argv[1:5]
    context = ssl.create_default_context(cafile=ca)
    result = {}
    with httpx.Client(base_url=base, verify=context, headers={"authorization": f"Bearer {token}"},
                      timeout=5) as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the relay and connector are other processes
            try:
                printers = client.get("/v1/printers").json()["printers"]
                if any(p["id"] == "label" and p["online"] for p in printers):
                    break
            except (httpx.TransportError, KeyError, ValueError):
                pass
            time.sleep(0.1)
        job = client.post("/v1/printers/label/jobs", content=b"zero trust, printed\\n").json()
        while time.monotonic() < deadline and job.get("state") not in ("completed", "failed"):
            time.sleep(0.1)
            job = client.get(f"/v1/jobs/{job['id']}").json()
        result["job"] = job
    try:
        socket.create_connection((printer_ip, 9100), timeout=3).close()
        result["direct"] = "connected"
    except OSError as exc:
        result["direct"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(result))
    """
)


def test_client_prints_through_relay_and_connector_but_cannot_reach_the_printer(
    topology: Topology, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert(CLOUD_FOR_CLIENT, CLOUD_FOR_SITE)
    (tmp_path / "relay.crt").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    (tmp_path / "relay.key").write_bytes(cert.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    data_dir, spool = tmp_path / "relay-data", tmp_path / "printed"
    spool.mkdir()

    def token(kind: str, *extra: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "printrelay.cli", "token", "create", "--data-dir", str(data_dir),
             "--create", "--tenant", "acme", "--kind", kind, *extra],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return result.stdout.strip()

    api_token, connector_token = token("api", "--scopes", "admin"), token("connector", "--connector", "site")
    topology.run_in("printer", [sys.executable, "-c", SINK, PRINTER, str(spool)], tmp_path / "printer.log")
    topology.run_in(
        "cloud",
        [sys.executable, "-m", "printrelay.cli", "serve", "--listen", "0.0.0.0:8443", "--tunnel-listen",
         "0.0.0.0:8444", "--data-dir", str(data_dir), "--tls-cert", str(tmp_path / "relay.crt"),
         "--tls-key", str(tmp_path / "relay.key")],
        tmp_path / "relay.log",
    )  # fmt: skip
    topology.run_in(
        "site",
        [sys.executable, "-m", "printrelay.cli", "connector", "--relay", f"wss://{CLOUD_FOR_SITE}:8444/v1/tunnel",
         "--ca-file", str(tmp_path / "ca.pem"), "--state-dir", str(tmp_path / "connector"),
         "--printer", f"label=socket://{PRINTER}:9100", "--status-interval", "1"],
        tmp_path / "connector.log", env={"PRINTRELAY_TOKEN": connector_token},
    )  # fmt: skip
    client = subprocess.run(
        ["ip", "netns", "exec", topology.ns("client"), sys.executable, "-c", CLIENT_SCRIPT,
         f"https://{CLOUD_FOR_CLIENT}:8443", str(tmp_path / "ca.pem"), api_token, PRINTER],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert client.returncode == 0, client.stderr + logs
    result = json.loads(client.stdout)
    assert result["job"]["state"] == "completed", (result, logs)
    assert [p.read_bytes() for p in spool.glob("*.raw")] == [b"zero trust, printed\n"]
    assert result["direct"].startswith("OSError") and "unreachable" in result["direct"], result["direct"]
