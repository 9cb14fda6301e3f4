"""The composition root: the one place that builds the adapters and wires the driver.

``serve`` (the daemon), the operator commands (offline) and the tests all get their driver
here; tests hand in fakes (``links``, ``firewall``) or a namespace to work in (``netns``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from .cluster.etcd import EtcdClient, TlsFiles
from .cluster.kv import KeyValueStore
from .config import Settings, parse_cluster_url
from .http import make_app
from .kernel import Firewall, Links
from .kernel.iptables import IptablesFirewall
from .kernel.links import NetlinkLinks
from .kernel.sysctl import Sysctls
from .naming import Names
from .service.driver import Driver
from .service.reconcile import start_up, sweep_forever
from .store import Store

log = logging.getLogger(__name__)


def build_driver(
    settings: Settings,
    *,
    links: Links | None = None,
    firewall: Firewall | None = None,
    netns: str | None = None,
) -> Driver:
    """The driver over the real adapters, or over those given. ``netns`` (tests only): the
    kernel adapters work in that network namespace."""
    kv: KeyValueStore | None = None
    if settings.cluster:
        urls, tls = parse_cluster_url(settings.cluster)
        files = TlsFiles(settings.cluster_ca, settings.cluster_cert, settings.cluster_key)
        kv = EtcdClient(urls, tls=files if tls or settings.cluster_cert else None)
    return Driver(
        settings,
        Store(settings.db_path),
        links or NetlinkLinks(workers=settings.netlink_workers, netns=netns),
        firewall
        or IptablesFirewall(
            Names(settings.prefix), Sysctls(settings.sysctl_dir, netns=netns), netns=netns
        ),
        kv,
    )


@contextlib.asynccontextmanager
async def serving(
    settings: Settings,
    *,
    links: Links | None = None,
    firewall: Firewall | None = None,
    netns: str | None = None,
) -> AsyncIterator[Driver]:
    """The driver as the daemon runs it: reconciled before it serves, swept while it does."""
    driver = build_driver(settings, links=links, firewall=firewall, netns=netns)
    await start_up(driver)
    if driver.cluster is not None:
        await driver.cluster.start()
        # Serve soon either way: local networks need no etcd, and cluster calls fail with a
        # clear error until the session opens.
        if not await driver.cluster.wait_connected(3.0):
            log.warning("cluster store not reachable yet: %s", driver.cluster.last_error)
    sweeper = (
        asyncio.create_task(sweep_forever(driver, settings.gc_interval), name="sweeper")
        if settings.gc_interval > 0
        else None
    )
    try:
        yield driver
    finally:
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        await driver.stop()


@contextlib.asynccontextmanager
async def offline(settings: Settings) -> AsyncIterator[Driver]:
    """The driver over the store and the kernel while no daemon runs (the state directory's
    lock keeps one from starting meanwhile): loaded, not reconciled."""
    driver = build_driver(settings)
    await driver.start()
    try:
        yield driver
    finally:
        await driver.stop()


def build_app(
    settings: Settings,
    *,
    links: Links | None = None,
    firewall: Firewall | None = None,
    netns: str | None = None,
) -> web.Application:
    """The plugin's HTTP app, serving a driver built here."""
    return make_app(
        settings, lambda: serving(settings, links=links, firewall=firewall, netns=netns)
    )
