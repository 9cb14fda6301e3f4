"""Fixtures for the multi-host tests: two Docker hosts on one machine, joined by etcd.

* ``hosts`` (session): :func:`harness.bring_up` with two hosts, ``a`` and ``b``, each a netns +
  mount namespace with its own dockerd (a: 20.10, b: 28.5.2) and plugin (lease TTL 3 s), an underlay
  198.51.100.0/24 and three etcd members. Host a joins by flags over ``etcd://``, host b by
  ``POUCH_DRIVER_*`` variables over ``etcds://`` with a client certificate. Started once,
  erased at session end.
* ``mh`` (function): a :class:`Pair` of e2e :class:`~tests.e2e.harness.Scope` objects, one per
  host, with the same test index (so a network has the same name on both hosts). Before the
  test every host and etcd member is up; afterwards the test's containers and networks are
  removed on both hosts and neither may keep an interface or VXLAN entry of them.
  Requires the cluster feature (``serve --cluster``): without it the test skips, or fails
  under ``POUCH_DRIVER_TEST_STRICT=1``.
* ``pair`` (function): the same without that requirement (harness self-checks).

``PDE2E_LOG_DIR=<dir>`` keeps the daemons' logs, as in tests/e2e.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from tests.conftest import STRICT
from tests.e2e.harness import PLUGIN_LOG_NOISE, Scope, tail, wait_until
from tests.etcd_members import ETCD

from .harness import (
    ETCDCTL,
    MIXED_ENGINES,
    Host,
    MultiHost,
    bring_up,
    cluster_feature_available,
    parallel,
)

_REQUIRED_TOOLS = (
    "dockerd",
    "docker",
    "busybox",
    "nsenter",
    "unshare",
    "ip",
    "bridge",
    "iptables",
    "umount",
    "openssl",
    ETCDCTL,
)

_hosts: MultiHost | None = None  # for the failure report hook
_log_offsets = pytest.StashKey[list[tuple[int, int]]]()
_test_counter = 0
_timings: dict[str, float] = {}
#: Engine bugs worked around during the session (shown in the summary, never silent).
_engine_quirks: list[str] = []


def _fail_or_skip(reason: str) -> None:
    if STRICT:
        pytest.fail(f"{reason}; POUCH_DRIVER_TEST_STRICT=1, so this is an error, not a skip")
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "multihost" in item.path.parts:
            item.add_marker(pytest.mark.docker)


@pytest.fixture(scope="session")
def cluster_feature() -> bool:
    return cluster_feature_available()


@pytest.fixture(scope="session")
def hosts(cluster_feature: bool) -> Iterator[MultiHost]:
    """Two hosts, etcd, the underlay (see harness). Host a runs Engine 20.10 and joins etcd by
    flags; host b runs Engine 28.5.2 and joins over TLS by environment variables: every
    scenario crosses both engines and both ways of configuring the cluster."""
    global _hosts  # noqa: PLW0603
    if os.geteuid() != 0:
        _fail_or_skip("multihost tests need root (namespaces, dockerd)")
    missing = [t for t in _REQUIRED_TOOLS if shutil.which(t) is None]
    if not os.access(ETCD, os.X_OK):
        missing.append(ETCD)
    if missing:
        _fail_or_skip(f"multihost tests need {', '.join(missing)} (scripts/setup --test)")
    with bring_up(2, cluster=cluster_feature, vary_config=True, engines=MIXED_ENGINES) as mh:
        _hosts = mh
        try:
            yield mh
        finally:
            _hosts = None
    _timings.update(mh.timings)
    _timings.update({f"host {h.letter} {k}": v for h in mh.hosts for k, v in h.timings.items()})


class Pair:
    """One test's view of the two hosts: a Scope on each, same index, same names."""

    def __init__(self, mh: MultiHost, index: int) -> None:
        self.hosts = mh
        self.index = index
        self.scopes = [Scope(h, index) for h in mh.hosts]

    @property
    def a(self) -> Scope:
        return self.scopes[0]

    @property
    def b(self) -> Scope:
        return self.scopes[1]

    @property
    def ha(self) -> Host:
        return self.hosts.hosts[0]

    @property
    def hb(self) -> Host:
        return self.hosts.hosts[1]

    def host(self, scope: Scope) -> Host:
        h = scope.engine
        assert isinstance(h, Host)
        return h

    def cluster_name(self, base: str) -> str:
        """The ``pouch.cluster`` value of this test's ``base`` network (unique per test)."""
        return f"{base}{self.index}"

    def create_cluster_network(
        self,
        scope: Scope,
        base: str,
        subnet: str,
        *,
        subnet6: str | None = None,
        cluster: str | None = None,
        check: bool = True,
    ) -> str:
        """``docker network create -d pdmh --ipam-driver pdmh --subnet S -o pouch.cluster=C``
        on one host; returns the network name."""
        extra = ["--ipv6", "--subnet", subnet6] if subnet6 else []
        return scope.create_network(
            base,
            subnet=subnet,
            options={"pouch.cluster": cluster or self.cluster_name(base)},
            extra=extra,
            check=check,
        )

    def mesh(self, base: str, subnet: str, *, subnet6: str | None = None) -> str:
        """The same cluster network created on every host (one after the other)."""
        for s in self.scopes:
            name = self.create_cluster_network(s, base, subnet, subnet6=subnet6)
        return name

    def cleanup(self) -> list[str]:
        """Each scope's cleanup, on both hosts at once.

        A network dockerd refuses to remove for "active endpoints" while it lists no
        container on it is Engine 20.10's stale endpoint count after many concurrent
        endpoint operations (moby/moby#42119, with the built-in bridge driver too; a
        dockerd restart recounts): that host's dockerd is restarted and the removal
        retried, and the event is listed in the session summary. A network that does list
        containers is a real leak and reported.
        """
        networks = [list(s.networks) for s in self.scopes]
        problems = [p for ps in parallel(*(s.cleanup for s in self.scopes)) for p in ps]
        if not any("active endpoints" in p for p in problems):
            return problems
        problems = [p for p in problems if "active endpoints" not in p]
        for s, names in zip(self.scopes, networks, strict=True):
            existing = set(s.docker("network", "ls", "--format", "{{.Name}}").stdout.split())
            for name in (n for n in names if n in existing):
                listed = self.host(s).docker_json("network", "inspect", name)[0]["Containers"]
                if listed:
                    problems.append(f"docker network rm {name}: containers left: {listed}")
                    continue
                host = self.host(s)
                host.restart_dockerd()
                r = s.docker("network", "rm", name, check=False)
                note = f"host {host.letter}: network {name} stuck 'has active endpoints'"
                if r.returncode == 0:
                    _engine_quirks.append(f"{note}; removed after a dockerd restart")
                else:
                    problems.append(f"{note}, also after a dockerd restart: {r.stderr.strip()}")
        return problems


