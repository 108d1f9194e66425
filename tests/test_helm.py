"""helm/printrelay: rendered with the real Helm engine (helm-python-sdk), linted strictly, every manifest
validated against the Kubernetes schemas, and held to the programs' own contract: the PRINTRELAY_*
variables, the Secrets mounted as files and the TOML file the pods get load into RelayConfig/ConnectorConfig,
the probes answer on a real relay, and the values schema knows exactly the settings the dataclasses declare.
Both relay modes: one replica on SQLite (a StatefulSet), and replicas sharing PostgreSQL (a Deployment)."""

from __future__ import annotations

import argparse
import base64
import copy
import dataclasses
import errno
import os
import re
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import trio
import yaml
from helm_python.chart import Chart, lint
from helm_python.errors import HelmError
from yamllint import linter  # type: ignore[import-untyped]
from yamllint.config import YamlLintConfig  # type: ignore[import-untyped]

from connector.config import PRINTER_ID_RE, ConnectorConfig, with_token
from printrelay.cli import build_parser
from relay.app import Relay
from relay.config import RelayConfig
from relay.secretbox import KEY_BYTES, SecretBox
from service.settings import env_name, load, parse_duration, parse_size
from tunnel.wsstream import TUNNEL_PATH

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "helm" / "printrelay"
ALERTS = ROOT / "docs" / "ops" / "alerts.yml"
RELEASE, NAMESPACE = "pr", "print"
RELAY, CONNECTOR = "pr-printrelay", "pr-printrelay-connector"

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas at hand.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_GROUPS = ("monitoring.coreos.com/",)

# Settings the chart sets itself from structured values (ports, volumes, TLS Secret, ingress host, logging);
# every other setting is a key of relay.settings / connector.settings.
# database_url and secret_key_file come from the chart's database and relay.secretKey values (Secrets), and
# the connector's token is a file from a Secret (token_file), never from the settings.
RELAY_CHART_OWNED = {"listen", "tunnel_listen", "metrics_listen", "data_dir", "public_url", "tls_cert",
                     "tls_key", "log_level", "log_format", "database_url", "secret_key_file"}  # fmt: skip
CONNECTOR_CHART_OWNED = {"relay", "token", "token_file", "insecure", "printer", "state_dir", "name",
                         "drain_grace", "metrics_listen", "log_level", "log_format"}  # fmt: skip

FULL: dict[str, Any] = {
    "image": {"repository": "registry.example.com/printrelay", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "relay": {
        "publicUrl": "https://print.example.com",
        "logLevel": "debug",
        "settings": {
            "max_job_bytes": "2GiB",
            "job_ttl": "7d",
            "max_attempts": 7,
            "retry_base": "500ms",
            "tenant_max_spool_bytes": 1073741824,
            "rate_limit": 12.5,
            "rate_burst": 40,
            "webhook_allow_private": True,
            "metrics_per_printer": True,
        },
        "tls": {"secretName": "relay-tls"},
        "persistence": {"storageClassName": "fast-ssd", "size": "100Gi"},
        "tunnel": {
            "service": {
                "type": "LoadBalancer",
                "port": 443,
                "externalTrafficPolicy": "Local",
                "loadBalancerSourceRanges": ["203.0.113.0/24"],
            }
        },
        "extraEnv": [{"name": "PRINTRELAY_MAX_STREAMS_PER_CONNECTOR", "value": "64"}],
        "extraVolumes": [{"name": "extra", "emptyDir": {}}],
        "extraVolumeMounts": [{"name": "extra", "mountPath": "/extra"}],
        "podAnnotations": {"example.com/team": "print"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "print", "effect": "NoSchedule"}],
        "priorityClassName": "high",
        "podDisruptionBudget": {"minAvailable": 1},
    },
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "host": "print.example.com",
        "tls": {"secretName": "print-example-com"},
    },
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
        "prometheusRule": {"enabled": True},
    },
    "connector": {
        "enabled": True,
        "relayUrl": "wss://print.example.com/v1/tunnel",
        "token": {"value": "prc_example"},
        "printers": [
            {"id": "office", "uri": "ipp://10.0.0.5:631/ipp/print"},
            {"id": "labels", "uri": "socket://10.0.0.9:9100"},
            {"id": "old.lp", "uri": "lpd://10.0.0.7/lp"},
        ],
        "name": "cluster-site",
        "drainGraceSeconds": 90,
        "settings": {
            "max_jobs": 4,
            "discover": True,
            "discover_cidr": ["10.0.0.0/28", "10.0.1.0/28"],
            "discover_ipp_port": [631, 8631],
            "discover_mdns": False,
            "status_interval": "1m",
        },
    },
}
# The other branches: no persistence, existing claims and Secrets, an in-cluster ws:// connector, percentages.
ALTERNATE: dict[str, Any] = {
    "fullnameOverride": "relay",
    "serviceAccount": {"create": False},
    "relay": {
        "bindAddress": "[::]",
        "ports": {"http": 9080, "tunnel": 9081, "metrics": 9090},
        "persistence": {"existingClaim": "relay-data"},
        "podDisruptionBudget": {"maxUnavailable": "100%"},
    },
    "connector": {
        "enabled": True,
        "relayUrl": "ws://relay-tunnel:8081/v1/tunnel",
        "insecure": True,
        "token": {"existingSecret": "site-token", "key": "secret"},
        "persistence": {"enabled": False},
    },
}
# Relay replicas on PostgreSQL: the URL and the secret key from existing Secrets, a NetworkPolicy with peers,
# a zone spread, the connector in the cluster...
POSTGRES: dict[str, Any] = {
    "database": {"existingSecret": "printrelay-db", "existingSecretKey": "dsn"},
    "relay": {
        "replicas": 3,
        "settings": {"drain_grace": "45s", "job_lease": "20s"},
        "secretKey": {"existingSecret": "printrelay-key", "key": "key"},
        "topologySpread": {
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "DoNotSchedule",
        },
        "preStopSleepSeconds": 15,
        "terminationGracePeriodSeconds": 90,
        "podDisruptionBudget": {"minAvailable": 2},
    },
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "host": "print.example.com",
        "tls": {"secretName": "p"},
    },
    "networkPolicy": {
        "enabled": True,
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
        "metricsFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
    },
    "metrics": {"serviceMonitor": {"enabled": True}},
    "connector": {
        "enabled": True,
        "relayUrl": "ws://pr-printrelay-tunnel:8081/v1/tunnel",
        "insecure": True,
        "token": {"existingSecret": "site-token"},
    },
}
# ...and the URL as a value (the chart's own Secrets for it and the secret key), autoscaled, open policy.
POSTGRES_URL: dict[str, Any] = {
    "database": {"url": "postgresql://printrelay:s3cret@db.example.com:5432/printrelay?sslmode=verify-full"},
    "relay": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 10}},
    "networkPolicy": {"enabled": True},
}
# The Secrets the values above expect to exist in the cluster: (name, key) -> content.
CLUSTER_SECRETS = {
    ("printrelay-db", "dsn"): "postgresql://relay@db.print.svc:5432/printrelay",
    ("printrelay-key", "key"): base64.b64encode(bytes(range(KEY_BYTES))).decode(),
    ("site-token", "token"): "prc_cluster",
    ("site-token", "secret"): "prc_cluster",
}
SQLITE_SETS = {"default": {}, "full": FULL, "alternate": ALTERNATE}
POSTGRES_SETS = {"postgres": POSTGRES, "postgres-url": POSTGRES_URL}
VALUE_SETS = SQLITE_SETS | POSTGRES_SETS


