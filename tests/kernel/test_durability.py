"""kill -9 and restart of the real daemon keep every network, endpoint and address.

The plugin runs as its own process in a throwaway namespace; the oracles are the engine's view
(protocol answers), the kernel (``ip -json``) and the SQLite file read independently.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import random
import signal
import sqlite3

import pytest

from ..plugin_process import CallError, EngineClient, PluginProcess
from .conftest import Netns

POOL = {"AddressSpace": "PouchLocal", "Pool": "10.66.0.0/16", "SubPool": "", "V6": False}
POOL_ID = "PouchLocal/10.66.0.0/16"
NID = hashlib.sha256(b"net").hexdigest()


def eid(i: int) -> str:
    return hashlib.sha256(f"ep{i}".encode()).hexdigest()


async def make_network(c: EngineClient) -> None:
    await c.call("IpamDriver.RequestPool", POOL)
    gw = await c.call(
        "IpamDriver.RequestAddress",
        {
            "PoolID": POOL_ID,
            "Address": "",
            "Options": {"RequestAddressType": "com.docker.network.gateway"},
        },
    )
    await c.call(
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": NID,
            "Options": {"com.docker.network.generic": {}},
            "IPv4Data": [
                {"AddressSpace": "PouchLocal", "Pool": POOL["Pool"], "Gateway": gw["Address"]}
            ],
        },
    )


async def start_endpoint(c: EngineClient, i: int) -> str:
    addr = (
        await c.call(
            "IpamDriver.RequestAddress", {"PoolID": POOL_ID, "Address": "", "Options": None}
        )
    )["Address"]
    await c.call(
        "NetworkDriver.CreateEndpoint",
        {
            "NetworkID": NID,
            "EndpointID": eid(i),
            "Interface": {"Address": addr, "AddressIPv6": "", "MacAddress": ""},
            "Options": {},
        },
    )
    await c.call(
        "NetworkDriver.Join",
        {"NetworkID": NID, "EndpointID": eid(i), "SandboxKey": f"/var/run/docker/netns/{i:012x}"},
    )
    return addr


def veths(netns: Netns) -> set[str]:
    return {n for n in netns.names() if n.startswith(("pkh", "pkc"))}


def stored(plugin: PluginProcess) -> tuple[set[str], set[str]]:
    """(endpoint IDs, allocated addresses) straight from the SQLite file."""
    db = sqlite3.connect(f"file:{plugin.state_dir / 'state.db'}?mode=ro", uri=True)
    try:
        eps = {r[0] for r in db.execute("SELECT endpoint_id FROM endpoints")}
        addrs = {r[0] for r in db.execute("SELECT address FROM addresses")}
    finally:
        db.close()
    return eps, addrs


async def test_kill_9_then_restart_keeps_everything(plugin: PluginProcess, netns: Netns) -> None:
    async with EngineClient(plugin.socket_path) as c:
        await make_network(c)
        addrs = [await start_endpoint(c, i) for i in range(6)]
    assert plugin.signal(signal.SIGKILL) == -signal.SIGKILL
    plugin.start()
    async with EngineClient(plugin.socket_path) as c:
        # The first request after the restart can be anything: here, a Join made before.
        j = await c.call(
            "NetworkDriver.Join",
            {"NetworkID": NID, "EndpointID": eid(2), "SandboxKey": "/var/run/docker/netns/x"},
        )
        assert j["InterfaceName"]["SrcName"] == "pkc" + eid(2)[:12]
        for a in addrs:  # every answered address is still held
            with pytest.raises(CallError) as exc:
                await c.call(
                    "IpamDriver.RequestAddress",
                    {"PoolID": POOL_ID, "Address": a.split("/")[0], "Options": None},
                )
            assert exc.value.status == 409
        fresh = (
            await c.call(
                "IpamDriver.RequestAddress", {"PoolID": POOL_ID, "Address": "", "Options": None}
            )
        )["Address"]
        assert fresh not in addrs
        assert len(veths(netns)) == 12
        await c.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": eid(0)})
        # The veth is deleted just after the answer (off the request path): wait for it.
        for _ in range(100):
            if len(veths(netns)) == 10:
                break
            await asyncio.sleep(0.05)
        assert len(veths(netns)) == 10
    bridge = netns.link("pkb" + NID[:12])
    assert bridge is not None and "10.66.0.1/16" in netns.addresses("pkb" + NID[:12])


async def test_sigterm_shuts_down_gracefully(plugin: PluginProcess) -> None:
    async with EngineClient(plugin.socket_path) as c:
        await make_network(c)
    assert plugin.signal(signal.SIGTERM) == 0
    assert not plugin.socket_path.exists(), "the socket file is removed on shutdown"
    plugin.start()
    async with EngineClient(plugin.socket_path) as c:
        doc = await c.call(
            "NetworkDriver.CreateEndpoint",
            {
                "NetworkID": NID,
                "EndpointID": eid(1),
                "Interface": {"Address": "10.66.0.9/16", "AddressIPv6": "", "MacAddress": ""},
            },
        )
        assert doc["Interface"]["MacAddress"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_kill_9_at_a_random_instant_of_a_churn(
    plugin: PluginProcess, netns: Netns, seed: int
) -> None:
    """Answered requests survive; nothing half-made is left after the restart's reconcile."""
    rng = random.Random(seed)
    async with EngineClient(plugin.socket_path) as c:
        await make_network(c)
    answered: dict[int, str] = {}  # endpoint index -> address, for answered lifecycles
    released: set[str] = set()

    async def churn(c: EngineClient, i: int) -> None:
        answered[i] = await start_endpoint(c, i)
        if i % 3 == 0:
            await c.call("NetworkDriver.Leave", {"NetworkID": NID, "EndpointID": eid(i)})
            await c.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": eid(i)})
            released.add(answered[i])  # once sent, the release may have happened
            await c.call(
                "IpamDriver.ReleaseAddress",
                {"PoolID": POOL_ID, "Address": answered[i].split("/")[0]},
            )

    async with EngineClient(plugin.socket_path) as c:
        tasks = [asyncio.create_task(churn(c, i)) for i in range(80)]
        await asyncio.sleep(rng.uniform(0.05, 0.6))
        plugin.signal(signal.SIGKILL)
        await asyncio.gather(*tasks, return_exceptions=True)
    plugin.start()
    eps, addrs = stored(plugin)
    held = {a.split("/")[0] for i, a in answered.items() if a not in released}
    # Every address whose lifecycle was answered and not released is still allocated.
    assert held <= addrs, plugin.log()
    # Store and kernel agree after start-up reconcile: a veth pair for each endpoint, no more.
    want = {f"pk{k}{e[:12]}" for e in eps for k in "hc"}
    assert veths(netns) == want
    # Addresses of stored endpoints are allocated; no address is stored twice.
    db = sqlite3.connect(f"file:{plugin.state_dir / 'state.db'}?mode=ro", uri=True)
    docs = [r[0] for r in db.execute("SELECT doc FROM endpoints")]
    db.close()
    ep_addrs = [ipaddress.ip_interface(d.split('"address": "')[1].split('"')[0]).ip for d in docs]
    assert len(set(ep_addrs)) == len(ep_addrs)
    assert {str(a) for a in ep_addrs} <= addrs
    async with EngineClient(plugin.socket_path) as c:  # the engine's next operations succeed
        await start_endpoint(c, 1000)
        await c.call("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": eid(1000)})


def test_a_damaged_store_stops_start_up_and_is_never_reset(
    plugin: PluginProcess, netns: Netns
) -> None:
    plugin.signal(signal.SIGTERM)
    db = plugin.state_dir / "state.db"
    db.write_bytes(db.read_bytes()[:700])  # truncated mid-page
    (plugin.state_dir / "state.db-wal").unlink(missing_ok=True)
    damaged = db.read_bytes()
    with pytest.raises(RuntimeError, match="plugin exited with 1") as exc:
        plugin.start(timeout=15)
    assert "is damaged" in str(exc.value) and "left untouched" in str(exc.value)
    assert db.read_bytes() == damaged
    assert not plugin.socket_path.exists(), "no socket is left for the engine to hang on"