def _pair(mh: MultiHost, request: pytest.FixtureRequest) -> Iterator[Pair]:
    global _test_counter  # noqa: PLW0603
    _test_counter += 1
    mh.heal()
    request.node.stash[_log_offsets] = [
        (h.plugin.log_offset(), os.path.getsize(h.log_path)) for h in mh.hosts
    ]
    baseline = [set(h.plugin_links()) for h in mh.hosts]
    # Devices and entries of an earlier test's leak were reported there, not again here.
    old_vxlans = [{vx["ifname"] for vx in h.vxlans()} for h in mh.hosts]
    old_neighbours = [h.remote_neighbours() for h in mh.hosts]
    pair = Pair(mh, _test_counter)
    yield pair
    problems: list[str] = []
    try:
        mh.heal()
    except Exception as exc:  # noqa: BLE001 - reported with the rest
        problems.append(f"healing hosts and etcd: {exc}")
    problems += pair.cleanup()
    for i, h in enumerate(mh.hosts):

        def leaks(h: Host = h, i: int = i) -> tuple[list[str], list[str], list[Any]]:
            return (
                sorted(set(h.plugin_links()) - baseline[i]),
                sorted({vx["ifname"] for vx in h.vxlans()} - old_vxlans[i]),
                sorted(h.remote_neighbours() - old_neighbours[i]),
            )

        def clean(h: Host = h, i: int = i) -> bool:
            return not any(leaks(h, i))

        try:
            wait_until(
                clean,
                timeout=10,
                message=f"host {h.letter}'s interfaces and VXLAN entries to go away",
            )
        except AssertionError:
            links, vxlans, neighbours = leaks()
            problems.append(
                f"host {h.letter} keeps after cleanup: links {links}, vxlans {vxlans}, "
                f"neighbours {neighbours}"
            )
    if problems:
        pytest.fail("multihost cleanup failed:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def mh(hosts: MultiHost, cluster_feature: bool, request: pytest.FixtureRequest) -> Iterator[Pair]:
    """Per-test helper on both hosts; needs the cluster feature."""
    if not cluster_feature:
        _fail_or_skip(
            "the cluster feature (pouch_driver serve --cluster/--advertise-address) is not "
            "in this checkout yet"
        )
    yield from _pair(hosts, request)


@pytest.fixture
def pair(hosts: MultiHost, request: pytest.FixtureRequest) -> Iterator[Pair]:
    """Per-test helper on both hosts, cluster feature or not (harness self-checks)."""
    yield from _pair(hosts, request)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Failed test: attach each host's plugin and dockerd log lines written during it."""
    report = yield
    if report.failed and _hosts is not None and _log_offsets in item.stash:
        offsets: list[tuple[int, int]] = item.stash[_log_offsets]
        for h, (plugin_from, dockerd_from) in zip(_hosts.hosts, offsets, strict=True):
            plugin_log = tail(h.plugin.log_path, 80, plugin_from, drop=PLUGIN_LOG_NOISE)
            report.sections.append((f"host {h.letter} plugin log (this test)", plugin_log))
            report.sections.append(
                (
                    f"host {h.letter} dockerd log (this test, tail)",
                    tail(h.log_path, 30, dockerd_from),
                )
            )
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _engine_quirks:
        terminalreporter.write_sep("-", "pdmh: engine bugs worked around")
        for line in _engine_quirks:
            terminalreporter.write_line(line)
    if _timings:
        terminalreporter.write_sep("-", "pdmh timings")
        for k, v in _timings.items():
            terminalreporter.write_line(f"{k:>28}: {v:6.2f}s")
