"""docs/replicas.md cannot rot: every command in it parses with the real CLI parsers and files it names exist."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from proxy.config import ProxyConfig

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "replicas.md"


def commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("command", commands())
def test_command_parses(command, monkeypatch):
    argv = shlex.split(command)
    if argv[:3] == ["python", "-m", "proxy"]:
        config = ProxyConfig.from_cli(argv[3:], env={})
        assert config.all_backends()
        if config.peers:
            assert config.replica_bind_address()
    elif argv[:3] == ["python", "-m", "benchmarks.replicas"]:
        from benchmarks import replicas

        monkeypatch.setattr(replicas, "one_run", lambda *a, **k: pytest.skip("parsed; the runs take minutes"))
        replicas.main(argv[3:])
    elif argv[:3] == ["python", "-m", "benchmarks.replica_cost"]:
        from benchmarks import replica_cost

        async def parsed(*a, **k):
            pytest.skip("parsed; the run takes a minute")

        monkeypatch.setattr(replica_cost, "run", parsed)
        replica_cost.main(argv[3:])
    elif argv[0] == "kubectl":
        assert argv[1] in ("apply", "scale")
        if argv[1] == "apply":
            assert (ROOT / argv[3]).is_dir() and list((ROOT / argv[3]).glob("*.yaml"))
    else:
        pytest.fail(f"no check for {command!r}")


def test_figures_name_the_command_that_made_them():
    text = DOC.read_text()
    assert "python -m benchmarks.replicas" in text and "| replicas | sharing | hit rate |" in text
