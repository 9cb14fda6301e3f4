"""The engine's side of the stress test, as its own process (the engine is another process:
its work must not count as the plugin's event-loop stalls).

``python -m tests.kernel.stress_client SOCKET NETWORKS PER_NETWORK MODE`` creates the networks,
runs every endpoint lifecycle concurrently and prints one JSON document with what it observed.

MODE ``paced`` is an engine starting 200 containers: starts spread over 0.5 s, a few ms of the
engine's own work between calls, each container up for 1 s (so all 200 are up together).
MODE ``burst`` fires every call of a step for all lifecycles at the same instant: the harshest
load a single event loop can get.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from ..plugin_process import EngineClient

GATEWAY = {"RequestAddressType": "com.docker.network.gateway"}


def nid(i: int) -> str:
    return hashlib.sha256(f"stress-net-{i}".encode()).hexdigest()


def eid(i: int) -> str:
    return hashlib.sha256(f"stress-ep-{i}".encode()).hexdigest()


class Client(EngineClient):
    """The engine's client without aiohttp's 100-connection cap: 200 requests really overlap
    (dockerd's HTTP transport has no per-host connection limit either)."""

    def __init__(self, socket_path: Path) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(socket_path), limit=0),
            timeout=aiohttp.ClientTimeout(total=120),
        )


async def make_network(c: EngineClient, i: int, subnet: str) -> str:
    pool = await c.call(
        "IpamDriver.RequestPool", {"AddressSpace": "PouchLocal", "Pool": subnet, "V6": False}
    )
    gw = await c.call(
        "IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": GATEWAY}
    )
    await c.call(
        "NetworkDriver.CreateNetwork",
        {
            "NetworkID": nid(i),
            "Options": {"com.docker.network.generic": {}},
            "IPv4Data": [{"AddressSpace": "PouchLocal", "Pool": subnet, "Gateway": gw["Address"]}],
        },
    )
    return str(pool["PoolID"])


class Ledger:
    """Addresses held by live endpoints, checked at every allocation: never two at once."""

    def __init__(self) -> None:
        self.live: dict[str, str] = {}  # address -> endpoint
        self.peak = 0
        self.duplicates: list[str] = []

    def take(self, address: str, owner: str) -> None:
        if address in self.live:
            self.duplicates.append(f"{address} to {owner[:12]} while {self.live[address][:12]}")
        self.live[address] = owner
        self.peak = max(self.peak, len(self.live))

    def drop(self, address: str) -> None:
        del self.live[address]


async def lifecycle(
    c: EngineClient, ledger: Ledger, net: str, pool_id: str, i: int, *, paced: bool
) -> None:
    """What the engine sends for `docker run` then `docker rm -f` (docs/protocol.md §5.2, §5.4)."""
    rng = random.Random(i)

    async def engine_work(seconds: float = 0.0) -> None:
        if paced:
            await asyncio.sleep(seconds or rng.uniform(0.001, 0.02))

    ep = eid(i)
    if paced:
        await asyncio.sleep(rng.uniform(0, 0.5))
    addr = (
        await c.call(
            "IpamDriver.RequestAddress", {"PoolID": pool_id, "Address": "", "Options": None}
        )
    )["Address"]
    ledger.take(addr, ep)
    await engine_work()
    await c.call(
        "NetworkDriver.CreateEndpoint",
        {
            "NetworkID": net,
            "EndpointID": ep,
            "Options": {},
            "Interface": {"Address": addr, "AddressIPv6": "", "MacAddress": ""},
        },
    )
    await engine_work()
    await c.call(
        "NetworkDriver.Join",
        {"NetworkID": net, "EndpointID": ep, "SandboxKey": f"/var/run/docker/netns/{i:012x}"},
    )
    await engine_work()
    await c.call(
        "NetworkDriver.ProgramExternalConnectivity",
        {"NetworkID": net, "EndpointID": ep, "Options": {}},
    )
    await engine_work(1.0)  # the container runs
    await c.call("NetworkDriver.RevokeExternalConnectivity", {"NetworkID": net, "EndpointID": ep})
    await engine_work()
    await c.call("NetworkDriver.Leave", {"NetworkID": net, "EndpointID": ep})
    await engine_work()
    await c.call("NetworkDriver.DeleteEndpoint", {"NetworkID": net, "EndpointID": ep})
    ledger.drop(addr)
    await engine_work()
    await c.call("IpamDriver.ReleaseAddress", {"PoolID": pool_id, "Address": addr.split("/")[0]})


async def watch_status(
    c: EngineClient, stop: asyncio.Event, seen: list[int], problems: list[str]
) -> None:
    """Every 250 ms, the plugin's own view: no address is held by two endpoints."""
    while not stop.is_set():
        doc = await c.call("Pouch.Status")
        addrs = [e["Address"] for e in doc["Endpoints"] if e["Address"]]
        if len(addrs) != len(set(addrs)):
            problems.append(f"duplicate endpoint addresses in Status: {sorted(addrs)}")
        seen.append(len(addrs))
        await asyncio.sleep(0.25)


async def main(socket_path: Path, networks: int, per_network: int, mode: str) -> dict[str, Any]:
    ledger = Ledger()
    problems: list[str] = []
    seen: list[int] = []
    async with Client(socket_path) as c:
        pools = [await make_network(c, n, f"10.77.{n}.0/24") for n in range(networks)]
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_status(c, stop, seen, problems))
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(
                lifecycle(c, ledger, nid(n), pools[n], n * 1000 + k, paced=mode == "paced")
                for k in range(per_network)
                for n in range(networks)
            ),
            return_exceptions=True,
        )
        elapsed = time.perf_counter() - t0
        stop.set()
        await watcher
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    return {
        "elapsed": elapsed,
        "peak": ledger.peak,
        "status_peak": max(seen, default=0),
        "duplicates": ledger.duplicates + problems,
        "errors": errors[:10],
        "error_count": len(errors),
        "live": ledger.live,
    }


if __name__ == "__main__":
    doc = asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
    print(json.dumps(doc))