@pytest.fixture(scope="module")
def chart() -> Iterator[Chart]:
    with Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart: Chart, values: dict[str, Any]) -> dict[str, str]:
    return chart.render(values=copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)


def manifests(chart: Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render(chart, values).items()):
        if path.endswith(".yaml"):
            docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    c: dict[str, Any] = only
    return c


def plain_env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c["env"] if "value" in e}


def relay_workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (workload,) = [
        d for d in docs if d["kind"] in ("StatefulSet", "Deployment") and container(d)["name"] == "relay"
    ]
    return workload


def secret_value(docs: list[dict[str, Any]], name: str, key: str) -> str:
    """A key of a Secret the chart renders, else of one the values expect in the cluster."""
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    if name not in secrets:
        return CLUSTER_SECRETS[(name, key)]
    secret = secrets[name]
    if key in secret.get("stringData", {}):
        return str(secret["stringData"][key])
    return base64.b64decode(secret["data"][key]).decode()


def pod_env(docs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str]:
    """The container's environment, secretKeyRef values included."""
    env = plain_env(c)
    for entry in c["env"]:
        if "valueFrom" in entry:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secret_value(docs, ref["name"], ref["key"])
    return env


def mounted_secret(workload: dict[str, Any], path: str) -> tuple[str, str]:
    """The (Secret, key) a file in the pod comes from."""
    pod = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container(workload)["volumeMounts"]:
        if path.startswith(mount["mountPath"] + "/") and "subPath" not in mount:
            secret = volumes[mount["name"]]["secret"]
            relative = path[len(mount["mountPath"]) + 1 :]
            (key,) = [item["key"] for item in secret["items"] if item["path"] == relative]
            assert mount["readOnly"] is True
            return secret["secretName"], key
    raise AssertionError(f"{path} is not mounted from a Secret")


def settings_of(cls: type[Any]) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}


