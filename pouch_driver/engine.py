"""The engine's own view (Docker Engine API), for the operator tools only.

Never used on the request path: calling the engine while it calls us can deadlock its
start-up (docs/protocol.md §5.6). ``check``/``gc`` use it to find networks and endpoints the engine
has forgotten (an unclean engine exit skips DeleteEndpoint, docs/protocol.md §5.6).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import aiohttp


class EngineUnavailable(Exception):
    pass


@dataclass(frozen=True)
class EngineView:
    networks: frozenset[str]  # IDs of the given networks the engine knows
    endpoints: frozenset[str]  # endpoint IDs the engine has on those networks


def _session(url: str) -> tuple[aiohttp.ClientSession, str]:
    parsed = urlparse(url)
    timeout = aiohttp.ClientTimeout(total=20)
    if parsed.scheme == "unix":
        return (
            aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=parsed.path), timeout=timeout
            ),
            "http://docker",
        )
    if parsed.scheme in ("tcp", "http"):
        return aiohttp.ClientSession(timeout=timeout), f"http://{parsed.netloc}"
    raise EngineUnavailable(f"engine address {url!r}: use unix:///path or tcp://host:port")


async def _get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise EngineUnavailable(f"GET {url}: HTTP {resp.status}")
        return await resp.json(content_type=None)


async def view(url: str, network_ids: Collection[str]) -> EngineView:
    """Which of our networks the engine knows, and the endpoints it has on them."""
    session, base = _session(url)
    try:
        async with session:
            networks: set[str] = set()
            endpoints: set[str] = set()
            for nid in network_ids:
                doc = await _get(session, f"{base}/networks/{nid}")
                if doc is None:
                    continue
                networks.add(nid)
                for info in (doc.get("Containers") or {}).values():
                    if isinstance(info, dict) and info.get("EndpointID"):
                        endpoints.add(info["EndpointID"])
            return EngineView(frozenset(networks), frozenset(endpoints))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise EngineUnavailable(f"cannot reach the engine at {url}: {exc}") from exc


async def forgotten(
    url: str, network_ids: Collection[str], endpoint_ids: Collection[str], settle: float = 2.0
) -> tuple[set[str], set[str]]:
    """Networks and endpoints of ours the engine does not know, in two looks ``settle`` apart.

    Only IDs we held before the first look are candidates, and anything the engine showed in
    either look is kept: an object being created right now is never taken for forgotten.
    """
    first = await view(url, network_ids)
    await asyncio.sleep(settle)
    second = await view(url, network_ids)
    known_nets = first.networks | second.networks
    known_eps = first.endpoints | second.endpoints
    nets = {n for n in network_ids if n not in known_nets}
    eps = {e for e in endpoint_ids if e not in known_eps}
    return nets, eps
