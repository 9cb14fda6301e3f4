"""Real packets between throwaway namespaces: a "host" (the test's namespace) with bridges,
containers behind them, a LAN neighbour on a veth, and TCP servers and clients in them.

Everything lives in namespaces this module creates (or the test's own), so deleting them
removes every interface; nothing here touches the machine's own namespace. The neighbour's
addresses come from 198.51.100.0/24 (TEST-NET-2).
"""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
import sys
from contextlib import ExitStack

from .conftest import Netns, new_netns

_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"ok")
    c.close()
"""

_CLIENT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(c.recv(2).decode())
except OSError as exc:
    print("failed:", exc)
"""


def _in(ns: Netns, *argv: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns.name}", *argv]


def reaches(ns: Netns, ip: str, port: int, timeout: float = 1.0) -> bool:
    """A TCP connection from ``ns`` to ip:port gets the server's answer."""
    out = subprocess.run(
        _in(ns, sys.executable, "-c", _CLIENT, ip, str(port), str(timeout)),
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout + 20,
    )
    return out.stdout.strip() == "ok"


class Lab:
    """Namespaces, links and servers around ``host``, all removed by ``close``."""

    def __init__(self, host: Netns) -> None:
        self.host = host
        self._stack = ExitStack()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def _netns(self) -> Netns:
        return self._stack.enter_context(new_netns())

    def _veth(self, peer_ns: Netns, host_end: str, peer_end: str) -> None:
        self.host.sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", peer_end)
        self.host.sh("ip", "link", "set", peer_end, "netns", peer_ns.name)
        self.host.sh("ip", "link", "set", host_end, "up")
        peer_ns.sh("ip", "link", "set", peer_end, "up")

    def bridge(self, name: str, gateway: str) -> None:
        """A bridge in the host namespace with its gateway address (``10.61.0.1/24``)."""
        self.host.sh("ip", "link", "add", name, "type", "bridge")
        self.host.sh("ip", "addr", "add", gateway, "dev", name)
        self.host.sh("ip", "link", "set", name, "up")

    def container(self, bridge: str, address: str, gateway: str) -> Netns:
        """A namespace on ``bridge`` with ``address`` (CIDR) and a default route."""
        ns = self._netns()
        host_end = f"pkth{secrets.token_hex(4)}"
        self._veth(ns, host_end, "eth0")
        self.host.sh("ip", "link", "set", host_end, "master", bridge)
        ns.sh("ip", "addr", "add", address, "dev", "eth0")
        ns.sh("ip", "route", "add", "default", "via", gateway)
        return ns

    def neighbour(self, host_address: str, address: str) -> Netns:
        """A LAN host on a veth into the host namespace; it routes everything via the host."""
        ns = self._netns()
        host_end = f"pktl{secrets.token_hex(4)}"
        self._veth(ns, host_end, "lan0")
        self.host.sh("ip", "addr", "add", host_address, "dev", host_end)
        ns.sh("ip", "addr", "add", address, "dev", "lan0")
        gateway = str(ipaddress.ip_interface(host_address).ip)
        ns.sh("ip", "route", "add", "default", "via", gateway)
        return ns

    def serve(self, ns: Netns, port: int) -> None:
        """A TCP server on every address of ``ns`` answering "ok", until ``close``."""
        proc = subprocess.Popen(
            _in(ns, sys.executable, "-c", _SERVER, str(port)),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        self._stack.callback(proc.stdout.close)
        self._stack.callback(proc.wait, 10)
        self._stack.callback(proc.kill)
        assert proc.stdout.readline().strip() == "ready"
