"""How a proxy is told which backends publish KV events: CLI flags (= env vars) or a backends JSON file."""
from __future__ import annotations

import json

import pytest

from proxy.config import ProxyConfig
from proxy.index.kv_events import KVEventSource


def test_kv_events_flags_pair_with_backends_by_position():
    cfg = ProxyConfig.from_cli(
        ["--backend", "http://a:8000", "--kv-events", "tcp://a:5557?topic=kv-events&replay=tcp://a:5558",
         "--backend", "b:8000", "--kv-events", "none", "--backend", "http://c:8000"],
        env={},
    )
    assert cfg.all_backends() == ["http://a:8000", "http://b:8000", "http://c:8000"]
    assert cfg.kv_event_sources() == {"http://a:8000": KVEventSource("tcp://a:5557", "kv-events", "tcp://a:5558")}


def test_kv_events_from_env_and_bad_values_are_cli_errors(capsys):
    cfg = ProxyConfig.from_cli([], env={"KVROUTE_BACKEND": "http://a:1,http://b:2", "KVROUTE_KV_EVENTS": "none,tcp://b:5557"})
    assert cfg.kv_event_sources() == {"http://b:2": KVEventSource("tcp://b:5557")}
    for argv in (["--kv-events", "tcp://x:1"], ["--backend", "http://a:1", "--kv-events", "tcp://x:1?color=red"],
                 ["--backend", "http://a:1", "--kv-events", "x:1"]):
        with pytest.raises(SystemExit):
            ProxyConfig.from_cli(argv, env={})
    assert "kv" in capsys.readouterr().err.lower()


def test_backends_json_file_entries(tmp_path):
    path = tmp_path / "backends.json"
    path.write_text(json.dumps([
        "http://plain:8000",
        {"url": "http://vllm-0:8000", "kv_events": {"endpoint": "tcp://vllm-0:5557", "topic": "kv-events", "replay_endpoint": "tcp://vllm-0:5558"}},
        {"url": "http://vllm-1:8000", "kv_events": "tcp://vllm-1:5557"},
    ]))
    cfg = ProxyConfig(backends_file=str(path))
    assert cfg.all_backends() == ["http://plain:8000", "http://vllm-0:8000", "http://vllm-1:8000"]
    assert cfg.kv_event_sources() == {
        "http://vllm-0:8000": KVEventSource("tcp://vllm-0:5557", "kv-events", "tcp://vllm-0:5558"),
        "http://vllm-1:8000": KVEventSource("tcp://vllm-1:5557"),
    }
    (tmp_path / "plain.txt").write_text("http://a:1  # comment\n\nb:2\n")
    assert ProxyConfig(backends_file=str(tmp_path / "plain.txt")).all_backends() == ["http://a:1", "http://b:2"]
