"""A host reboot: kernel state gone, store intact (a fresh namespace plays the rebooted host)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..plugin_process import CallError, EngineClient, PluginProcess
from .conftest import Netns, new_netns
from .test_durability import NID, POOL_ID, eid, make_network, start_endpoint


async def test_networks_come_back_and_dead_endpoints_release_their_addresses(
    netns: Netns, short_tmp: Path
) -> None:
    p = PluginProcess(
        socket_path=short_tmp / "pd.sock",
        state_dir=short_tmp / "state",
        netns=netns.name,
        prefix="pk",
    )
    p.start()
    try:
        async with EngineClient(p.socket_path) as c:
            await make_network(c)
            addr = await start_endpoint(c, 1)
            await c.call(
                "NetworkDriver.ProgramExternalConnectivity",
                {
                    "NetworkID": NID,
                    "EndpointID": eid(1),
                    "Options": {
                        "com.docker.network.portmap": [
                            {"Proto": 6, "Port": 80, "HostPort": 18080, "HostPortEnd": 18080}
                        ]
                    },
                },
            )
    finally:
        p.stop()

    with new_netns() as rebooted:
        p.netns = rebooted.name
        p.start()
        try:
            bridge = "pkb" + NID[:12]
            assert rebooted.link(bridge) is not None
            assert "10.66.0.1/16" in rebooted.addresses(bridge)
            save = rebooted.iptables_save()
            assert f"-A PK-F-{bridge} -i {bridge} -o {bridge} -j ACCEPT" in save
            assert "-A FORWARD -m comment --comment pk-driver -j PK-FORWARD" in save
            assert "--dport 18080" not in save, "the dead endpoint's published port is gone"
            assert not any(n.startswith(("pkh", "pkc")) for n in rebooted.names())
            async with EngineClient(p.socket_path) as c:
                # The dead endpoint's address is free again: it can be requested explicitly.
                got = await c.call(
                    "IpamDriver.RequestAddress",
                    {"PoolID": POOL_ID, "Address": addr.split("/")[0], "Options": None},
                )
                assert got["Address"] == addr
                with pytest.raises(CallError) as exc:
                    await c.call(
                        "NetworkDriver.Join",
                        {"NetworkID": NID, "EndpointID": eid(1), "SandboxKey": "/x"},
                    )
                assert exc.value.status == 500 and "unknown" in exc.value.body["Err"]
                await start_endpoint(c, 2)  # the network works for new containers
        finally:
            p.stop()
