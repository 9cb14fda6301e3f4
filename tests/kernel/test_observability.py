"""Logs carry request and object IDs; metrics are opt-in and only on loopback or a socket."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import aiohttp

from ..plugin_process import CallError, EngineClient, PluginProcess
from .conftest import Netns
from .test_durability import NID, make_network, start_endpoint


async def test_json_logs_and_metrics(netns: Netns, short_tmp: Path) -> None:
    metrics_sock = short_tmp / "m.sock"
    p = PluginProcess(
        socket_path=short_tmp / "pd.sock",
        state_dir=short_tmp / "state",
        netns=netns.name,
        prefix="pk",
        extra_args=["--metrics", f"unix:{metrics_sock}", "--log-format", "json"],
    )
    p.start()
    async with EngineClient(p.socket_path) as c:
        await make_network(c)
        await start_endpoint(c, 7)
        with contextlib.suppress(CallError):  # an unknown network: one error to count
            await c.call(
                "NetworkDriver.CreateEndpoint", {"NetworkID": "f" * 64, "EndpointID": "e" * 64}
            )
    try:
        conn = aiohttp.UnixConnector(path=str(metrics_sock))
        async with (
            aiohttp.ClientSession(connector=conn) as s,
            s.get("http://localhost/metrics") as r,
        ):
            text = await r.text()
        assert r.status == 200
        assert 'pouch_driver_request_seconds_count{call="NetworkDriver.CreateEndpoint"} 2' in text
        assert 'pouch_driver_errors_total{call="NetworkDriver.CreateEndpoint"} 1' in text
        assert f'pouch_driver_endpoints{{network="{NID[:12]}"}} 1' in text
        assert 'pouch_driver_pool_addresses_used{pool="10.66.0.0/16",space="PouchLocal"} 2' in text
        assert 'pouch_driver_pool_addresses{pool="10.66.0.0/16",space="PouchLocal"} 65534' in text
        assert oct(metrics_sock.stat().st_mode & 0o777) == "0o660"
    finally:
        p.stop()
    lines = [json.loads(line) for line in p.log().splitlines() if line.startswith("{")]
    served = [d for d in lines if "NetworkDriver.Join" in d["msg"] and "-> 200" in d["msg"]]
    assert served, "one JSON log line per answered request"
    assert served[0]["request"] != "-" and f"NetworkID='{NID[:12]}'" in served[0]["msg"]


def test_metrics_only_on_loopback_or_a_socket(short_tmp: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pouch_driver",
            "serve",
            "--socket",
            str(short_tmp / "x.sock"),
            "--state-dir",
            str(short_tmp / "s"),
            "--metrics",
            "0.0.0.0:9105",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2
    assert "not loopback" in out.stderr
    assert not (short_tmp / "x.sock").exists()
