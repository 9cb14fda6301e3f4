"""The least work a remote network + IPAM driver can do for the engine: the floor of any plugin.

Not a driver anyone should run: no validation, no store, no firewall, no error handling worth
the name. It exists to measure what the *engine* spends on a remote driver (its HTTP calls and
their handling) with a plugin that answers as fast as Python on a Unix socket can: a raw
asyncio HTTP/1.1 server (no framework), addresses from a counter, and for CreateEndpoint the one
netlink request the engine cannot do without (the veth pair, on the bridge and up). pyroute2's
sync ``IPRoute`` cannot run on a thread with a running event loop, so the handlers run on one
worker thread (as pouch-driver's netlink calls do); veths are deleted on another thread after
the answer, as pouch-driver does.

    python -m bench.floor_plugin --socket /run/docker/plugins/NAME.sock --prefix pdf

It answers NetworkDriver and IpamDriver calls of the engine's connect/disconnect/run paths,
with pools given explicitly (``--subnet``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import itertools
import json
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pyroute2 import IPRoute

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class Floor:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.local = threading.local()  # an IPRoute per thread, made on that thread
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="floor")
        self.deleter = ThreadPoolExecutor(1, thread_name_prefix="floor-del")
        self.ids = itertools.count(1)
        self.pools: dict[str, tuple[ipaddress.IPv4Network, itertools.count[int]]] = {}
        self.bridges: dict[str, tuple[str, int, str]] = {}  # network -> (name, index, gateway)
        self.endpoints: dict[str, tuple[str, str, str]] = {}  # endpoint -> (host, peer, net)
        self.calls: dict[str, Handler] = {
            "/Plugin.Activate": lambda _b: {"Implements": ["NetworkDriver", "IpamDriver"]},
            "/NetworkDriver.GetCapabilities": lambda _b: {
                "Scope": "local",
                "ConnectivityScope": "local",
            },
            "/IpamDriver.GetCapabilities": lambda _b: {"RequiresMACAddress": False},
            "/IpamDriver.GetDefaultAddressSpaces": lambda _b: {
                "LocalDefaultAddressSpace": "FloorLocal",
                "GlobalDefaultAddressSpace": "FloorGlobal",
            },
            "/IpamDriver.RequestPool": self.request_pool,
            "/IpamDriver.RequestAddress": self.request_address,
            "/NetworkDriver.CreateNetwork": self.create_network,
            "/NetworkDriver.DeleteNetwork": self.delete_network,
            "/NetworkDriver.CreateEndpoint": self.create_endpoint,
            "/NetworkDriver.DeleteEndpoint": self.delete_endpoint,
            "/NetworkDriver.Join": self.join,
            "/NetworkDriver.EndpointOperInfo": lambda _b: {"Value": {}},
        }
        for done in (
            "/IpamDriver.ReleasePool",
            "/IpamDriver.ReleaseAddress",
            "/NetworkDriver.Leave",
            "/NetworkDriver.AllocateNetwork",
            "/NetworkDriver.FreeNetwork",
            "/NetworkDriver.DiscoverNew",
            "/NetworkDriver.DiscoverDelete",
            "/NetworkDriver.ProgramExternalConnectivity",
            "/NetworkDriver.RevokeExternalConnectivity",
        ):
            self.calls[done] = lambda _b: {}

    @property
    def ipr(self) -> IPRoute:
        ipr = getattr(self.local, "ipr", None)
        if ipr is None:
            ipr = self.local.ipr = IPRoute()
        return ipr

    def request_pool(self, body: dict[str, Any]) -> dict[str, Any]:
        pool = ipaddress.IPv4Network(body["Pool"])
        self.pools[str(pool)] = (pool, itertools.count(2))
        return {"PoolID": str(pool), "Pool": str(pool), "Data": {}}

    def request_address(self, body: dict[str, Any]) -> dict[str, Any]:
        pool, counter = self.pools[body["PoolID"]]
        if (body.get("Options") or {}).get("RequestAddressType"):
            ip = pool.network_address + 1
        elif body.get("Address"):
            ip = ipaddress.IPv4Address(body["Address"])
        else:
            ip = pool.network_address + next(counter)
        return {"Address": f"{ip}/{pool.prefixlen}", "Data": {}}

    def create_network(self, body: dict[str, Any]) -> dict[str, Any]:
        name = f"{self.prefix}b{next(self.ids)}"
        gw = body["IPv4Data"][0]["Gateway"]
        self.ipr.link("add", ifname=name, kind="bridge")
        (index,) = self.ipr.link_lookup(ifname=name)
        addr, plen = gw.split("/")
        self.ipr.addr("add", index=index, address=addr, prefixlen=int(plen))
        self.ipr.link("set", index=index, state="up")
        self.bridges[body["NetworkID"]] = (name, index, addr)
        return {}

    def delete_network(self, body: dict[str, Any]) -> dict[str, Any]:
        name, _, _ = self.bridges.pop(body["NetworkID"])
        self.ipr.link("del", ifname=name)
        return {}

    def create_endpoint(self, body: dict[str, Any]) -> dict[str, Any]:
        n = next(self.ids)
        host, peer = f"{self.prefix}h{n}", f"{self.prefix}c{n}"
        mac = (body.get("Interface") or {}).get("MacAddress") or ""
        answer = {} if mac else {"Interface": {"MacAddress": (mac := _mac(n))}}
        _, master, _ = self.bridges[body["NetworkID"]]
        self.ipr.link(
            "add",
            ifname=host,
            kind="veth",
            master=master,
            state="up",
            peer={"ifname": peer, "address": mac},
        )
        self.endpoints[body["EndpointID"]] = (host, peer, body["NetworkID"])
        return answer

    def delete_endpoint(self, body: dict[str, Any]) -> dict[str, Any]:
        got = self.endpoints.pop(body["EndpointID"], None)
        if got is not None:
            self.deleter.submit(self._delete, got[0])
        return {}

    def _delete(self, ifname: str) -> None:
        # Gone already (its sandbox took it): nothing to do.
        with contextlib.suppress(Exception):
            self.ipr.link("del", ifname=ifname)

    def join(self, body: dict[str, Any]) -> dict[str, Any]:
        _, peer, net = self.endpoints[body["EndpointID"]]
        return {
            "InterfaceName": {"SrcName": peer, "DstPrefix": "eth"},
            "Gateway": self.bridges[net][2],
        }


def _mac(n: int) -> str:
    return "02:42:" + ":".join(f"{b:02x}" for b in n.to_bytes(4, "big"))


async def serve(floor: Floor, path: str) -> None:
    loop = asyncio.get_running_loop()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                target = lines[0].split(" ")[1]
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
                }
                if headers.get("transfer-encoding", "").lower() == "chunked":
                    raw = bytearray()
                    while size := int((await reader.readline()).split(b";")[0], 16):
                        raw += await reader.readexactly(size)
                        await reader.readline()
                    await reader.readline()
                else:
                    raw = bytearray(
                        await reader.readexactly(int(headers.get("content-length", "0")))
                    )
                handler = floor.calls.get(target)
                if handler is None:
                    status, doc = "404 Not Found", {"Err": f"{target}: not implemented"}
                else:
                    try:
                        body = json.loads(raw) if raw.strip() else {}
                        doc = await loop.run_in_executor(floor.worker, handler, body)
                        status = "200 OK"
                    except Exception as exc:  # noqa: BLE001 - the engine reads the Err
                        status, doc = "500 Internal Server Error", {"Err": repr(exc)}
                out = json.dumps(doc).encode()
                writer.write(
                    b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: "
                    b"application/json\r\nContent-Length: "
                    + str(len(out)).encode()
                    + b"\r\n\r\n"
                    + out
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(client, path)
    os.chmod(path, 0o660)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    os.unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--prefix", default="pdf")
    args = ap.parse_args()
    asyncio.run(serve(Floor(args.prefix), args.socket))


if __name__ == "__main__":
    main()
