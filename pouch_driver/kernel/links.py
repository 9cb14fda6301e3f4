"""Links over netlink (pyroute2): bridges, veth pairs, addresses, and the host's routes.

pyroute2's asyncio core runs here on a few worker threads, one ``IPRoute`` (its sync facade
over the same core, with a private event loop) per thread. Measured on this kind of machine:
``AsyncIPRoute`` on the server's loop holds the loop for the whole kernel call (a veth delete
stalls it 15-75 ms), while worker threads keep stalls near 1 ms and overlap the kernel's RTNL
and RCU waits. Never imports ``service`` or ``http``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import KernelError
from ..model import IPInterface, IPNetwork
from . import BridgeSpec, LinkInfo, VethSpec

log = logging.getLogger(__name__)

T = TypeVar("T")
IFF_UP = 0x1
IFA_F_NODAD = 0x02
MAIN_TABLE = 254


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def _kind(msg: Any) -> str | None:
    info = _attr(msg, "IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def _link_info(msg: Any, addresses: tuple[IPInterface, ...] = ()) -> LinkInfo:
    return LinkInfo(
        name=_attr(msg, "IFLA_IFNAME"),
        index=int(msg["index"]),
        kind=_kind(msg),
        master=_attr(msg, "IFLA_MASTER"),
        up=bool(msg["flags"] & IFF_UP),
        mtu=int(_attr(msg, "IFLA_MTU") or 0),
        mac=str(_attr(msg, "IFLA_ADDRESS") or ""),
        addresses=addresses,
    )


Job = tuple[Callable[[Any], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # the awaiting request was cancelled (deadline); the work still happened
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class NetlinkLinks:
    """The real ``Links``; ``netns`` (tests only) targets a named network namespace.

    Each worker thread owns one ``IPRoute`` for its whole life and closes it itself: pyroute2
    sockets and their private event loops must be closed on the thread that made them.
    """

    def __init__(self, workers: int = 4, netns: str | None = None) -> None:
        self._netns = netns
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"netlink-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # --- plumbing -----------------------------------------------------------------------------
    def _work(self) -> None:
        ipr: Any = None
        try:
            while (job := self._jobs.get()) is not None:
                fn, fut, loop = job
                try:
                    if ipr is None:
                        ipr = IPRoute(netns=self._netns) if self._netns else IPRoute()
                    result, error = fn(ipr), None
                except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request
                    result, error = None, exc
                loop.call_soon_threadsafe(_settle, fut, result, error)
        finally:
            if ipr is not None:
                ipr.close()

    async def _run(self, what: str, fn: Callable[[Any], T]) -> T:
        def call(ipr: Any) -> T:
            try:
                return fn(ipr)
            except NetlinkError as exc:
                raise KernelError(f"{what}: {os.strerror(exc.code)} (netlink error {exc.code})") \
                    from exc

        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((call, fut, loop))
        return await fut

    async def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)

        def join() -> None:
            for t in self._threads:
                t.join()

        await asyncio.to_thread(join)

    # --- sync helpers, run on worker threads ------------------------------------------------
    @staticmethod
    def _get(ipr: Any, name: str) -> Any | None:
        try:
            (msg,) = ipr.link("get", ifname=name)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise
        return msg

    @staticmethod
    def _addresses(ipr: Any, index: int) -> tuple[IPInterface, ...]:
        out: list[IPInterface] = []
        for msg in ipr.addr("dump", index=index):
            addr = _attr(msg, "IFA_ADDRESS")
            if addr is None:
                continue
            iface = ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}")
            if iface.version == 6 and iface.is_link_local:
                continue
            out.append(iface)
        return tuple(out)

    # --- verbs --------------------------------------------------------------------------------
    async def get_link(self, name: str) -> LinkInfo | None:
        def get(ipr: Any) -> LinkInfo | None:
            msg = self._get(ipr, name)
            if msg is None:
                return None
            return _link_info(msg, self._addresses(ipr, int(msg["index"])))

        return await self._run(f"get link {name}", get)

    async def list_links(self) -> list[LinkInfo]:
        return await self._run("list links", lambda ipr: [_link_info(m) for m in ipr.link("dump")])

    async def host_routes(self) -> list[IPNetwork]:
        def routes(ipr: Any) -> list[IPNetwork]:
            out: list[IPNetwork] = []
            for msg in ipr.route("dump"):
                if msg.get("table") != MAIN_TABLE or not msg["dst_len"]:
                    continue
                dst = _attr(msg, "RTA_DST")
                if dst is None:
                    continue
                net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
                if not net.is_link_local and not net.is_multicast:
                    out.append(net)
            return out

        return await self._run("list routes", routes)

    async def ensure_bridge(self, spec: BridgeSpec) -> None:
        def ensure(ipr: Any) -> None:
            msg = self._get(ipr, spec.name) or self._add_bridge(ipr, spec)
            if _kind(msg) != "bridge":
                raise KernelError(f"interface {spec.name} exists and is not a bridge")
            index = int(msg["index"])
            if spec.mtu and _attr(msg, "IFLA_MTU") != spec.mtu:
                ipr.link("set", index=index, mtu=spec.mtu)
            present = set(self._addresses(ipr, index))
            for addr in spec.addresses:
                if addr in present:
                    continue
                extra = {"flags": IFA_F_NODAD} if addr.version == 6 else {}
                try:
                    ipr.addr(
                        "add", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen,
                        **extra,
                    )
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
            if not msg["flags"] & IFF_UP:
                ipr.link("set", index=index, state="up")

        await self._run(f"ensure bridge {spec.name}", ensure)

    def _add_bridge(self, ipr: Any, spec: BridgeSpec) -> Any:
        args: dict[str, Any] = {"ifname": spec.name, "kind": "bridge"}
        if spec.mac:
            args["address"] = spec.mac
        if spec.mtu:
            args["mtu"] = spec.mtu
        try:
            ipr.link("add", **args)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # else a concurrent ensure won the race
                raise
        msg = self._get(ipr, spec.name)
        if msg is None:
            raise KernelError(f"bridge {spec.name} vanished right after it was created")
        return msg

    async def ensure_veth(self, spec: VethSpec) -> None:
        def ensure(ipr: Any) -> None:
            bridge = self._get(ipr, spec.bridge)
            if bridge is None:
                raise KernelError(f"bridge {spec.bridge} does not exist")
            master = int(bridge["index"])
            host = self._get(ipr, spec.host)
            if host is None:
                host = self._add_veth(ipr, spec, master)
                if host is None:
                    return
            if _kind(host) != "veth":
                raise KernelError(f"interface {spec.host} exists and is not a veth")
            index = int(host["index"])
            changes: dict[str, Any] = {}
            if _attr(host, "IFLA_MASTER") != master:
                changes["master"] = master
            if spec.mtu and _attr(host, "IFLA_MTU") != spec.mtu:
                changes["mtu"] = spec.mtu
            if changes:
                ipr.link("set", index=index, **changes)
            if not host["flags"] & IFF_UP:
                ipr.link("set", index=index, state="up")

        await self._run(f"ensure veth {spec.host}", ensure)

    def _add_veth(self, ipr: Any, spec: VethSpec, master: int) -> Any | None:
        """Create the pair; returns None when created, else the host link a racer made."""
        # One RTM_NEWLINK makes the pair with master, MTU, up and the peer's MAC.
        args: dict[str, Any] = {
            "ifname": spec.host, "kind": "veth", "master": master, "state": "up",
            "peer": {"ifname": spec.peer, "address": spec.peer_mac},
        }
        if spec.mtu:
            args["mtu"] = spec.mtu
            args["peer"]["mtu"] = spec.mtu
        try:
            ipr.link("add", **args)
            return None
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
            host = self._get(ipr, spec.host)
            if host is not None:
                return host  # a concurrent ensure made it: check it like an existing one
            # A leftover peer of a half-deleted pair holds the name. The name derives from
            # the endpoint ID with our prefix, so it is ours to replace.
            ipr.link("del", ifname=spec.peer)
            ipr.link("add", **args)
            return None

    async def ensure_link_absent(self, name: str) -> None:
        def absent(ipr: Any) -> None:
            try:
                ipr.link("del", ifname=name)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise

        await self._run(f"delete link {name}", absent)

    async def ensure_addresses_absent(self, name: str, addresses: tuple[IPInterface, ...]) -> None:
        def absent(ipr: Any) -> None:
            msg = self._get(ipr, name)
            if msg is None:
                return
            index = int(msg["index"])
            present = set(self._addresses(ipr, index))
            for addr in addresses:
                if addr not in present:
                    continue
                try:
                    ipr.addr(
                        "del", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen
                    )
                except NetlinkError as exc:
                    if exc.code != errno.EADDRNOTAVAIL:
                        raise

        await self._run(f"remove addresses from {name}", absent)
