"""Consistency oracle for the crash tests: engine, plugin store, kernel and firewall agree.

Four independent views are compared:

* the engine's (``docker network inspect`` of every network of our driver),
* the plugin's own (``pouch-driver status --json``, and its SQLite store read directly for the
  exact set of allocated addresses),
* the kernel's (``ip -json link`` in the engine netns),
* ``pouch-driver check --engine unix://<docker.sock>`` (store vs kernel vs firewall vs engine).

The CLI runs inside the engine netns with the same ``--socket/--state-dir/--prefix`` as the
harness's plugin, as an operator would.
"""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .harness import Engine, nsenter, run

#: One line of the plugin's request log: ``... /NetworkDriver.Join NetworkID='..' -> 200 in``.
REQUEST_RE = re.compile(r"\[[\w-]+\] (/\w+\.\w+) (.*?)-> (\d+) in ")


def plugin_cli(
    engine: Engine,
    *args: str,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """``python -m pouch_driver <command> --socket .. --state-dir .. --prefix .. <args>`` in the
    engine netns; never raises on a non-zero exit."""
    p = engine.plugin
    cmd = [
        sys.executable,
        "-m",
        "pouch_driver",
        args[0],
        "--socket",
        str(p.socket),
        "--state-dir",
        str(p.state_dir),
        "--prefix",
        p.prefix,
        *args[1:],
    ]
    return run(nsenter(engine.netns, cmd), check=False, timeout=timeout)


def engine_url(engine: Engine) -> str:
    return f"unix://{engine.sock}"


def check(engine: Engine, *, with_engine: bool = True) -> subprocess.CompletedProcess[str]:
    args = ["check"] + (["--engine", engine_url(engine)] if with_engine else [])
    return plugin_cli(engine, *args)


def assert_check_clean(engine: Engine, *, with_engine: bool = True) -> None:
    r = check(engine, with_engine=with_engine)
    assert r.returncode == 0, (
        f"pouch-driver check{' --engine' if with_engine else ''} exited {r.returncode}:\n"
        f"{r.stdout}{r.stderr}"
    )
    assert "warning:" not in r.stdout, r.stdout  # the engine must have been compared too


def gc(engine: Engine, *, with_engine: bool = True) -> subprocess.CompletedProcess[str]:
    args = ["gc"] + (["--engine", engine_url(engine)] if with_engine else [])
    r = plugin_cli(engine, *args)
    assert r.returncode == 0, f"pouch-driver gc exited {r.returncode}:\n{r.stdout}{r.stderr}"
    return r


def status(engine: Engine) -> dict[str, Any]:
    r = plugin_cli(engine, "status", "--json")
    assert r.returncode == 0, f"pouch-driver status failed:\n{r.stdout}{r.stderr}"
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def stored_addresses(engine: Engine) -> dict[str, list[tuple[str, str]]]:
    """Pool ID -> [(address, kind)] straight from the plugin's SQLite store (read-only)."""
    db = sqlite3.connect(
        f"file:{engine.plugin.state_dir / 'state.db'}?mode=ro", uri=True, timeout=10
    )
    try:
        out: dict[str, list[tuple[str, str]]] = {}
        for pool_id, addr, kind in db.execute("SELECT pool_id, address, kind FROM addresses"):
            out.setdefault(pool_id, []).append((addr, kind))
        for (pool_id,) in db.execute("SELECT pool_id FROM pools"):
            out.setdefault(pool_id, [])
        return out
    finally:
        db.close()


def plugin_call(engine: Engine, method: str, body: dict[str, Any]) -> tuple[int, Any]:
    """One request to the plugin's socket, as the engine sends it; (status, decoded body)."""
    data = json.dumps(body).encode()
    head = (
        f"POST /{method} HTTP/1.1\r\nHost: plugin.moby.localhost\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode()
    chunks: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(engine.plugin.socket))
        s.sendall(head + data)
        while chunk := s.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    status_line, _, rest = raw.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(payload or b"null")


def read_http_message(conn: socket.socket, buf: bytearray) -> bytes | None:
    """One HTTP/1.1 message (head + Content-Length body) from ``conn``; None at EOF."""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head_end = buf.index(b"\r\n\r\n") + 4
    length = 0
    for line in bytes(buf[:head_end]).split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(buf) < head_end + length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    msg = bytes(buf[: head_end + length])
    del buf[: head_end + length]
    return msg


def release_orphan_pools(engine: Engine) -> list[str]:
    """ReleasePool every pool the plugin holds that no engine network uses (test hygiene
    after a pool leak: nothing in the plugin's tools does it)."""
    used = {s for n in engine_networks(engine).values() for s in n.subnets}
    done = []
    for pool in status(engine)["Pools"]:
        if pool["Pool"] not in used:
            code, body = plugin_call(engine, "IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]})
            done.append(f"ReleasePool {pool['PoolID']} -> {code} {body}")
    return done


def requests_in_log(text: str) -> list[tuple[str, str, int]]:
    """(path, ids, status) of every request the plugin answered, in order."""
    return [(m[1], m[2].strip(), int(m[3])) for m in REQUEST_RE.finditer(text)]


@dataclass
class EngineNetwork:
    id: str
    name: str
    ipam_driver: str
    subnets: list[str]
    aux: list[str]
    #: endpoint ID -> (container name, IPv4 address without prefix length or "")
    endpoints: dict[str, tuple[str, str]] = field(default_factory=dict)


def engine_networks(engine: Engine) -> dict[str, EngineNetwork]:
    """Every network of our driver, as the engine reports it."""
    ids = engine.docker(
        "network", "ls", "-q", "--no-trunc", "--filter", f"driver={engine.plugin.name}"
    ).stdout.split()
    out: dict[str, EngineNetwork] = {}
    if not ids:
        return out
    docs = json.loads(engine.docker("network", "inspect", *ids, check=False).stdout or "[]")
    for doc in docs:
        if doc.get("Driver") != engine.plugin.name:
            continue
        configs = (doc.get("IPAM") or {}).get("Config") or []
        net = EngineNetwork(
            id=doc["Id"],
            name=doc["Name"],
            ipam_driver=(doc.get("IPAM") or {}).get("Driver"),
            subnets=[c["Subnet"] for c in configs if c.get("Subnet")],
            aux=[a for c in configs for a in (c.get("AuxiliaryAddresses") or {}).values()],
        )
        for info in (doc.get("Containers") or {}).values():
            ip = (info.get("IPv4Address") or "").split("/")[0]
            net.endpoints[info["EndpointID"]] = (info.get("Name", "?"), ip)
        out[net.id] = net
    return out


def our_links(engine: Engine) -> list[dict[str, Any]]:
    """``ip -json link`` entries in the engine netns carrying the plugin's prefix."""
    p = engine.plugin.prefix
    doc = json.loads(engine.in_engine_ns("ip", "-json", "link", "show").stdout)
    return [lk for lk in doc if re.match(rf"^{p}[bhc][0-9a-z]+$", lk.get("ifname", ""))]


@dataclass(frozen=True)
class Problem:
    kind: str
    text: str

    def __str__(self) -> str:
        return self.text


#: Kinds that must hold even right after a crash, before any garbage collection: no
#: interface of ours that the store does not know (and none missing), no address in use that
#: the IPAM could hand out again, no two containers on one address.
CRASH_INVARIANTS = frozenset({"link-leaked", "link-missing", "address-unallocated", "shared"})


def problems_after_settling(engine: Engine, timeout: float, interval: float) -> list[str]:
    """The consistency problems left once the plugin's own start-up and sweep have had up to
    ``timeout`` seconds to settle them (empty as soon as there are none)."""
    deadline = time.monotonic() + timeout
    while (
        problems := [str(p) for p in consistency_problems(engine)]
    ) and time.monotonic() < deadline:
        time.sleep(interval)
    return problems


def consistency_problems(engine: Engine) -> list[Problem]:
    """Every disagreement between engine, plugin store/status and kernel (empty = consistent).

    Expects a quiet engine (no docker operation in flight).
    """
    st = status(engine)
    nets = engine_networks(engine)
    return [
        *_network_problems(st, nets),
        *_endpoint_problems(st, nets),
        *_address_problems(engine, st, nets),
        *_link_problems(engine, st),
    ]


def _network_problems(st: dict[str, Any], nets: dict[str, EngineNetwork]) -> list[Problem]:
    """The plugin holds exactly the engine's networks of our driver."""
    held = {n["NetworkID"]: n for n in st["Networks"]}
    return [
        Problem(
            "network-extra",
            f"plugin holds network {nid[:12]} ({held[nid]['Bridge']}, "
            f"{','.join(held[nid]['Subnets'])}) that the engine does not know",
        )
        for nid in sorted(set(held) - set(nets))
    ] + [
        Problem(
            "network-missing",
            f"engine network {nets[nid].name} ({nid[:12]}) is unknown to the plugin",
        )
        for nid in sorted(set(nets) - set(held))
    ]


def _endpoint_problems(st: dict[str, Any], nets: dict[str, EngineNetwork]) -> list[Problem]:
    """The plugin holds exactly the engine's endpoints, with the same addresses, and no two
    containers share an address on one network."""
    problems: list[Problem] = []
    held = {e["EndpointID"]: e for e in st["Endpoints"]}
    engine_eps = {eid: (n, who) for n in nets.values() for eid, who in n.endpoints.items()}
    for eid in sorted(set(held) - set(engine_eps)):
        e = held[eid]
        problems.append(
            Problem(
                "endpoint-extra",
                f"plugin holds endpoint {eid[:12]} "
                f"({e['Veth']}, {e['Address']}) that the engine does not know",
            )
        )
    for eid in sorted(engine_eps):
        n, (name, ip) = engine_eps[eid]
        if eid not in held:
            problems.append(
                Problem(
                    "endpoint-missing",
                    f"engine endpoint {eid[:12]} of {name} "
                    f"on {n.name} ({ip}) is unknown to the plugin",
                )
            )
        elif ip and (held[eid]["Address"] or "").split("/")[0] != ip:
            problems.append(
                Problem(
                    "endpoint-address",
                    f"endpoint {eid[:12]} of {name}: "
                    f"engine says {ip}, plugin {held[eid]['Address']}",
                )
            )
    for n in nets.values():
        seen: dict[str, str] = {}
        for name, ip in n.endpoints.values():
            if ip and ip in seen:
                problems.append(Problem("shared", f"{name} and {seen[ip]} share {ip} on {n.name}"))
            seen[ip] = name
    return problems


def _address_problems(
    engine: Engine,
    st: dict[str, Any],
    nets: dict[str, EngineNetwork],
) -> list[Problem]:
    """The store holds exactly gateways + aux + endpoint addresses of the networks using our
    IPAM, and exactly their pools."""
    stored = stored_addresses(engine)
    held_nets = {n["NetworkID"]: n for n in st["Networks"]}
    want: dict[str, str] = {}  # address -> why
    want_pools: set[str] = set()
    for nid, n in nets.items():
        if n.ipam_driver != engine.plugin.name:
            continue
        want_pools.update(n.subnets)
        for gw in held_nets.get(nid, {}).get("Gateways", []):
            want[gw.split("/")[0]] = f"gateway of {n.name}"
        want.update(dict.fromkeys(n.aux, f"aux address of {n.name}"))
        want.update(
            {ip: f"address of {name} on {n.name}" for name, ip in n.endpoints.values() if ip}
        )
    # Reclaimed addresses (of endpoints the plugin dropped without the engine's word) are
    # parked until the engine releases them: neither in use nor leaked.
    have = {addr for rows in stored.values() for addr, kind in rows if kind != "reclaimed"}
    problems = [
        Problem(
            "address-leaked",
            f"address {a} is allocated in the plugin's IPAM but "
            "used by nothing the engine knows (leaked)",
        )
        for a in sorted(have - set(want))
    ]
    problems += [
        Problem(
            "address-unallocated",
            f"{want[a]} ({a}) is not allocated in the plugin's IPAM (could be handed out twice)",
        )
        for a in sorted(set(want) - have)
    ]
    pools = {p["Pool"] for p in st["Pools"]}
    problems += [
        Problem("pool-extra", f"pool {p} is held by the plugin's IPAM for no engine network")
        for p in sorted(pools - want_pools)
    ]
    problems += [
        Problem("pool-missing", f"pool {p} of an engine network is not held by the plugin's IPAM")
        for p in sorted(want_pools - pools)
    ]
    used = {p["PoolID"]: (p["Used"], p["Reclaimed"]) for p in st["Pools"]}
    counts = {
        pid: (sum(k != "reclaimed" for _, k in rows), sum(k == "reclaimed" for _, k in rows))
        for pid, rows in stored.items()
    }
    problems += [
        Problem(
            "pool-count",
            f"status says pool {pid} uses/parks {used.get(pid)}, the store holds {count}",
        )
        for pid, count in counts.items()
        if used.get(pid) != count
    ]
    return problems


def _link_problems(engine: Engine, st: dict[str, Any]) -> list[Problem]:
    """Every prefixed interface belongs to a network or endpoint the plugin holds, and every
    held bridge and host veth exists."""
    known = {n["Bridge"] for n in st["Networks"]} | {
        name for e in st["Endpoints"] for name in (e["Veth"], e["SrcName"])
    }
    must = {n["Bridge"] for n in st["Networks"]} | {e["Veth"] for e in st["Endpoints"]}
    names = {lk["ifname"] for lk in our_links(engine)}
    problems = [
        Problem("link-leaked", f"interface {n} belongs to nothing the plugin holds (leaked)")
        for n in sorted(names - known)
    ]
    problems += [
        Problem("link-missing", f"interface {n} of the plugin's store is missing in the kernel")
        for n in sorted(must - names)
    ]
    if st["PendingDeletes"]:
        problems.append(Problem("pending", f"{st['PendingDeletes']} veth deletions pending"))
    return problems


def assert_consistent(engine: Engine, *, timeout: float = 10.0) -> None:
    """Engine, plugin and kernel agree (retried for ``timeout`` s: deferred veth deletes and
    the engine's own cleanup settle), and ``pouch-driver check --engine`` is clean."""
    deadline = time.monotonic() + timeout
    while True:
        problems = consistency_problems(engine)
        if not problems:
            break
        if time.monotonic() > deadline:
            raise AssertionError(
                "engine, plugin and kernel disagree:\n  " + "\n  ".join(map(str, problems))
            )
        time.sleep(0.5)
    assert_check_clean(engine)
