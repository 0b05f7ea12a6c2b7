"""deploy/kubernetes/ against the Kubernetes API schema, offline, and against our own config parsers.

The schema is the `kubernetes` package's generated models (one per API type, with every field's
JSON name and type): each manifest is walked strictly (an unknown or misspelt key, a wrong type,
a missing required field fail) and then deserialised by the client itself. Then the pieces must fit:
the pods' env parses as a ProxyConfig with the ConfigMap's backends file, the headless Service
and the replica bind agree on the port, probes and scrape annotations name the proxy's routes.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes", reason="the `kubernetes` package (test extra) holds the API schema")
from kubernetes import client as k8s  # noqa: E402

from proxy.config import ProxyConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object, "datetime": str, "date": str}


def schema_errors(data, type_name: str, path: str = "") -> list[str]:
    """Where `data` does not fit the API type `type_name` (a model class name or `list[...]`/`dict(str, ...)`)."""
    if type_name.lower().startswith("list["):
        if not isinstance(data, list):
            return [f"{path}: expected a list, got {type(data).__name__}"]
        return [e for i, item in enumerate(data) for e in schema_errors(item, type_name[5:-1], f"{path}[{i}]")]
    if type_name.lower().startswith(("dict(", "dict[")):
        if not isinstance(data, dict):
            return [f"{path}: expected a map, got {type(data).__name__}"]
        inner = type_name[5:-1].split(", ", 1)[1]
        return [e for k, v in data.items() for e in schema_errors(v, inner, f"{path}.{k}")]
    if type_name in _PRIMITIVES:
        ok = isinstance(data, _PRIMITIVES[type_name]) and not (type_name in ("int", "float") and isinstance(data, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {type(data).__name__} {data!r}"]
    model = getattr(k8s, type_name)
    if not isinstance(data, dict):
        return [f"{path}: expected a {type_name} object, got {type(data).__name__}"]
    by_json = {j: a for a, j in model.attribute_map.items()}
    errors = [f"{path}.{k}: not a field of {type_name}" for k in data if k not in by_json]
    for k, v in data.items():
        if k in by_json and v is not None:
            errors += schema_errors(v, model.openapi_types[by_json[k]], f"{path}.{k}")
    return errors


def model_name(doc: dict) -> str:
    version = doc["apiVersion"].rpartition("/")[2]
    return version[0].upper() + version[1:] + doc["kind"]


def validate(doc: dict) -> list[str]:
    name = model_name(doc)
    if not hasattr(k8s, name):
        return [f"{doc.get('kind')}: no API type {name}"]
    errors = schema_errors(doc, name, doc["kind"])
    if not errors:
        try:  # the client's own deserialisation: required fields, enums it checks client-side
            k8s.ApiClient()._ApiClient__deserialize(doc, name)
        except (ValueError, TypeError) as e:
            errors.append(f"{doc['kind']}: {e}")
    return errors


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    out = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def test_every_manifest_fits_the_kubernetes_api_schema(docs):
    assert set(docs) == {"ConfigMap/kvroute-backends", "Service/kvroute", "Service/kvroute-peers", "Deployment/kvroute"}
    for key, doc in docs.items():
        assert validate(doc) == [], key


@pytest.mark.parametrize("break_it, expected", [
    (lambda d: d["spec"].update(replica=3), "not a field of V1DeploymentSpec"),
    (lambda d: d["spec"].update(replicas="two"), "expected int"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"), "name"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"].update(paht="/health"),
     "not a field of V1HTTPGetAction"),
])
def test_the_validator_rejects_a_broken_deployment(docs, break_it, expected):
    doc = yaml.safe_load(yaml.safe_dump(docs["Deployment/kvroute"]))
    break_it(doc)
    errors = validate(doc)
    assert errors and any(expected in e for e in errors), errors


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_the_pods_configure_replicas_that_find_each_other(docs, tmp_path):
    dep = docs["Deployment/kvroute"]
    pod = dep["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    cm = docs["ConfigMap/kvroute-backends"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "backends")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "backends")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    env = _env(container)
    assert env["KVROUTE_BACKENDS_FILE"] == f"{mount['mountPath']}/backends.json"
    (tmp_path / "backends.json").write_text(cm["data"]["backends.json"])
    env["KVROUTE_BACKENDS_FILE"] = str(tmp_path / "backends.json")
    config = ProxyConfig.from_cli([], env=env)
    assert len(config.all_backends()) >= 2 and set(config.kv_event_sources()) == set(config.all_backends())
    assert dep["spec"]["replicas"] >= 2 and config.worker_count() == 1

    # Peers: the headless Service's name and port, the same port this replica binds; replay on the next.
    peers = docs["Service/kvroute-peers"]
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"] is True
    (peer,) = config.peers
    m = re.fullmatch(r"dns://([\w.-]+):(\d+)", peer)
    assert m and m.group(1).split(".")[0] == peers["metadata"]["name"]
    port = int(m.group(2))
    assert config.replica_bind_address() == f"tcp://*:{port}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["replica"] == port and ports["replica-replay"] == port + 1
    assert {p["port"] for p in peers["spec"]["ports"]} == {port, port + 1}

    # Both Services select the pods; clients reach the proxy's port.
    labels = pod["metadata"]["labels"]
    for svc in (docs["Service/kvroute"], peers):
        assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert ports["http"] == config.port == docs["Service/kvroute"]["spec"]["ports"][0]["port"]
    assert config.host == "0.0.0.0"

    # Probes on /health, Prometheus on /metrics of the same port.
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == config.port
    assert pod["spec"]["terminationGracePeriodSeconds"] > config.shutdown_grace
