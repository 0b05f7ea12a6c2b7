"""A real proxy with embedded emulators on loopback (port 0), time-scaled so runs take milliseconds."""
import pytest

from loadgen.stack import managed_proxy

FAST = 0.02  # wall seconds per emulated second: 50x faster


@pytest.fixture
async def stack():
    async with managed_proxy(None, FAST, backends=2, spawn="inprocess") as s:
        yield s.target