# --- the chart as Helm sees it ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", VALUE_SETS)
def test_lint_strict_passes(which: str) -> None:
    report = lint(CHART_DIR, copy.deepcopy(VALUE_SETS[which]), strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 1 is information ("icon is recommended"); warnings and errors fail under strict.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("which", VALUE_SETS)
def test_manifests_validate_against_kubernetes_schemas(chart: Chart, which: str) -> None:
    docs = manifests(chart, VALUE_SETS[which])
    validated = set()
    for doc in docs:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                validated.add(doc["kind"])
            except kubernetes_validate.SchemaNotFoundError:
                # Only the prometheus-operator CRDs have no built-in schema.
                assert doc["apiVersion"].startswith(CRD_GROUPS), doc["apiVersion"]
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(map(str, exc.path))
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {path}: {exc.message}")
    assert {"Service", "ConfigMap", "PodDisruptionBudget"} <= validated
    workload = "StatefulSet" if which in SQLITE_SETS else "Deployment"
    assert workload in validated
    if which == "full":
        assert {"Ingress", "Deployment", "Secret", "PersistentVolumeClaim"} <= validated
        assert {d["kind"] for d in docs} >= {"ServiceMonitor", "PrometheusRule"}
    if which in POSTGRES_SETS:
        assert "StatefulSet" not in validated and "NetworkPolicy" in validated
    if which == "postgres-url":
        assert {"Secret", "HorizontalPodAutoscaler"} <= validated


@pytest.mark.parametrize("which", VALUE_SETS)
def test_rendered_yaml_is_clean(chart: Chart, which: str) -> None:
    config = YamlLintConfig(
        "extends: default\n"
        "rules:\n"
        "  document-start: disable\n"
        "  line-length: {max: 160}\n"
        "  indentation: {spaces: 2, indent-sequences: whatever}\n"
    )
    for path, text in render(chart, VALUE_SETS[which]).items():
        if path.endswith(".yaml") and text.strip():
            problems = [f"{path}:{p.line}: {p.desc} ({p.rule})" for p in linter.run(text, config)]
            assert problems == []


# --- the programs' contract: settings, paths, ports ------------------------------------------------------


@pytest.mark.parametrize("which", VALUE_SETS)
def test_every_printrelay_variable_is_a_setting(chart: Chart, which: str) -> None:
    docs = manifests(chart, VALUE_SETS[which])
    known = {
        "relay": {env_name(f) for f in settings_of(RelayConfig).values()} | {"PRINTRELAY_CONFIG"},
        "connector": {env_name(f) for f in settings_of(ConnectorConfig).values()} | {"PRINTRELAY_CONFIG"},
    }
    workloads = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    assert workloads
    for workload in workloads:
        c = container(workload)
        names = {e["name"] for e in c["env"] if e["name"].startswith("PRINTRELAY_")}
        assert names, workload["metadata"]["name"]
        assert names <= known[c["name"]], names - known[c["name"]]


def relay_config(chart: Chart, values: dict[str, Any], tmp_path: Path) -> RelayConfig:
    """The RelayConfig the relay pod builds: its environment (the database URL from its Secret), and the
    ConfigMap's TOML as --config."""
    docs = manifests(chart, values)
    workload = relay_workload(docs)
    c = container(workload)
    assert c["args"] == ["serve"]
    env = pod_env(docs, c)
    (toml_mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == env["PRINTRELAY_CONFIG"]]
    config_map = find(docs, "ConfigMap", workload["metadata"]["name"])
    toml_file = tmp_path / "relay.toml"
    toml_file.write_text(config_map["data"][toml_mount["subPath"]])
    env["PRINTRELAY_CONFIG"] = str(toml_file)
    return load(RelayConfig, argparse.Namespace(), environ=env)


def connector_config(chart: Chart, values: dict[str, Any], tmp_path: Path) -> ConnectorConfig:
    """The ConnectorConfig the connector pod builds from its arguments, environment, TOML and token file
    (the Secret's key as the file the pod mounts, read as `printrelay connector` reads it)."""
    docs = manifests(chart, values)
    deployment = find(docs, "Deployment", connector_name(values))
    c = container(deployment)
    assert c["command"] == ["printrelay"]
    args = build_parser().parse_args(c["args"])
    env = plain_env(c)
    # The token only as a file: never in the environment, where any process of the pod could read it.
    assert "PRINTRELAY_TOKEN" not in {e["name"] for e in c["env"]}
    secret, key = mounted_secret(deployment, env["PRINTRELAY_TOKEN_FILE"])
    token_file = tmp_path / "token"
    token_file.write_text(secret_value(docs, secret, key) + "\n")
    env["PRINTRELAY_TOKEN_FILE"] = str(token_file)
    (toml_mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == env["PRINTRELAY_CONFIG"]]
    config_map = find(docs, "ConfigMap", deployment["metadata"]["name"])
    toml_file = tmp_path / "connector.toml"
    toml_file.write_text(config_map["data"][toml_mount["subPath"]])
    env["PRINTRELAY_CONFIG"] = str(toml_file)
    config = load(ConnectorConfig, args, environ=env)
    assert config.token_file == token_file and config.token == ""
    return with_token(config)


def connector_name(values: dict[str, Any]) -> str:
    return f"{values['fullnameOverride']}-connector" if "fullnameOverride" in values else CONNECTOR


def test_default_relay_settings(chart: Chart, tmp_path: Path) -> None:
    config = relay_config(chart, {}, tmp_path)
    assert config.listen == ("0.0.0.0", 8080)
    assert config.tunnel_listen == ("0.0.0.0", 8081)
    assert config.metrics_listen == ("0.0.0.0", 9464)
    assert config.data_dir == Path("/var/lib/printrelay")
    assert config.tls_cert is None and config.public_url == ""
    assert config.log_format == "json"
    # SQLite in the data directory, and the secret key made there at first start.
    assert config.database_url == "" and config.secret_key_file is None
    # Everything else keeps the program's defaults.
    assert config.max_job_bytes == RelayConfig().max_job_bytes


def test_full_relay_settings_reach_the_relay(chart: Chart, tmp_path: Path) -> None:
    config = relay_config(chart, FULL, tmp_path)
    assert config.max_job_bytes == 2 * 1024**3
    assert config.job_ttl == 7 * 86400
    assert config.max_attempts == 7
    assert config.retry_base == 0.5
    assert config.tenant_max_spool_bytes == 1073741824
    assert (config.rate_limit, config.rate_burst) == (12.5, 40)
    assert config.webhook_allow_private and config.metrics_per_printer
    assert config.public_url == "https://print.example.com"
    assert config.tls_cert == Path("/etc/printrelay/tls/tls.crt")
    assert config.tls_key == Path("/etc/printrelay/tls/tls.key")
    assert config.log_level == "debug"


def test_public_url_follows_the_ingress(chart: Chart, tmp_path: Path) -> None:
    values = {"ingress": {"enabled": True, "host": "relay.example.org", "tls": {"secretName": "t"}}}
    assert relay_config(chart, values, tmp_path).public_url == "https://relay.example.org"


def test_alternate_relay_binds_ipv6_ports(chart: Chart, tmp_path: Path) -> None:
    config = relay_config(chart, ALTERNATE, tmp_path)
    assert config.listen == ("::", 9080)
    assert config.metrics_listen == ("::", 9090)


def test_connector_settings_reach_the_connector(chart: Chart, tmp_path: Path) -> None:
    config = connector_config(chart, FULL, tmp_path)
    assert config.relay == ["wss://print.example.com/v1/tunnel"]
    assert config.token == "prc_example"
    assert [(p.id, p.uri) for p in config.printer] == [
        ("office", "ipp://10.0.0.5:631/ipp/print"),
        ("labels", "socket://10.0.0.9:9100"),
        ("old.lp", "lpd://10.0.0.7/lp"),
    ]
    assert config.state_dir == Path("/var/lib/printrelay-connector")
    assert config.name == "cluster-site" and config.drain_grace == 90
    assert config.max_jobs == 4 and config.discover and not config.discover_mdns
    assert config.discover_cidr == ["10.0.0.0/28", "10.0.1.0/28"]
    assert config.discover_ipp_port == [631, 8631]
    assert config.status_interval == 60
    assert config.metrics_listen == ("0.0.0.0", 9465)


def test_in_cluster_connector_with_existing_secret(chart: Chart, tmp_path: Path) -> None:
    docs = manifests(chart, ALTERNATE)
    assert not [d for d in docs if d["kind"] == "Secret"]
    deployment = find(docs, "Deployment", "relay-connector")
    token_file = plain_env(container(deployment))["PRINTRELAY_TOKEN_FILE"]
    assert mounted_secret(deployment, token_file) == ("site-token", "secret")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"] == {"name": "state", "emptyDir": {}}
    # A plain ws:// URL inside the cluster passes the connector's own check only with insecure.
    config = connector_config(chart, ALTERNATE, tmp_path)
    assert config.insecure and config.relay == ["ws://relay-tunnel:8081/v1/tunnel"]
    assert config.printer == [] and config.metrics_listen == ("::", 9465)
    assert config.token == "prc_cluster"


def test_connector_token_is_a_file_from_the_charts_secret(chart: Chart) -> None:
    docs = manifests(chart, FULL)
    deployment = find(docs, "Deployment", CONNECTOR)
    token_file = plain_env(container(deployment))["PRINTRELAY_TOKEN_FILE"]
    secret, key = mounted_secret(deployment, token_file)
    assert find(docs, "Secret", secret)["stringData"] == {key: "prc_example"}
    # Readable by the pod's group (fsGroup) only: the kubelet owns the files.
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "token")
    assert volume["secret"]["defaultMode"] == 0o440
    # The connector's replica count is fixed at one (see test_templates_refuse_contradictions).
    assert deployment["spec"]["replicas"] == 1


