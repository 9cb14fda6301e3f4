"""Traffic and kernel-state checks for the end-to-end tests of real networks (issue 3).

Everything here observes from outside the plugin: traffic from inside containers (busybox
``ping``/``wget``) and from the remote-host netns, ``ip -json`` and ``iptables -S`` in the
engine netns, the docker CLI and the Docker Engine API. Nothing imports ``pouch_driver``.

Negative checks are short (1-2 s) and run side by side: :func:`probe` starts one background
job per target inside the container in a single ``docker exec``, so ten "must not reach"
checks cost the time of one.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .harness import ENGINE_UPLINK, Engine, Scope, wait_until

# --------------------------------------------------------------------------------------------
# Names and links
# --------------------------------------------------------------------------------------------


def _id_part(engine: Engine, object_id: str) -> str:
    return object_id[: 15 - len(engine.plugin.prefix) - 1]


def host_veth(engine: Engine, endpoint_id: str) -> str:
    """The documented name of an endpoint's host-side veth: ``<prefix>h<id>``."""
    return f"{engine.plugin.prefix}h{_id_part(engine, endpoint_id)}"


def container_veth(engine: Engine, endpoint_id: str) -> str:
    """The documented name of the container-side veth before the engine moves it."""
    return f"{engine.plugin.prefix}c{_id_part(engine, endpoint_id)}"


def endpoint_id(e2e: Scope, container: str, network: str) -> str:
    nets = e2e.container_inspect(container)["NetworkSettings"]["Networks"]
    eid = str(nets[network]["EndpointID"])
    assert eid, f"{container} has no endpoint on {network}: {nets[network]}"
    return eid


def bridge_ports(engine: Engine, bridge: str) -> list[str]:
    """Names of the interfaces enslaved to ``bridge`` in the engine netns."""
    return sorted(lk["ifname"] for lk in engine.links() if lk.get("master") == bridge)


def bridges(engine: Engine) -> set[str]:
    """Names of every bridge in the engine netns."""
    return {
        lk["ifname"] for lk in engine.links() if lk.get("linkinfo", {}).get("info_kind") == "bridge"
    }


def wait_links_gone(engine: Engine, names: Iterable[str], *, timeout: float = 5.0) -> None:
    """The plugin deletes veths in the background: poll until none of ``names`` exists."""
    wanted = set(names)

    def gone() -> bool:
        return not wanted & {lk["ifname"] for lk in engine.links()}

    try:
        wait_until(gone, timeout=timeout, interval=0.1, message=f"links {sorted(wanted)} to go")
    except AssertionError:
        left = sorted(wanted & {lk["ifname"] for lk in engine.links()})
        raise AssertionError(f"still present {timeout:g}s later: {left}") from None


def sysfs(e2e: Scope, container: str, iface: str, attr: str) -> str:
    """``/sys/class/net/<iface>/<attr>`` as the container sees it."""
    return e2e.exec(container, "cat", f"/sys/class/net/{iface}/{attr}").stdout.strip()


def container_ifaces(e2e: Scope, container: str) -> list[str]:
    out = e2e.exec(container, "ls", "/sys/class/net").stdout.split()
    return sorted(out)


def container_routes(e2e: Scope, container: str, *, v6: bool = False) -> list[str]:
    """``ip [-6] route`` lines inside the container, whitespace-normalised."""
    args = ["ip", "-6", "route"] if v6 else ["ip", "route"]
    return [
        " ".join(line.split())
        for line in e2e.exec(container, *args).stdout.splitlines()
        if line.strip()
    ]


def container_pid(e2e: Scope, container: str) -> int:
    pid = int(e2e.container_inspect(container)["State"]["Pid"])
    assert pid > 0, f"{container} is not running"
    return pid


# --------------------------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------------------------


def _url(host: str, port: int, path: str = "/") -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{path}"


Check = tuple[str, str]  # (kind, target): kind "ping" or "http"


def _probe_script(checks: list[Check], port: int, timeout: int, tool: str) -> str:
    jobs = []
    for i, (kind, t) in enumerate(checks):
        if kind == "ping":
            cmd = f"{tool}{'ping6' if ':' in t else 'ping'} -c 3 -i 0.2 -W 1 {t}"
        elif kind == "http":
            cmd = f"timeout {timeout} {tool}wget -O- {_url(t, port)}"
        else:
            raise ValueError(kind)
        jobs.append(f"( {cmd} >/dev/null 2>&1 && echo 'R {i}' || echo 'U {i}' ) &")
    return " ".join(jobs) + " wait"


