"""Links over netlink (pyroute2): bridges, veth pairs, addresses, the host's routes, and the
VXLAN data plane (devices, forwarding and neighbour entries for endpoints on other hosts).

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
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import Exhausted, KernelError
from ..model import IPAddress, IPInterface, IPNetwork
from . import BRIDGE_MAX_PORTS, BridgeSpec, LinkInfo, RemoteEndpoint, VethSpec, VxlanSpec

log = logging.getLogger(__name__)

T = TypeVar("T")
IFF_UP = 0x1
IFA_F_NODAD = 0x02
MAIN_TABLE = 254
NTF_SELF, NTF_MASTER = 0x02, 0x04
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80
ALL_ZEROS_MAC = "00:00:00:00:00:00"


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


_NLMSG_ERROR, _NLMSG_DONE, _RTM_NEWLINK, _RTM_GETLINK = 2, 3, 16, 18
_IFLA_ADDRESS, _IFLA_IFNAME, _IFLA_MTU, _IFLA_MASTER, _IFLA_LINKINFO = 1, 3, 4, 10, 18
_IFLA_INFO_KIND = 1
_NLMSG = struct.Struct("=LHHLL")
_IFINFO = struct.Struct("=BxHiII")
_RTA = struct.Struct("=HH")
_U32 = struct.Struct("=I")


def _dump_links() -> list[LinkInfo]:
    """RTM_GETLINK dump decoded for the six fields we read (pyroute2 decodes every
    attribute: ~0.7 ms and ~30 KiB per link, 1.4 s and 60 MiB of peak for 2,000 veths)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.bind((0, 0))
        s.send(_NLMSG.pack(32, _RTM_GETLINK, 0x301, 1, 0) + _IFINFO.pack(0, 0, 0, 0, 0))
        out: list[LinkInfo] = []
        while True:
            data = s.recv(1 << 16)
            off = 0
            while off < len(data):
                length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
                if kind == _NLMSG_DONE:
                    return out
                if kind == _NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, off + 16)
                    raise NetlinkError(-code)
                if kind == _RTM_NEWLINK:
                    out.append(_decode_link(data, off, off + length))
                off += (length + 3) & ~3


