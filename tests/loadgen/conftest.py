"""A real proxy with embedded emulators on loopback (port 0), time-scaled so runs take milliseconds."""
import pytest

from loadgen.backend_metrics import base_url

FAST = 0.02  # wall seconds per emulated second: 50x faster


@pytest.fixture
async def stack():
    from proxy.config import ProxyConfig
    from proxy.server import start_proxy

    running = await start_proxy(ProxyConfig(host="127.0.0.1", port=0, time_scale=FAST, emulators=2,
                                            log_level="warning"))
    try:
        yield base_url(running.url) + "/v1"
    finally:
        await running.stop()
