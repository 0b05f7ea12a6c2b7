"""A real proxy with embedded emulators on loopback (port 0), time-scaled so runs take milliseconds."""
import pytest

from loadgen.stack import managed_proxy

FAST = 0.02  # wall seconds per emulated second: 50x faster
# At 50x the 2 cores cannot keep the emulators' steps on time (loadgen.validity would mark every run
# invalid): tests that check a sweep's tables, not its figures, switch the mark off.
MECHANICS_ONLY = {"lateness_limit": 0.0}


@pytest.fixture
async def stack():
    async with managed_proxy(None, FAST, backends=2, spawn="inprocess") as s:
        yield s.target