def test_chart_app_version_is_the_package_version() -> None:
    chart_meta = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart_meta["appVersion"] == project["version"]


async def test_probes_answer_on_a_real_relay(chart: Chart, tmp_path: Path) -> None:
    """The relay pod's probes, sent to a relay built from the pod's own settings (on free local ports)."""
    sts = find(manifests(chart, {}), "StatefulSet", RELAY)
    c = container(sts)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    config = relay_config(chart, {}, tmp_path)
    assert ports == {"http": config.listen[1], "tunnel": config.tunnel_listen[1], "metrics": 9464}
    assert config.metrics_listen is not None and config.metrics_listen[1] == ports["metrics"]
    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {p["port"] for p in probes.values()} == {"metrics"}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"

    local = ("127.0.0.1", 0)
    config = dataclasses.replace(
        config, listen=local, tunnel_listen=local, metrics_listen=local, data_dir=tmp_path / "data"
    )
    relay = Relay(config)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(15):
            addresses = await nursery.start(relay.run)
            assert addresses.metrics_port is not None
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{addresses.metrics_port}") as client:
                for kind, probe in probes.items():
                    response = await client.get(probe["path"])
                    assert response.status_code == 200, (kind, response.text)
        nursery.cancel_scope.cancel()


def test_tunnel_ingress_reaches_the_tunnel_listener(chart: Chart) -> None:
    docs = manifests(chart, FULL)
    api, tunnel = find(docs, "Ingress", RELAY), find(docs, "Ingress", f"{RELAY}-tunnel")
    (path,) = tunnel["spec"]["rules"][0]["http"]["paths"]
    assert path["path"] == TUNNEL_PATH and path["pathType"] == "Exact"
    service = find(docs, "Service", path["backend"]["service"]["name"])
    (port,) = service["spec"]["ports"]
    assert port["name"] == path["backend"]["service"]["port"]["name"]
    assert port["targetPort"] == "tunnel"
    # Long-lived WebSocket sessions: the tunnel's read timeout is far above the 45 s dead-session limit.
    assert int(tunnel["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert api["spec"]["rules"][0]["host"] == tunnel["spec"]["rules"][0]["host"] == "print.example.com"
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["loadBalancerSourceRanges"] == ["203.0.113.0/24"]


def test_relay_on_sqlite_is_one_stateful_replica(chart: Chart) -> None:
    for values in SQLITE_SETS.values():
        docs = manifests(chart, values)
        (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
        assert sts["spec"]["replicas"] == 1
        assert not [d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "NetworkPolicy")]
        assert "topologySpreadConstraints" not in sts["spec"]["template"]["spec"]
        assert not [e for e in container(sts)["env"] if "valueFrom" in e]
    sts = find(manifests(chart, {}), "StatefulSet", RELAY)
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container(sts)["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == plain_env(container(sts))["PRINTRELAY_DATA_DIR"]
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    alternate = find(manifests(chart, ALTERNATE), "StatefulSet", "relay")
    assert "volumeClaimTemplates" not in alternate["spec"]
    volumes = {v["name"]: v for v in alternate["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "relay-data"}


# --- relay replicas on PostgreSQL --------------------------------------------------------------------------


@pytest.mark.parametrize("which", POSTGRES_SETS)
def test_relay_on_postgres_is_a_deployment_of_replicas(chart: Chart, which: str) -> None:
    docs = manifests(chart, POSTGRES_SETS[which])
    deployment = relay_workload(docs)
    assert deployment["kind"] == "Deployment" and deployment["metadata"]["name"] == RELAY
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    # No claim for the relay (the connector keeps its state claim).
    claims = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert all(c["metadata"]["labels"]["app.kubernetes.io/component"] == "connector" for c in claims)
    assert f"{RELAY}-headless" not in {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    # Rolling updates: a new replica first, then an old one drains; never fewer ready than asked for.
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    pod = deployment["spec"]["template"]["spec"]
    # No volume but scratch: the data directory (per-host state) and /tmp are emptyDirs.
    volumes = {v["name"]: v for v in pod["volumes"]}
    data_dir = plain_env(container(deployment))["PRINTRELAY_DATA_DIR"]
    (data_mount,) = [m for m in container(deployment)["volumeMounts"] if m["mountPath"] == data_dir]
    assert set(volumes[data_mount["name"]]) == {"name", "emptyDir"}
    assert not [v for v in volumes.values() if "persistentVolumeClaim" in v]
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert spread["matchLabelKeys"] == ["pod-template-hash"]


def test_replicas_default_to_two_and_spread_over_nodes(chart: Chart) -> None:
    def spread_of(values: dict[str, Any]) -> list[dict[str, Any]]:
        pod = relay_workload(manifests(chart, values))["spec"]["template"]["spec"]
        return list(pod.get("topologySpreadConstraints", []))

    docs = manifests(chart, {"database": {"existingSecret": "printrelay-db"}})
    assert relay_workload(docs)["spec"]["replicas"] == 2
    assert not [d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "NetworkPolicy")]
    (spread,) = spread_of({"database": {"existingSecret": "printrelay-db"}})
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway" and spread["maxSkew"] == 1
    (spread,) = spread_of(POSTGRES)
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread["whenUnsatisfiable"] == "DoNotSchedule"
    assert (
        spread_of({"database": {"existingSecret": "db"}, "relay": {"topologySpread": {"enabled": False}}})
        == []
    )
    assert relay_workload(manifests(chart, POSTGRES))["spec"]["replicas"] == 3


@pytest.mark.parametrize("which", POSTGRES_SETS)
def test_database_url_reaches_the_relay_from_its_secret(chart: Chart, which: str, tmp_path: Path) -> None:
    values = POSTGRES_SETS[which]
    docs = manifests(chart, values)
    (entry,) = [e for e in container(relay_workload(docs))["env"] if e["name"] == "PRINTRELAY_DATABASE_URL"]
    ref = entry["valueFrom"]["secretKeyRef"]
    url = values["database"].get("url")
    if url:
        assert ref == {"name": f"{RELAY}-database", "key": "url"}
        assert find(docs, "Secret", ref["name"])["stringData"] == {"url": url}
    else:
        assert ref == {"name": "printrelay-db", "key": "dsn"}
        url = CLUSTER_SECRETS[("printrelay-db", "dsn")]
    # Never in a ConfigMap (nor anywhere in plain text but the chart's own Secret).
    for doc in docs:
        if doc["kind"] != "Secret":
            assert "postgresql://" not in yaml.safe_dump(doc), doc["metadata"]["name"]
    config = relay_config(chart, values, tmp_path)
    assert config.database_url == url
    assert config.secret_key_file == Path("/etc/printrelay/secret-key/secret.key")


@pytest.mark.parametrize("which", POSTGRES_SETS)
def test_replicas_share_one_secret_key(chart: Chart, which: str, tmp_path: Path) -> None:
    """The key file every replica reads comes from one Secret, and is a key the relay accepts."""
    values = POSTGRES_SETS[which]
    docs = manifests(chart, values)
    workload = relay_workload(docs)
    path = plain_env(container(workload))["PRINTRELAY_SECRET_KEY_FILE"]
    secret, key = mounted_secret(workload, path)
    if "secretKey" in values.get("relay", {}):
        assert (secret, key) == ("printrelay-key", "key")
        assert f"{RELAY}-secret-key" not in {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    else:
        # The chart's own: made once (lookup keeps it on upgrades), left behind on uninstall.
        assert (secret, key) == (f"{RELAY}-secret-key", "secret.key")
        own = find(docs, "Secret", secret)
        assert own["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    key_file = tmp_path / "secret.key"
    key_file.write_text(secret_value(docs, secret, key))
    assert len(base64.b64decode(key_file.read_text(), validate=True)) == KEY_BYTES
    SecretBox.load_or_create(key_file)


def test_relay_takes_its_key_from_a_read_only_secret_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kubernetes mounts Secret volumes read-only (the files readable through fsGroup): the relay must use
    the key file as it is, as the connector does its token file."""
    key_file = tmp_path / "secret.key"
    key_file.write_text(CLUSTER_SECRETS[("printrelay-key", "key")])
    key_file.chmod(0o440)
    chmod = os.chmod

    def read_only(path: Any, mode: int, *args: Any, **kwargs: Any) -> None:
        if Path(path) == key_file:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", read_only)
    SecretBox.load_or_create(key_file)


def test_existing_secret_key_on_sqlite(chart: Chart, tmp_path: Path) -> None:
    values = {"relay": {"secretKey": {"existingSecret": "printrelay-key", "key": "key"}}}
    docs = manifests(chart, values)
    sts = relay_workload(docs)
    assert sts["kind"] == "StatefulSet" and not [d for d in docs if d["kind"] == "Secret"]
    path = plain_env(container(sts))["PRINTRELAY_SECRET_KEY_FILE"]
    assert mounted_secret(sts, path) == ("printrelay-key", "key")
    assert relay_config(chart, values, tmp_path).secret_key_file == Path(path)


def test_autoscaler_and_disruption_budget(chart: Chart) -> None:
    docs = manifests(chart, POSTGRES_URL)
    deployment = relay_workload(docs)
    # The autoscaler owns the replica count.
    assert "replicas" not in deployment["spec"]
    hpa = find(docs, "HorizontalPodAutoscaler", RELAY)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": RELAY}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    pdb = find(docs, "PodDisruptionBudget", RELAY)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert find(manifests(chart, POSTGRES), "PodDisruptionBudget", RELAY)["spec"]["minAvailable"] == 2
    off = {"database": {"existingSecret": "db"}, "relay": {"podDisruptionBudget": {"enabled": False}}}
    assert not [d for d in manifests(chart, off) if d["kind"] == "PodDisruptionBudget"]


def test_network_policy(chart: Chart) -> None:
    docs = manifests(chart, POSTGRES)
    policy = find(docs, "NetworkPolicy", RELAY)
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == relay_workload(docs)["spec"]["selector"]["matchLabels"]
    # Ingress only: egress (PostgreSQL, DNS, webhooks) stays open.
    assert spec["policyTypes"] == ["Ingress"] and "egress" not in spec
    public, metrics = spec["ingress"]
    ports = {p["name"]: p["containerPort"] for p in container(relay_workload(docs))["ports"]}
    assert [p["port"] for p in public["ports"]] == [ports["http"], ports["tunnel"]]
    assert public["from"][0] == POSTGRES["networkPolicy"]["from"][0]
    # This release's connector reaches the tunnel too.
    connector = find(docs, "Deployment", CONNECTOR)
    assert {"podSelector": {"matchLabels": connector["spec"]["selector"]["matchLabels"]}} in public["from"]
    assert [p["port"] for p in metrics["ports"]] == [ports["metrics"]]
    assert metrics["from"] == POSTGRES["networkPolicy"]["metricsFrom"]
    # Without peers: the API and tunnel from anywhere, the metrics port from no pod.
    (open_rule,) = find(manifests(chart, POSTGRES_URL), "NetworkPolicy", RELAY)["spec"]["ingress"]
    assert "from" not in open_rule and [p["port"] for p in open_rule["ports"]] == [8080, 8081]


@pytest.mark.parametrize("which", VALUE_SETS)
def test_pods_run_locked_down(chart: Chart, which: str) -> None:
    for workload in [
        d for d in manifests(chart, VALUE_SETS[which]) if d["kind"] in ("StatefulSet", "Deployment")
    ]:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        c = container(workload)
        security = c["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        # The only writable places: the data (or state) directory and /tmp.
        env = plain_env(c)
        data = env.get("PRINTRELAY_DATA_DIR") or env["PRINTRELAY_STATE_DIR"]
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert {data, "/tmp"} <= writable
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


@pytest.mark.parametrize("which", VALUE_SETS)
def test_termination_leaves_time_to_drain(chart: Chart, which: str, tmp_path: Path) -> None:
    """The pod's grace covers the preStop pause, then the relay's drain_grace (as the relay reads it)."""
    workload = relay_workload(manifests(chart, VALUE_SETS[which]))
    pre_stop = container(workload)["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain_grace = relay_config(chart, VALUE_SETS[which], tmp_path).drain_grace
    grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop > 0 and grace >= pre_stop + drain_grace + 5
    assert container(workload)["readinessProbe"]["httpGet"]["path"] == "/readyz"


@pytest.mark.parametrize(
    ("relay", "grace"),
    [
        ({}, 10 + RelayConfig().drain_grace + 15),
        ({"settings": {"drain_grace": "1m"}}, 10 + 60 + 15),
        ({"settings": {"drain_grace": 2.5}, "preStopSleepSeconds": 5}, 5 + 3 + 15),
        ({"settings": {"drain_grace": "500ms"}}, 10 + 1 + 15),
        ({"settings": {"drain_grace": "1m"}, "extraEnv": [{"name": "PRINTRELAY_DRAIN_GRACE", "value": "2m"}]},
         10 + 120 + 15),
        ({"terminationGracePeriodSeconds": 35}, 35),
    ],
)  # fmt: skip
def test_termination_grace_is_computed_from_drain_grace(
    chart: Chart, relay: dict[str, Any], grace: int
) -> None:
    for database in ({}, {"existingSecret": "printrelay-db"}):
        workload = relay_workload(manifests(chart, {"relay": relay, "database": database}))
        assert workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == grace


def test_connector_termination_and_disruption_budget(chart: Chart) -> None:
    docs = manifests(chart, FULL)
    deployment = find(docs, "Deployment", CONNECTOR)
    grace = float(plain_env(container(deployment))["PRINTRELAY_DRAIN_GRACE"])
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pdb = find(docs, "PodDisruptionBudget", RELAY)
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]
    default_pdb = find(manifests(chart, {}), "PodDisruptionBudget", RELAY)
    assert default_pdb["spec"]["maxUnavailable"] == 1


def test_monitoring_uses_the_alert_rules_and_job_names(chart: Chart) -> None:
    docs = manifests(chart, FULL)
    rule = find(docs, "PrometheusRule", RELAY)
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    jobs = set()
    for monitor in [d for d in docs if d["kind"] == "ServiceMonitor"]:
        (endpoint,) = monitor["spec"]["endpoints"]
        selected = [
            d for d in docs
            if d["kind"] == "Service"
            and monitor["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
        ]  # fmt: skip
        assert len(selected) == 1 and selected[0]["spec"]["ports"][0]["name"] == endpoint["port"]
        (relabel,) = endpoint["relabelings"]
        assert relabel["targetLabel"] == "job"
        jobs.add(relabel["replacement"])
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    assert jobs == {"printrelay-relay", "printrelay-connector"}
    # The names the alert rules select on (docs/ops/alerts.yml).
    assert 'job="printrelay-relay"' in ALERTS.read_text()


# --- values.schema.json -------------------------------------------------------------------------------------


def schema_kind(cls: type[Any], field: dataclasses.Field[Any]) -> dict[str, Any]:
    """The JSON schema type a setting takes in values, derived from its declaration."""
    parse = field.metadata["parse"]
    if field.metadata["multiple"]:
        item = {"type": "integer"} if parse is int else {"type": "string"}
        return {"type": "array", "items": item}
    if parse is parse_size:
        return {"type": ["string", "integer"]}
    if parse is parse_duration:
        return {"type": ["string", "number"]}
    hint = typing.get_type_hints(cls)[field.name]
    return {
        bool: {"type": "boolean"},
        int: {"type": "integer"},
        float: {"type": "number"},
        str: {"type": "string"},
    }.get(hint, {"type": "string"})


@pytest.mark.parametrize(
    ("cls", "owned", "section"),
    [(RelayConfig, RELAY_CHART_OWNED, "relay"), (ConnectorConfig, CONNECTOR_CHART_OWNED, "connector")],
)
def test_schema_settings_are_the_dataclass_settings(
    chart: Chart, cls: type[Any], owned: set[str], section: str
) -> None:
    fields = settings_of(cls)
    assert owned <= set(fields), owned - set(fields)
    schema = chart.schema
    assert schema is not None
    properties = schema["properties"][section]["properties"]["settings"]["properties"]
    assert set(properties) == set(fields) - owned
    for name, prop in properties.items():
        expected = schema_kind(cls, fields[name])
        actual = {key: prop[key] for key in expected}
        if "items" in expected:
            actual["items"] = {"type": prop["items"]["type"]}
        assert actual == expected, name


def test_every_default_passes_the_schema(chart: Chart) -> None:
    def defaults(config: Any, owned: set[str]) -> dict[str, Any]:
        values = {name: getattr(config, name) for name in settings_of(type(config)) if name not in owned}
        return {k: str(v) if isinstance(v, Path) else v for k, v in values.items() if v is not None}

    relay = defaults(RelayConfig(), RELAY_CHART_OWNED)
    connector = defaults(ConnectorConfig(), CONNECTOR_CHART_OWNED)
    assert "max_job_bytes" in relay and "discover_ipp_port" in connector
    chart.validate_schema({"relay": {"settings": relay}, "connector": {"settings": connector}})
    for values in VALUE_SETS.values():
        chart.validate_schema(copy.deepcopy(values))


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"relay": {"settings": {"max_job_byte": "1GiB"}}}, "max_job_byte"),
        ({"relay": {"settings": {"listen": "0.0.0.0:80"}}}, "listen"),
        ({"relay": {"settings": {"max_job_bytes": "1 gigabyte"}}}, "max_job_bytes"),
        ({"relay": {"settings": {"job_ttl": "two weeks"}}}, "job_ttl"),
        ({"relay": {"settings": {"max_attempts": 2.5}}}, "max_attempts"),
        ({"relay": {"settings": {"webhook_allow_private": "yes"}}}, "webhook_allow_private"),
        ({"relay": {"replicas": 0}}, "replicas"),
        ({"relay": {"autoscaling": {"maxReplicas": "many"}}}, "maxReplicas"),
        ({"relay": {"topologySpread": {"whenUnsatisfiable": "Never"}}}, "whenUnsatisfiable"),
        ({"relay": {"settings": {"secret_key_file": "/key"}}}, "secret_key_file"),
        ({"relay": {"terminationGracePeriodSeconds": 0}}, "terminationGracePeriodSeconds"),
        ({"database": {"host": "db"}}, "host"),
        ({"networkPolicy": {"ingressFrom": []}}, "ingressFrom"),
        ({"connector": {"replicas": 0}}, "replicas"),
        ({"connector": {"settings": {"token_file": "/token"}}}, "token_file"),
        ({"relay": {"ports": {"http": 70000}}}, "http"),
        ({"relay": {"logLevel": "verbose"}}, "logLevel"),
        ({"relay": {"tunnel": {"service": {"type": "ExternalName"}}}}, "type"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"connector": {"printers": [{"id": "-bad", "uri": "ipp://p/ipp/print"}]}}, "id"),
        ({"connector": {"printers": [{"id": "p", "uri": "http://p/"}]}}, "uri"),
        ({"connector": {"printers": [{"id": "p", "uri": "cups:Queue"}]}}, "uri"),
        ({"connector": {"relayUrl": "https://relay.example.com"}}, "relayUrl"),
        ({"connector": {"settings": {"discover_ipp_port": ["ipp"]}}}, "discover_ipp_port"),
        ({"connector": {"settings": {"token": "prc_x"}}}, "token"),
        ({"unknown": True}, "unknown"),
    ],
)
def test_schema_rejects_bad_values(chart: Chart, values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(HelmError, match=re.escape(complaint)):
        chart.validate_schema(values)
    with pytest.raises(HelmError):
        render(chart, values)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"relay": {"tunnel": {"service": {"type": "LoadBalancer"}}}}, "relay.tls.secretName"),
        ({"connector": {"enabled": True, "token": {"value": "prc_x"}}}, "connector.relayUrl"),
        ({"connector": {"enabled": True, "relayUrl": "wss://r/v1/tunnel"}}, "connector.token"),
        ({"ingress": {"enabled": True, "host": ""}}, "ingress.host"),
    ],
)
def test_templates_refuse_incomplete_values(chart: Chart, values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(HelmError, match=re.escape(complaint)):
        render(chart, values)


DB = {"existingSecret": "printrelay-db"}


@pytest.mark.parametrize(
    ("values", "complaints"),
    [
        ({"relay": {"replicas": 2}},
         ["relay.replicas", "PostgreSQL", "database.existingSecret", "database.url"]),
        ({"relay": {"autoscaling": {"enabled": True}}},
         ["relay.autoscaling.enabled", "PostgreSQL", "database.existingSecret", "database.url"]),
        ({"database": {"url": "postgresql://db/p", "existingSecret": "db"}},
         ["database.url", "database.existingSecret"]),
        ({"database": {"existingSecret": "db", "existingSecretKey": ""}}, ["database.existingSecretKey"]),
        ({"database": {"url": "mysql://db/p"}}, ["database.url", "postgresql://"]),
        ({"database": DB, "relay": {"replicas": 3, "autoscaling": {"enabled": True}}},
         ["relay.replicas", "relay.autoscaling.enabled"]),
        ({"database": DB, "relay": {"autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 3}}},
         ["relay.autoscaling.minReplicas", "relay.autoscaling.maxReplicas"]),
        ({"database": DB, "relay": {"persistence": {"existingClaim": "data"}}},
         ["relay.persistence.existingClaim"]),
        ({"relay": {"secretKey": {"existingSecret": "k", "key": ""}}}, ["relay.secretKey.key"]),
        ({"relay": {"terminationGracePeriodSeconds": 30}},
         ["relay.terminationGracePeriodSeconds", "relay.preStopSleepSeconds", "drain_grace", "35"]),
        ({"database": DB, "relay": {"terminationGracePeriodSeconds": 60, "settings": {"drain_grace": "1m"}}},
         ["relay.terminationGracePeriodSeconds", "75"]),
        ({"connector": {"replicas": 2}},
         ["connector.replicas", "ledger", "two relay replicas", "its own token"]),
        ({"connector": {"enabled": True, "relayUrl": "wss://r/v1/tunnel",
                        "token": {"existingSecret": "t", "value": "prc_x"}}},
         ["connector.token.existingSecret", "connector.token.value"]),
    ],
)  # fmt: skip
def test_templates_refuse_contradictions(chart: Chart, values: dict[str, Any], complaints: list[str]) -> None:
    """Values that contradict each other fail rendering, and the message names the values to change."""
    chart.validate_schema(copy.deepcopy(values))
    with pytest.raises(HelmError) as refused:
        render(chart, values)
    for complaint in complaints:
        assert complaint in str(refused.value)


def test_printer_id_pattern_is_the_connectors(chart: Chart) -> None:
    schema = chart.schema
    assert schema is not None
    printer = schema["properties"]["connector"]["properties"]["printers"]["items"]["properties"]
    assert printer["id"]["pattern"] == PRINTER_ID_RE.pattern


def parses(parse: Any, text: str) -> bool:
    try:
        parse(text)
    except ValueError:
        return False
    return True


SIZES = ["1048576", "64KiB", "1 GiB", " 20MB ", "5k", "1.5g", "10b", "1x", "GiB", "1KiBB", "-1", "1ki"]
DURATIONS = ["30", "500ms", "15s", "10m", "14d", "1.5h", "1 d", "2w", "ms", "-5s", "5S"]


@pytest.mark.parametrize(
    ("setting", "parse", "text"),
    [("max_job_bytes", parse_size, t) for t in SIZES] + [("job_ttl", parse_duration, t) for t in DURATIONS],
)
def test_schema_patterns_agree_with_the_parsers(chart: Chart, setting: str, parse: Any, text: str) -> None:
    schema = chart.schema
    assert schema is not None
    pattern = schema["properties"]["relay"]["properties"]["settings"]["properties"][setting]["pattern"]
    assert (re.search(pattern, text) is not None) == parses(parse, text)


def test_alerts_file_is_the_ops_alerts() -> None:
    assert (CHART_DIR / "files" / "alerts.yml").resolve() == ALERTS.resolve()
