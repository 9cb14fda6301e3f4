"""EtcdClient over TLS with client certificates, against a one-member etcd and a CA made here."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pouch_driver.cluster.etcd import EtcdClient, TlsFiles
from pouch_driver.config import Settings
from pouch_driver.daemon import build_driver
from pouch_driver.errors import StoreUnavailable

from .conftest import ETCD, EtcdCluster

URL = "https://127.0.0.1:23797"  # beside the three plain members' 23790-23792


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_pki(d: Path) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=pdetcd-ca", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    (d / "san.cnf").write_text(
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=pdetcd-{name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "1", "-extfile", "san.cnf", "-out", f"{name}.pem",
                 cwd=d)  # fmt: skip


@pytest.fixture
def tls_member(etcd_cluster: EtcdCluster) -> Iterator[Path]:
    """A single TLS member requiring client certificates; its PKI in the returned folder."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test CA")
    d = etcd_cluster.root / "tls"
    d.mkdir()
    _make_pki(d)
    argv = [
        ETCD, "--name=pdetcdtls", f"--data-dir={d / 'data'}",
        f"--listen-client-urls={URL}", f"--advertise-client-urls={URL}",
        "--listen-peer-urls=http://127.0.0.1:23807",
        "--initial-advertise-peer-urls=http://127.0.0.1:23807",
        "--initial-cluster=pdetcdtls=http://127.0.0.1:23807",
        f"--cert-file={d / 'server.pem'}", f"--key-file={d / 'server.key'}",
        "--client-cert-auth", f"--trusted-ca-file={d / 'ca.pem'}",
        "--logger=zap", "--log-level=warn",
    ]  # fmt: skip
    with (d / "etcd.log").open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        give_up = time.monotonic() + 15
        while not (d / "data" / "member" / "wal").exists() and time.monotonic() < give_up:
            time.sleep(0.1)
        time.sleep(0.5)
        yield d
    finally:
        proc.kill()
        proc.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)


async def test_client_certificate_round_trip_and_refusal_without_it(tls_member: Path) -> None:
    d = tls_member
    tls = TlsFiles(ca=d / "ca.pem", cert=d / "client.pem", key=d / "client.key")
    async with EtcdClient([URL], timeout=1.0, deadline=8.0, tls=tls) as client:
        await client.put("/pdtest/tls", "secret")
        kv = await client.get("/pdtest/tls")
        assert kv is not None
        assert kv.value == b"secret"
    no_cert = TlsFiles(ca=d / "ca.pem")
    async with EtcdClient([URL], timeout=0.5, deadline=1.0, tls=no_cert) as client:
        with pytest.raises(StoreUnavailable, match="23797"):
            await client.get("/pdtest/tls")


async def test_the_driver_joins_the_cluster_over_tls_with_client_certificates(
    tls_member: Path, tmp_path: Path
) -> None:
    """``--cluster etcds://`` with ``--cluster-ca/-cert/-key``: the session opens and writes
    this host's record; without the client pair the store refuses and says so."""

    def settings(**certs: Path) -> Settings:
        return Settings(
            socket=tmp_path / "p.sock",
            state_dir=tmp_path / "state",
            cluster="etcds://127.0.0.1:23797",
            advertise_address="198.51.100.9",
            cluster_ca=tls_member / "ca.pem",
            gc_interval=0,
            firewall=False,
            **certs,
        )

    good = build_driver(
        settings(cluster_cert=tls_member / "client.pem", cluster_key=tls_member / "client.key")
    )
    assert good.cluster is not None
    await good.cluster.start()
    try:
        assert await good.cluster.wait_connected(10), good.cluster.last_error
        assert good.status().cluster is not None
        assert "198.51.100.9" in good.cluster.mirror.hosts
    finally:
        await good.stop()
    bad = build_driver(settings())
    assert bad.cluster is not None
    await bad.cluster.start()
    try:
        assert not await bad.cluster.wait_connected(3)
        assert "etcd" in bad.cluster.last_error
    finally:
        await bad.stop()
