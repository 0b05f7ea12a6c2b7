"""The shipped deployments refuse unauthenticated admin calls (issue #24), checked without a Docker engine:
the image binds 0.0.0.0 with no key (admin API disabled), compose generates a key and hands it to the proxy."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from proxy.edge.admin_auth import DISABLED, KEYED, AdminGate
from proxy.config import ProxyConfig

from .dockerfile_check import parse_dockerfile

ROOT = Path(__file__).resolve().parents[2]


def _image_env() -> dict[str, str]:
    """The runtime stage's ENV, as `docker run` without -e gives it to the proxy."""
    ins = parse_dockerfile(ROOT / "Dockerfile")
    last = max(i.stage for i in ins)
    env: dict[str, str] = {}
    for i in ins:
        if i.stage == last and i.keyword == "ENV":
            for word in shlex.split(i.args):
                k, _, v = word.partition("=")
                env[k] = v
    return env


def test_docker_run_without_a_key_disables_the_admin_api():
    env = {k: v for k, v in _image_env().items() if k.startswith("KVROUTE_")}
    assert env["KVROUTE_HOST"] == "0.0.0.0" and "KVROUTE_ADMIN_KEY" not in env
    cfg = ProxyConfig.from_cli([], env=env)
    assert AdminGate(cfg.admin_key, cfg.host).mode == DISABLED
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "KVROUTE_ADMIN_KEY_FILE" in dockerfile and "/var/lib/kvroute" in dockerfile


def test_compose_generates_a_key_only_the_proxy_reads(tmp_path):
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    proxy, gen = services["proxy"], services["admin-key"]
    key_file = proxy["environment"]["KVROUTE_ADMIN_KEY_FILE"]
    volume = next(v for v in proxy["volumes"] if v.startswith("kvroute-secrets:"))
    assert volume.endswith(":ro") and key_file.startswith(volume.split(":")[1] + "/")
    assert proxy["depends_on"]["admin-key"]["condition"] == "service_completed_successfully"
    assert any(v.split(":")[0] == "kvroute-secrets" for v in gen["volumes"])
    for name, s in services.items():  # no other service sees the key
        if name not in ("proxy", "admin-key"):
            assert not any(str(v).startswith("kvroute-secrets") for v in s.get("volumes", [])), name
    # The generator's command, run against a scratch directory: a fresh key, mode 0600, kept on a rerun.
    cmd = gen["command"]
    assert cmd[:2] == ["python", "-c"]
    code = cmd[2].replace("/var/lib/kvroute", str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    path = tmp_path / "admin_key"
    first = path.read_text()
    assert len(first) >= 32 and (path.stat().st_mode & 0o777) == 0o600
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert path.read_text() == first
    env = {k: str(v) for k, v in proxy["environment"].items()}
    env["KVROUTE_ADMIN_KEY_FILE"] = str(path)
    cfg = ProxyConfig.from_cli([], env=env)
    assert cfg.admin_key == first and AdminGate(cfg.admin_key, cfg.host).mode == KEYED


def test_compose_sets_no_literal_admin_key():
    proxy = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["proxy"]
    assert "KVROUTE_ADMIN_KEY" not in proxy["environment"]


def test_kubernetes_takes_the_admin_key_from_a_secret_only():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text()))
    container = next(d for d in docs if d and d.get("kind") == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["KVROUTE_HOST"]["value"] == "0.0.0.0"
    assert "value" not in env["KVROUTE_ADMIN_KEY"] and env["KVROUTE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["name"]
    # Without the Secret (it is optional) the pod starts with the admin API refused to everyone.
    plain = {k: e["value"] for k, e in env.items() if "value" in e and k in ("KVROUTE_HOST", "KVROUTE_PORT")}
    cfg = ProxyConfig.from_cli([], env=plain)
    assert AdminGate(cfg.admin_key, cfg.host).mode == DISABLED
