"""examples/kvroute.json is a config file the proxy accepts, and means what it says.

Loaded through the proxy's own loader (`ProxyConfig.from_cli(["--config", ...])`, what `python -m proxy
--config FILE` does): every key is a setting, every value arrives as written, and the precedence
docs/proxy.md states (file < env < flags) holds for it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.config import ProxyConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "kvroute.json"


def _load(*argv: str, env: dict[str, str] | None = None) -> ProxyConfig:
    return ProxyConfig.from_cli(["--config", str(EXAMPLE), *argv], env=env or {})


def test_every_setting_in_the_example_arrives_as_written():
    written = json.loads(EXAMPLE.read_text())
    cfg = _load()
    for key, value in written.items():
        assert getattr(cfg, key) == value, key
    assert written["backends"], "the example shows how backends are given"


def test_env_and_flags_win_over_the_file():
    cfg = _load("--port", "9000", env={"KVROUTE_STRATEGY": "round_robin"})
    assert (cfg.port, cfg.strategy) == (9000, "round_robin")
    assert cfg.backends == json.loads(EXAMPLE.read_text())["backends"]


def test_a_flag_name_is_not_a_key(tmp_path: Path):
    """The file's keys are the settings' names (`backends`), not the flag's (`--backend`): one line, exit 2."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"backend": ["http://127.0.0.1:8001"]}))
    with pytest.raises(SystemExit) as e:
        ProxyConfig.from_cli(["--config", str(bad)], env={})
    assert e.value.code == 2
