"""The command line of one member of a test etcd cluster: the cluster suite, the multi-host
suite and the cluster benchmark start their members with it (each in its own address range)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

ETCD = "/usr/bin/etcd"


def member_argv(
    name: str,
    data_dir: Path,
    *,
    clients: Sequence[str],
    peer: str,
    cluster: Sequence[tuple[str, str]],
    token: str,
    pki: Path | None = None,
    log_level: str = "warn",
) -> list[str]:
    """``clients``: the URLs it serves (https ones need ``pki``: server.pem/.key and ca.pem,
    client certificates required); ``cluster``: every member's (name, peer URL)."""
    urls = ",".join(clients)
    tls = (
        [
            f"--cert-file={pki / 'server.pem'}",
            f"--key-file={pki / 'server.key'}",
            "--client-cert-auth",
            f"--trusted-ca-file={pki / 'ca.pem'}",
        ]
        if pki is not None
        else []
    )
    return [
        ETCD,
        f"--name={name}",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={urls}",
        f"--advertise-client-urls={urls}",
        *tls,
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster={','.join(f'{n}={u}' for n, u in cluster)}",
        f"--initial-cluster-token={token}",
        "--initial-cluster-state=new",  # ignored once the data dir holds a member
        "--logger=zap",
        f"--log-level={log_level}",
    ]