def _verdicts(checks: list[Check], out: str, where: str) -> dict[Check, bool]:
    result: dict[Check, bool] = {}
    for line in out.splitlines():
        m = re.match(r"^([RU]) (\d+)$", line.strip())
        if m:
            result[checks[int(m.group(2))]] = m.group(1) == "R"
    missing = [c for c in checks if c not in result]
    assert not missing, f"probe from {where} gave no verdict for {missing}:\n{out}"
    return result


def probe(
    e2e: Scope, container: str, checks: Iterable[Check], *, port: int = 80, timeout: int = 2
) -> dict[Check, bool]:
    """Which ``(kind, target)`` checks pass from ``container``, all run at once inside it.

    ``ping``: three echo requests 0.2 s apart, any answer counts (``ping6`` for IPv6
    literals); gives up 1 s after the last. ``http``: ``wget http://target:port/`` must
    complete within ``timeout`` seconds.
    """
    checks = list(dict.fromkeys(checks))
    script = _probe_script(checks, port, timeout, "")
    out = e2e.exec(container, "sh", "-c", script, timeout=timeout + 30).stdout
    return _verdicts(checks, out, container)


def remote_probe(
    engine: Engine, checks: Iterable[Check], *, port: int = 80, timeout: int = 2
) -> dict[Check, bool]:
    """:func:`probe` from the remote host (the host's busybox, in the remote netns)."""
    checks = list(dict.fromkeys(checks))
    script = _probe_script(checks, port, timeout, "busybox ")
    out = engine.in_remote("sh", "-c", script, timeout=timeout + 30).stdout
    return _verdicts(checks, out, "the remote host")


def expect_remote_unreachable(
    engine: Engine, targets: Iterable[str], *, port: int = 80, what: str = ""
) -> None:
    """Neither ping nor ``http://target:port/`` from the remote host gets through."""
    got = remote_probe(engine, [(k, t) for t in targets for k in BOTH], port=port)
    leaks = [f"  {k} {t}" for (k, t), ok in got.items() if ok]
    label = f" ({what})" if what else ""
    assert not leaks, (
        "the remote host reaches, but must not"
        + label
        + ":\n"
        + "\n".join(leaks)
        + "\n--- engine netns filter rules (with counters) ---\n"
        + _filter_with_counters(engine)
    )


def expect_reach(
    e2e: Scope,
    container: str,
    expected: Mapping[str, bool],
    *,
    kind: str | tuple[str, ...] = "ping",
    port: int = 80,
    what: str = "",
    ping_only: Mapping[str, bool] | None = None,
) -> None:
    """Assert ``container`` reaches exactly the targets marked True, over each of ``kind``
    (``"ping"``, ``"http"`` or :data:`BOTH`), and the ``ping_only`` ones (e.g. gateways,
    which serve no HTTP) by ping; every check at once, in one ``docker exec``.

    A positive that fails is retried once (a first packet can be lost to ARP); negatives are
    not retried: one success is already a leak.
    """
    kinds = (kind,) if isinstance(kind, str) else kind
    want = {(k, t): ok for k in kinds for t, ok in expected.items()}
    want.update({("ping", t): ok for t, ok in (ping_only or {}).items()})
    got = probe(e2e, container, want, port=port)
    retry = [c for c, ok in want.items() if ok and not got[c]]
    if retry:
        got.update(probe(e2e, container, retry, port=port))
    wrong = {c: got[c] for c, ok in want.items() if got[c] != ok}
    if wrong:
        lines = [
            f"  {k} {t}: {'REACHED but must not' if ok else 'UNREACHABLE but must be'}"
            for (k, t), ok in wrong.items()
        ]
        label = f" ({what})" if what else ""
        raise AssertionError(
            f"from {container}{label}:\n"
            + "\n".join(lines)
            + "\n--- engine netns filter rules (with counters) ---\n"
            + _filter_with_counters(e2e.engine)
        )


BOTH = ("ping", "http")


