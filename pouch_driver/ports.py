"""Published ports: turn the engine's port map into concrete host ports.

Ranges and port 0 become one free port, as Docker does; "free" means no other endpoint of ours
publishes it and no local socket holds it (our DNAT would shadow a local listener). Domain
logic with one kind of I/O: a non-blocking bind() probe.

Host IPs: none (``-p 8080:80``) means every host address of both families the container has;
``0.0.0.0`` or ``::`` every host address of that family; anything else that address.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import socket
from collections.abc import Iterable, Sequence

from .errors import Conflict, InvalidRequest
from .model import IPAddress, PortBinding, Proto

EPHEMERAL_PORTS = (49153, 60999)


PROBES_PER_YIELD = 256  # `docker run -P` with hundreds of ports must not hold the loop


def _overlap(a: IPAddress | None, b: IPAddress | None) -> bool:
    """Whether two bindings' host addresses share an address."""
    if a is None or b is None:
        return True
    return a.version == b.version and (a == b or a.is_unspecified or b.is_unspecified)


def _clash(
    used: dict[tuple[Proto, int], list[IPAddress | None]],
    proto: Proto,
    ip: IPAddress | None,
    port: int,
) -> bool:
    return any(_overlap(i, ip) for i in used.get((proto, port), ()))


async def resolve_ports(
    bindings: Sequence[PortBinding],
    taken: Sequence[PortBinding],
    default_host_ip: IPAddress | None,
    dual_stack: bool = False,
    keep: Sequence[PortBinding] = (),
) -> tuple[PortBinding, ...]:
    """Concrete bindings for ``bindings``, avoiding ``taken`` (other endpoints' bindings).

    ``dual_stack``: a binding on all addresses is published on IPv6 too (the container has an
    IPv6 address), so its port must be free for both families. ``keep``: what the same
    endpoint was given before (a repeated ProgramExternalConnectivity): a port chosen from a
    range or for port 0 stays the one it was, if still free, rather than the lowest free one,
    which may have changed since.
    """
    used: dict[tuple[Proto, int], list[IPAddress | None]] = {}
    for t in taken:
        used.setdefault((t.proto, t.host_port), []).append(t.host_ip)
    before = list(keep)
    out: list[PortBinding] = []
    probes = 0
    for b in bindings:
        host_ip = b.host_ip
        if host_ip is None and default_host_ip is not None and not default_host_ip.is_unspecified:
            host_ip = default_host_ip
        if b.host_port == 0:
            span = range(EPHEMERAL_PORTS[0], EPHEMERAL_PORTS[1] + 1)
        else:
            span = range(b.host_port, max(b.host_port, b.host_port_end) + 1)
        candidates: Iterable[int] = span
        for k in before:
            if (k.proto, k.port, k.host_ip) == (b.proto, b.port, host_ip) and k.host_port in span:
                before.remove(k)  # each earlier binding serves one binding
                candidates = itertools.chain((k.host_port,), span)
                break
        chosen = None
        for p in candidates:
            probes += 1
            if probes % PROBES_PER_YIELD == 0:
                await asyncio.sleep(0)
            if not _clash(used, b.proto, host_ip, p) and port_free(
                b.proto, host_ip, p, also_v6=dual_stack and host_ip is None
            ):
                chosen = p
                break
        if chosen is None:
            want = (
                f"{b.host_port}"
                if b.host_port_end in (0, b.host_port)
                else f"{b.host_port}-{b.host_port_end}"
            )
            raise Conflict(
                f"host port {want}/{b.proto.name.lower()} on {host_ip or 'all addresses'} "
                "is already allocated"
            )
        resolved = PortBinding(
            proto=b.proto, port=b.port, host_port=chosen, host_port_end=chosen, host_ip=host_ip
        )
        used.setdefault((b.proto, chosen), []).append(host_ip)
        out.append(resolved)
    return tuple(out)


def port_free(proto: Proto, host_ip: IPAddress | None, port: int, *, also_v6: bool = False) -> bool:
    """Whether a local socket could bind the port (``also_v6``: on [::] too). bind() never
    blocks."""
    if proto is Proto.SCTP:
        return True
    kind = socket.SOCK_STREAM if proto is Proto.TCP else socket.SOCK_DGRAM
    if also_v6 and not _bindable(socket.AF_INET6, kind, "::", port):
        return False
    family = socket.AF_INET6 if host_ip is not None and host_ip.version == 6 else socket.AF_INET
    addr = (
        str(host_ip)
        if host_ip is not None and not host_ip.is_unspecified
        else ("::" if family == socket.AF_INET6 else "")
    )
    try:
        return _bindable(family, kind, addr, port)
    except OSError as exc:
        if isinstance(exc, socket.gaierror) or exc.errno in (errno.EADDRNOTAVAIL, errno.EINVAL):
            raise InvalidRequest(
                f"host IP {host_ip} for a published port is not a usable address of this host"
            ) from None
        raise


def _bindable(family: socket.AddressFamily, kind: socket.SocketKind, addr: str, port: int) -> bool:
    """False if the port is taken; other errors raise, except a host without IPv6."""
    try:
        sock = socket.socket(family, kind)
    except OSError as exc:
        if exc.errno == errno.EAFNOSUPPORT:
            return True  # no IPv6 on this host: nothing can hold the port there
        raise
    with sock:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((addr, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True
