"""compose.yaml wires two proxy replicas to 4 emulators that publish KV events; checked through our own config parsers."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from emulator.config import EmulatorConfig
from emulator.kv_events import KVEventsConfig
from proxy.config import ProxyConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]


def _env(service: dict) -> dict[str, str]:
    """The service's environment; the admin key file (generated at run time by the admin-key service)
    is dropped: tests/deploy/test_secure_defaults.py checks it."""
    return {k: str(v) for k, v in service.get("environment", {}).items() if k != "KVROUTE_ADMIN_KEY_FILE"}


def test_proxy_routes_to_every_emulator_with_exact_kv_events(services):
    emulators = {name for name, s in services.items() if s.get("command", [])[-1:] == ["emulator"]}
    assert len(emulators) == 4
    proxy = ProxyConfig.from_cli([], env=_env(services["proxy"]))
    backends = proxy.all_backends()
    assert {urlparse(u).hostname for u in backends} == emulators
    sources = proxy.kv_event_sources()
    assert set(sources) == set(backends)
    for url, src in sources.items():
        assert urlparse(src.endpoint).hostname == urlparse(url).hostname
        assert src.replay_endpoint and urlparse(src.replay_endpoint).hostname == urlparse(url).hostname
    assert proxy.host == "0.0.0.0" and "8000-8001:8000" in services["proxy"]["ports"]
    for name in emulators:
        assert services["proxy"]["depends_on"][name]["condition"] == "service_healthy"


def test_emulator_services_publish_where_the_proxy_subscribes(services):
    proxy = ProxyConfig.from_cli([], env=_env(services["proxy"]))
    for url, src in proxy.kv_event_sources().items():
        emu = services[urlparse(url).hostname]
        cfg = EmulatorConfig.from_cli([], env=_env(emu))
        assert cfg.host == "0.0.0.0" and cfg.port == urlparse(url).port
        ev = KVEventsConfig.from_dict(cfg.kv_events_config)
        assert ev.enable_kv_cache_events and ev.topic == src.topic
        assert urlparse(ev.endpoint.replace("*", "x")).port == urlparse(src.endpoint).port
        assert f":{cfg.port}/health" in " ".join(emu["healthcheck"]["test"])


def test_two_proxy_replicas_share_what_they_route(services):
    """Two replicas of one service; the service's DNS name resolves to both, so each follows the other."""
    proxy_service = services["proxy"]
    replicas = proxy_service["deploy"]["replicas"]
    assert replicas == 2
    lo, _, hi = proxy_service["ports"][0].partition(":")[0].partition("-")
    assert int(hi) - int(lo) + 1 == replicas  # one host port per replica
    proxy = ProxyConfig.from_cli([], env=_env(proxy_service))
    assert proxy.peers == ["dns://proxy:5600"] and proxy.replica_bind_address() == "tcp://*:5600"
    assert proxy.worker_count() == 1