def _attrs(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each rtattr in ``data[start:end]``."""
    while start + 4 <= end:
        alen, atype = _RTA.unpack_from(data, start)
        if alen < 4:
            return
        yield atype & 0x3FFF, start + 4, start + alen
        start += (alen + 3) & ~3


def _decode_link(data: bytes, off: int, end: int) -> LinkInfo:
    _family, _type, index, flags, _change = _IFINFO.unpack_from(data, off + 16)
    name, master, kind, mtu, mac = "", None, None, 0, ""
    for atype, a, b in _attrs(data, off + 32, end):
        if atype == _IFLA_IFNAME:
            name = data[a:b].rstrip(b"\0").decode()
        elif atype == _IFLA_MASTER:
            (master,) = _U32.unpack_from(data, a)
        elif atype == _IFLA_MTU:
            (mtu,) = _U32.unpack_from(data, a)
        elif atype == _IFLA_ADDRESS:
            mac = data[a:b].hex(":")
        elif atype == _IFLA_LINKINFO:
            kind = next(
                (
                    data[x:y].rstrip(b"\0").decode()
                    for t, x, y in _attrs(data, a, b)
                    if t == _IFLA_INFO_KIND
                ),
                kind,
            )
    return LinkInfo(
        name=name, index=index, kind=kind, master=master, up=bool(flags & IFF_UP), mtu=mtu, mac=mac
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

    def __init__(self, workers: int = 4, netns: str | None = None, delete_workers: int = 4) -> None:
        self._netns = netns
        # Bridge name -> ifindex, so a new veth costs one RTM_NEWLINK instead of three
        # round trips; dropped when we delete the bridge or the kernel rejects the index.
        self._bridge_index: dict[str, int] = {}
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        # Deletes have their own lane: a veth delete sleeps ~16 ms in the kernel (RCU), and a
        # create queued behind it would wait as long. Sleeping threads hold no GIL.
        self._deletes: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(
                target=self._work, args=(self._jobs,), name=f"netlink-{i}", daemon=True
            )
            for i in range(workers)
        ] + [
            threading.Thread(
                target=self._work, args=(self._deletes,), name=f"netlink-del-{i}", daemon=True
            )
            for i in range(delete_workers)
        ]
        self._lanes = [self._jobs] * workers + [self._deletes] * delete_workers
        for t in self._threads:
            t.start()

    # --- plumbing -----------------------------------------------------------------------------
    def _work(self, jobs: queue.SimpleQueue[Job | None]) -> None:
        ipr: Any = None
        try:
            while (job := jobs.get()) is not None:
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

    async def _run(self, what: str, fn: Callable[[Any], T], *, delete: bool = False) -> T:
        def call(ipr: Any) -> T:
            try:
                return fn(ipr)
            except NetlinkError as exc:
                raise KernelError(
                    f"{what}: {os.strerror(exc.code)} (netlink error {exc.code})"
                ) from exc

        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        (self._deletes if delete else self._jobs).put((call, fut, loop))
        return await fut

    def _background(self, what: str, fn: Callable[[Any], object]) -> None:
        """Run ``fn`` on the slow lane without waiting; a vanished link is not an error."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[object] = loop.create_future()

        def done(f: asyncio.Future[object]) -> None:
            exc = f.exception()
            if exc is not None and not (isinstance(exc, NetlinkError) and exc.code == errno.ENODEV):
                log.warning("%s failed: %s", what, exc)

        fut.add_done_callback(done)
        self._deletes.put((fn, fut, loop))

    async def close(self) -> None:
        for lane in self._lanes:
            lane.put(None)

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
        if self._netns is None:  # (a netns-bound variant would open the socket via setns)
            return await self._run("list links", lambda _ipr: _dump_links())
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
            msg = self._get(ipr, spec.name)
            made = msg is None
            if msg is None:
                msg = self._add_bridge(ipr, spec)
            if _kind(msg) != "bridge":
                raise KernelError(f"interface {spec.name} exists and is not a bridge")
            index = int(msg["index"])
            if spec.mtu and _attr(msg, "IFLA_MTU") != spec.mtu:
                ipr.link("set", index=index, mtu=spec.mtu)
            # A bridge just made holds no address yet (one another ensure added meanwhile is
            # EEXIST below). Not asking spares a dump: the kernel answers an address dump
            # with every address of the namespace, filtered here, so its cost grows with the
            # host (3 -> 15 ms per network create at 200 networks).
            present = set() if made else set(self._addresses(ipr, index))
            for addr in spec.addresses:
                if addr in present:
                    continue
                extra = {"flags": IFA_F_NODAD} if addr.version == 6 else {}
                try:
                    ipr.addr(
                        "add",
                        index=index,
                        address=str(addr.ip),
                        prefixlen=addr.network.prefixlen,
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
        return self._add_link(ipr, spec.name, "bridge", args)

    def _add_link(self, ipr: Any, name: str, what: str, args: dict[str, Any]) -> Any:
        """Create a link and return its message; a concurrent ensure that made it first wins."""
        try:
            ipr.link("add", **args)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        msg = self._get(ipr, name)
        if msg is None:
            raise KernelError(f"{what} {name} vanished right after it was created")
        return msg

    async def ensure_veth(self, spec: VethSpec) -> None:
        def ensure(ipr: Any) -> None:
            try:
                attach(ipr)
            except NetlinkError as exc:
                if exc.code == errno.EXFULL:  # the kernel's word for a bridge out of ports
                    raise Exhausted(
                        f"bridge {spec.bridge} is full: Linux allows {BRIDGE_MAX_PORTS} ports "
                        "per bridge, counting interfaces pouch-driver did not add"
                    ) from exc
                raise

        def attach(ipr: Any) -> None:
            master = self._bridge_index.get(spec.bridge)
            if master is not None:
                try:  # the usual case: a new pair on a known bridge
                    ipr.link("add", **self._veth_args(spec, master))
                    return
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        self._bridge_index.pop(spec.bridge, None)
            bridge = self._get(ipr, spec.bridge)
            if bridge is None:
                raise KernelError(f"bridge {spec.bridge} does not exist")
            master = int(bridge["index"])
            if _kind(bridge) == "bridge":
                self._bridge_index[spec.bridge] = master
            host = self._get(ipr, spec.host)
            if host is None:
                host = self._add_veth(ipr, spec, master)
                if host is None:
                    return
            if _kind(host) != "veth":
                raise KernelError(f"interface {spec.host} exists and is not a veth")
            self._attach_port(ipr, host, master, spec.mtu)

        await self._run(f"ensure veth {spec.host}", ensure)
        if spec.hairpin:
            # Off the request path (the host end stays in this namespace; any time will do).
            self._background(f"hairpin on {spec.host}", lambda ipr: self._hairpin(ipr, spec.host))

    @staticmethod
    def _attach_port(ipr: Any, msg: Any, master: int, mtu: int | None) -> None:
        """An existing bridge port made right: on ``master``, at ``mtu`` (if given), up."""
        index = int(msg["index"])
        changes: dict[str, Any] = {}
        if _attr(msg, "IFLA_MASTER") != master:
            changes["master"] = master
        if mtu and _attr(msg, "IFLA_MTU") != mtu:
            changes["mtu"] = mtu
        if changes:
            ipr.link("set", index=index, **changes)
        if not msg["flags"] & IFF_UP:
            ipr.link("set", index=index, state="up")

    @staticmethod
    def _hairpin(ipr: Any, host: str) -> None:
        """A container reaching its own published port through the host's address is DNAT'd
        back out the port it came in by (br_netfilter): that needs hairpin mode."""
        ipr.link("set", ifname=host, kind="bridge_slave", mode=1)

    @staticmethod
    def _veth_args(spec: VethSpec, master: int) -> dict[str, Any]:
        # One RTM_NEWLINK makes the pair with master, MTU, up and the peer's MAC.
        args: dict[str, Any] = {
            "ifname": spec.host,
            "kind": "veth",
            "master": master,
            "state": "up",
            "peer": {"ifname": spec.peer, "address": spec.peer_mac},
        }
        if spec.mtu:
            args["mtu"] = spec.mtu
            args["peer"]["mtu"] = spec.mtu
        return args

    def _add_veth(self, ipr: Any, spec: VethSpec, master: int) -> Any | None:
        """Create the pair; returns None when created, else the host link a racer made."""
        args = self._veth_args(spec, master)
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
        self._bridge_index.pop(name, None)

        def absent(ipr: Any) -> None:
            try:
                ipr.link("del", ifname=name)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise

        await self._run(f"delete link {name}", absent, delete=True)

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

    # --- VXLAN data plane ------------------------------------------------------------------
    # Who answers what (docs/architecture.md, "The VXLAN data plane"): the VXLAN port of the
    # bridge carries neigh_suppress, so an ARP request or neighbour solicitation whose target
    # has a neighbour entry on the bridge, and whose MAC the bridge forwards to that port, is
    # answered by the bridge itself and not flooded to the port; neither is one for an address
    # of the bridge (the gateway, the same on every host). Nothing else crosses either: without
    # an all-zeros forwarding entry (ensure_flood) the device drops what it has no entry for.

    async def ensure_vxlan(self, spec: VxlanSpec) -> None:
        def ensure(ipr: Any) -> None:
            bridge = self._get(ipr, spec.bridge)
            if bridge is None or _kind(bridge) != "bridge":
                raise KernelError(f"bridge {spec.bridge} does not exist")
            master = int(bridge["index"])
            underlay: int | None = None
            if spec.underlay is not None:
                lower = self._get(ipr, spec.underlay)
                if lower is None:
                    raise KernelError(f"underlay device {spec.underlay} does not exist")
                underlay = int(lower["index"])
            msg = self._get(ipr, spec.name) or self._add_vxlan(ipr, spec, master, underlay)
            if _kind(msg) != "vxlan":
                raise KernelError(f"interface {spec.name} exists and is not a vxlan device")
            data = _attr(_attr(msg, "IFLA_LINKINFO"), "IFLA_INFO_DATA")
            differences = _vxlan_differences(spec, data, underlay)
            if differences:
                raise KernelError(
                    f"vxlan device {spec.name} exists with another " + ", ".join(differences)
                )
            index = int(msg["index"])
            if data.get_attr("IFLA_VXLAN_LEARNING"):
                ipr.link("set", index=index, kind="vxlan", vxlan_learning=0)
            self._attach_port(ipr, msg, master, spec.mtu)
            self._suppress_neighbours(ipr, spec.name, index)

        await self._run(f"ensure vxlan {spec.name}", ensure)

    def _add_vxlan(self, ipr: Any, spec: VxlanSpec, master: int, underlay: int | None) -> Any:
        return self._add_link(ipr, spec.name, "vxlan device", _vxlan_args(spec, master, underlay))

    def _suppress_neighbours(self, ipr: Any, name: str, index: int) -> None:
        """neigh_suppress on, bridge learning off (entries come from the cluster store, never
        from what a peer's packets claim), both read back: a kernel without the flag (before
        Linux 4.15) would silently let every ARP request cross."""
        port = self._brport(ipr, index)
        if port.get("IFLA_BRPORT_NEIGH_SUPPRESS") == 1 and port.get("IFLA_BRPORT_LEARNING") == 0:
            return
        ipr.link("set", index=index, kind="bridge_slave", neigh_suppress=1, learning=0)
        port = self._brport(ipr, index)
        if port.get("IFLA_BRPORT_NEIGH_SUPPRESS") != 1 or port.get("IFLA_BRPORT_LEARNING") != 0:
            raise KernelError(
                f"bridge port {name}: the kernel keeps no neigh_suppress/learning flags "
                "(Linux 4.15 or later is needed for VXLAN networks)"
            )

    def _brport(self, ipr: Any, index: int) -> dict[str, Any]:
        (msg,) = ipr.link("get", index=index)
        info = _attr(msg, "IFLA_LINKINFO")
        data = info.get_attr("IFLA_INFO_SLAVE_DATA") if info is not None else None
        if data is None:
            return {}
        return dict(data["attrs"])

    def _index(self, ipr: Any, name: str, kind: str) -> int:
        msg = self._get(ipr, name)
        if msg is None or _kind(msg) != kind:
            raise KernelError(f"{kind} device {name} does not exist")
        return int(msg["index"])

    async def ensure_remote_endpoint(
        self, vxlan: str, bridge: str, mac: str, addresses: tuple[IPAddress, ...], vtep: IPAddress
    ) -> None:
        mac = mac.lower()

        def ensure(ipr: Any) -> None:
            vx, br = self._index(ipr, vxlan, "vxlan"), self._index(ipr, bridge, "bridge")
            # "replace" creates or overwrites: an endpoint that moved host keeps one entry.
            ipr.fdb(
                "replace",
                ifindex=vx,
                lladdr=mac,
                dst=str(vtep),
                flags=NTF_SELF,
                state=NUD_PERMANENT,
            )
            # The bridge must forward the MAC to the VXLAN port (static, never NUD_PERMANENT:
            # on a bridge that means "this host's own address") for neigh_suppress to answer.
            ipr.fdb("replace", ifindex=vx, lladdr=mac, flags=NTF_MASTER, state=NUD_NOARP)
            for address in addresses:
                ipr.neigh(
                    "replace",
                    ifindex=br,
                    dst=str(address),
                    lladdr=mac,
                    state=NUD_PERMANENT,
                    family=_family(address),
                )

        await self._run(f"ensure remote endpoint {mac} on {vxlan}", ensure)

    async def ensure_remote_endpoint_absent(
        self, vxlan: str, bridge: str, mac: str, addresses: tuple[IPAddress, ...]
    ) -> None:
        mac = mac.lower()

        def absent(ipr: Any) -> None:
            vx, br = self._get(ipr, vxlan), self._get(ipr, bridge)
            if br is not None:
                held = self._neighbours(ipr, int(br["index"]))
                for address in addresses:
                    if held.get(address) != mac:
                        continue
                    _gone(
                        ipr.neigh,
                        "del",
                        ifindex=int(br["index"]),
                        dst=str(address),
                        family=_family(address),
                    )
            if vx is not None:
                index = int(vx["index"])
                for flags, state in ((NTF_MASTER, NUD_NOARP), (NTF_SELF, NUD_PERMANENT)):
                    _gone(ipr.fdb, "del", ifindex=index, lladdr=mac, flags=flags, state=state)

        await self._run(f"remove remote endpoint {mac} from {vxlan}", absent, delete=True)

    async def ensure_flood(self, vxlan: str, vteps: tuple[IPAddress, ...]) -> None:
        def ensure(ipr: Any) -> None:
            vx = self._index(ipr, vxlan, "vxlan")
            present = set(self._fdb(ipr, vx)[1])
            wanted = set(vteps)
            for vtep in wanted - present:
                ipr.fdb(
                    "append",
                    ifindex=vx,
                    lladdr=ALL_ZEROS_MAC,
                    dst=str(vtep),
                    flags=NTF_SELF,
                    state=NUD_PERMANENT,
                )
            for vtep in present - wanted:
                _gone(
                    ipr.fdb,
                    "del",
                    ifindex=vx,
                    lladdr=ALL_ZEROS_MAC,
                    dst=str(vtep),
                    flags=NTF_SELF,
                    state=NUD_PERMANENT,
                )

        await self._run(f"ensure flood list of {vxlan}", ensure)

    async def list_flood(self, vxlan: str) -> tuple[IPAddress, ...]:
        def flood(ipr: Any) -> tuple[IPAddress, ...]:
            vx = self._get(ipr, vxlan)
            if vx is None:
                return ()
            return tuple(sorted(self._fdb(ipr, int(vx["index"]))[1], key=_ip_key))

        return await self._run(f"list flood list of {vxlan}", flood)

    async def list_remote_endpoints(self, vxlan: str, bridge: str) -> list[RemoteEndpoint]:
        def remote(ipr: Any) -> list[RemoteEndpoint]:
            vx, br = self._get(ipr, vxlan), self._get(ipr, bridge)
            vteps: dict[str, IPAddress | None] = {}
            if vx is not None:
                forwarded, _flood, bridged = self._fdb(ipr, int(vx["index"]))
                vteps.update(dict.fromkeys(bridged))
                vteps.update(forwarded)
            by_mac: dict[str, list[IPAddress]] = {}
            if br is not None:
                for address, mac in self._neighbours(ipr, int(br["index"])).items():
                    by_mac.setdefault(mac, []).append(address)
            return [
                RemoteEndpoint(mac, vteps.get(mac), tuple(sorted(by_mac.get(mac, ()), key=_ip_key)))
                for mac in sorted({*vteps, *by_mac})
            ]

        return await self._run(f"list remote endpoints of {vxlan}", remote)

    @staticmethod
    def _fdb(ipr: Any, index: int) -> tuple[dict[str, IPAddress], list[IPAddress], list[str]]:
        """(MAC -> VTEP, flood VTEPs, MACs the bridge sends to this port statically)."""
        forwarded: dict[str, IPAddress] = {}
        flood: list[IPAddress] = []
        bridged: list[str] = []
        for msg in ipr.fdb("dump", ifindex=index):
            if int(msg["ifindex"]) != index:
                continue
            mac = str(_attr(msg, "NDA_LLADDR") or "").lower()
            dst = _attr(msg, "NDA_DST")
            if _attr(msg, "NDA_MASTER") is not None:
                # Static entries only: the port's own MAC is a permanent ("local") one.
                if msg["state"] & NUD_NOARP and not msg["state"] & NUD_PERMANENT:
                    bridged.append(mac)
            elif dst is not None:
                if mac == ALL_ZEROS_MAC:
                    flood.append(ipaddress.ip_address(dst))
                else:
                    forwarded[mac] = ipaddress.ip_address(dst)
        return forwarded, flood, bridged

    @staticmethod
    def _neighbours(ipr: Any, index: int) -> dict[IPAddress, str]:
        """The bridge's permanent neighbour entries (learned ones belong to local traffic)."""
        out: dict[IPAddress, str] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.neigh("dump", ifindex=index, family=family):
                lladdr, dst = _attr(msg, "NDA_LLADDR"), _attr(msg, "NDA_DST")
                if msg["state"] & NUD_PERMANENT and lladdr and dst and msg["ifindex"] == index:
                    out[ipaddress.ip_address(dst)] = str(lladdr).lower()
        return out


def _family(address: IPAddress) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


def _ip_key(address: IPAddress) -> tuple[int, int]:
    return address.version, int(address)


def _gone(fn: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    """Run a delete; an entry (or device) that is already gone is what we wanted."""
    try:
        fn(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.ENODEV, errno.ESRCH):
            raise


def _vxlan_args(spec: VxlanSpec, master: int, underlay: int | None) -> dict[str, Any]:
    args: dict[str, Any] = {
        "ifname": spec.name,
        "kind": "vxlan",
        "vxlan_id": spec.vni,
        "vxlan_port": spec.port,
        "vxlan_learning": 0,
        "master": master,
    }
    args["vxlan_local" if spec.local.version == 4 else "vxlan_local6"] = str(spec.local)
    if underlay is not None:
        args["vxlan_link"] = underlay
    if spec.mtu:
        args["mtu"] = spec.mtu
    return args


def _vxlan_differences(spec: VxlanSpec, data: Any, underlay: int | None) -> list[str]:
    local = data.get_attr("IFLA_VXLAN_LOCAL") or data.get_attr("IFLA_VXLAN_LOCAL6")
    held: dict[str, object] = {
        "VNI": data.get_attr("IFLA_VXLAN_ID"),
        "local address": ipaddress.ip_address(local) if local else None,
        "port": data.get_attr("IFLA_VXLAN_PORT"),
        "underlay": data.get_attr("IFLA_VXLAN_LINK") or None,
    }
    wanted: dict[str, object] = {"VNI": spec.vni, "local address": spec.local, "port": spec.port}
    if spec.underlay is not None:
        wanted["underlay"] = underlay
    return [
        f"{what} ({held[what]}, not {value})"
        if what != "underlay"
        else f"underlay (ifindex {held[what]}, not {spec.underlay})"
        for what, value in wanted.items()
        if held[what] != value
    ]