def _filter_with_counters(engine: Engine) -> str:
    """FORWARD and the plugin's filter chains, with packet counters, for failure reports."""
    p = engine.plugin.prefix.upper()
    out = engine.in_engine_ns("iptables-save", "-c", "-t", "filter", check=False).stdout
    keep = [
        line
        for line in out.splitlines()
        if line.startswith(":FORWARD") or " FORWARD " in line or f" {p}-" in line
    ]
    return "\n".join(keep)


def serve_http(e2e: Scope, container: str, port: int = 80, text: str | None = None) -> str:
    """Start busybox httpd in ``container`` on ``port``; returns the page text it serves."""
    body = text or f"{container}:{port}"
    root = f"/tmp/www{port}"
    e2e.exec(
        container,
        "sh",
        "-c",
        f"mkdir -p {root} && echo {body} > {root}/index.html && httpd -p {port} -h {root}",
    )
    return body


def remote_get(
    engine: Engine,
    host: str,
    port: int,
    path: str = "/",
    *,
    timeout: int = 2,
) -> subprocess.CompletedProcess[str]:
    """``wget`` from the remote host; never raises on failure."""
    return engine.remote_http_get(_url(host, port, path), timeout=timeout, check=False)


def assert_remote_gets(engine: Engine, host: str, port: int, text: str) -> None:
    r = remote_get(engine, host, port, timeout=5)
    if r.returncode != 0:  # one retry: the first SYN can race a just-applied rule
        r = remote_get(engine, host, port, timeout=5)
    assert r.returncode == 0 and text in r.stdout, (
        f"remote host cannot fetch {_url(host, port)} (want {text!r}):\n{r.stdout}{r.stderr}"
    )


def assert_remote_cannot_get(engine: Engine, host: str, port: int) -> None:
    r = remote_get(engine, host, port, timeout=2)
    assert r.returncode != 0, f"remote host fetched {_url(host, port)} but must not:\n{r.stdout}"


def seen_source(e2e: Scope, container: str, remote_url: str) -> str:
    """The source address the remote host saw for a request from ``container``."""
    r = e2e.http_get(container, f"{remote_url}/cgi-bin/ip", timeout=5, check=False)
    assert r.returncode == 0, (
        f"{container} cannot reach the remote host {remote_url}:\n{r.stdout}{r.stderr}"
    )
    return r.stdout.strip()


@contextlib.contextmanager
def engine_address(engine: Engine, cidr: str) -> Iterator[str]:
    """An extra address on the engine netns' uplink for the duration; yields the address."""
    engine.in_engine_ns("ip", "addr", "add", cidr, "dev", ENGINE_UPLINK)
    try:
        yield cidr.split("/", maxsplit=1)[0]
    finally:
        engine.in_engine_ns("ip", "addr", "del", cidr, "dev", ENGINE_UPLINK, check=False)


_UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
s.settimeout(60)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b"echo " + data + b" from " + peer[0].encode(), peer)
"""

_UDP_ASK = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[3]))
s.connect((sys.argv[1], int(sys.argv[2])))
for _ in range(3):
    s.send(sys.argv[4].encode())
    try:
        print(s.recv(2048).decode())
        break
    except (TimeoutError, ConnectionRefusedError):
        continue
else:
    sys.exit(1)
"""


@contextlib.contextmanager
def udp_echo(e2e: Scope, container: str, port: int) -> Iterator[None]:
    """A UDP echo server bound in ``container``'s network namespace on ``port``.

    busybox's ``nc`` here has no UDP, so the host's Python runs it, entered into the
    container's netns by PID: datagrams still have to reach that namespace through the
    published port, and answers go back the same way.
    """
    pid = container_pid(e2e, container)
    proc = subprocess.Popen(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "--", sys.executable, "-c", _UDP_ECHO, str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(15.0, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        watchdog.cancel()
        if line.strip() != "ready":
            proc.kill()
            out, err = proc.communicate(timeout=10)
            raise AssertionError(f"UDP echo server in {container} did not start: {out}{err}")
        yield
    finally:
        watchdog.cancel()
        proc.kill()
        proc.communicate(timeout=10)


def remote_udp(
    engine: Engine, host: str, port: int, payload: str = "hello", *, timeout: float = 1.0
) -> str | None:
    """Send ``payload`` from the remote host to ``host:port``/udp; the answer, or None."""
    r = engine.in_remote(
        sys.executable,
        "-c",
        _UDP_ASK,
        host,
        str(port),
        str(timeout),
        payload,
        check=False,
        timeout=timeout * 3 + 15,
    )
    return r.stdout.strip() if r.returncode == 0 else None


# --------------------------------------------------------------------------------------------
# Firewall (read with iptables -S in the engine netns)
# --------------------------------------------------------------------------------------------


#: What marks a rule, chain or jump as the plugin's (its chains are ``<PREFIX>-*``).
def _ours_re(engine: Engine) -> re.Pattern[str]:
    p = engine.plugin.prefix
    return re.compile(rf"\b{p.upper()}-[A-Z0-9-]+\b|\b{p}-driver\b|\b{p}b[0-9a-z]+\b")


def rules(engine: Engine, table: str = "filter", *, v6: bool = False) -> list[str]:
    """``iptables -t TABLE -S`` in the engine netns (no counters, stable order)."""
    tool = "ip6tables" if v6 else "iptables"
    out = engine.in_engine_ns(tool, "-t", table, "-S").stdout
    return [" ".join(line.split()) for line in out.splitlines() if line.strip()]


def our_rules(engine: Engine, table: str = "filter", *, v6: bool = False) -> list[str]:
    """The rules inside the plugin's own chains (``-A PT-...``)."""
    p = engine.plugin.prefix.upper()
    return [r for r in rules(engine, table, v6=v6) if r.startswith(f"-A {p}-")]


def docker_rules(engine: Engine) -> dict[str, list[str]]:
    """Everything in filter, nat and mangle that is not the plugin's: policies, Docker's
    chains and rules, in order. Comparing two snapshots shows whether the plugin changed any
    of it."""
    ours = _ours_re(engine)
    return {
        t: [r for r in rules(engine, t) if not ours.search(r)] for t in ("filter", "nat", "mangle")
    }


def mentions(engine: Engine, needle: str) -> list[str]:
    """Every line of iptables-save and ip6tables-save (filter, nat, mangle) with ``needle``."""
    hits = []
    for tool in ("iptables-save", "ip6tables-save"):
        for table in ("filter", "nat", "mangle"):
            out = engine.in_engine_ns(tool, "-t", table).stdout
            hits += [f"{tool} {table}: {line}" for line in out.splitlines() if needle in line]
    return hits


def forward_chain(engine: Engine) -> list[str]:
    return [
        " ".join(line.split())
        for line in engine.in_engine_ns("iptables", "-S", "FORWARD").stdout.splitlines()
    ]


def dnat_rules(engine: Engine, container_ip: str) -> list[str]:
    """The nat rules that DNAT to ``container_ip`` (any port)."""
    return [r for r in rules(engine, "nat") if f"--to-destination {container_ip}:" in r]


def masquerade_rules(engine: Engine, subnet: str) -> list[str]:
    return [r for r in rules(engine, "nat") if f"-s {subnet} " in r and "MASQUERADE" in r]


# --------------------------------------------------------------------------------------------
# The Docker Engine API (for what the 28.x CLI cannot ask a 20.10 engine)
# --------------------------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("docker", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def docker_api(
    engine: Engine, method: str, path: str, body: Any = None, *, timeout: float = 60.0
) -> tuple[int, Any]:
    """One Engine API call on the engine's socket; returns (status, decoded JSON or text)."""
    conn = _UnixHTTPConnection(str(engine.sock), timeout)
    try:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read().decode(errors="replace")
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return resp.status, raw


def create_container_api(
    e2e: Scope,
    network: str,
    base: str,
    config: Mapping[str, Any],
) -> str:
    """``POST /containers/create`` (then ``docker start``) with extra ``Config`` fields.

    The 28.x CLI refuses ``--mac-address`` against a 1.41 engine ("requires API version
    1.44"), while the 1.41 API itself takes a container-level ``MacAddress``.
    """
    name = e2e.name(base)
    spec = {
        "Image": e2e.engine.image,
        "Hostname": base,
        "Cmd": ["sh", "-c", "trap 'exit 0' TERM INT; sleep 86400 & wait"],
        "HostConfig": {"NetworkMode": network},
        **config,
    }
    e2e.containers.append(name)
    status, doc = docker_api(e2e.engine, "POST", f"/containers/create?name={name}", spec)
    assert status == 201, f"container create failed: HTTP {status} {doc}"
    e2e.docker("start", name, timeout=90)
    return name
