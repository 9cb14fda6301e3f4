"""Who may run beside whom: a network is held shared by its endpoints' calls and exclusively by
its own create and delete; an endpoint exclusively by every call on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from ..locks import KeyedLocks


def _net(network_id: str) -> str:
    # Lock keys are namespaced: an EndpointID equal to a NetworkID must not wait on itself.
    return f"net/{network_id}"


def _ep(endpoint_id: str) -> str:
    return f"ep/{endpoint_id}"


class Guards:
    def __init__(self) -> None:
        self._locks = KeyedLocks()

    def network_change(self, network_id: str) -> AbstractAsyncContextManager[None]:
        """Create or delete of the network: no endpoint call on it is half done."""
        return self._locks.exclusive(_net(network_id))

    def network(self, network_id: str) -> AbstractAsyncContextManager[None]:
        """Hold off network create/delete while looking at (or repairing) this network."""
        return self._locks.shared(_net(network_id))

    @asynccontextmanager
    async def endpoint(self, network_id: str, endpoint_id: str) -> AsyncIterator[None]:
        """Hold off every call on this endpoint (its record precedes its veth mid-create)."""
        async with self._locks.shared(_net(network_id)), self._locks.exclusive(_ep(endpoint_id)):
            yield

    def endpoint_only(self, endpoint_id: str) -> AbstractAsyncContextManager[None]:
        """The endpoint alone, for a caller already inside its network's guard."""
        return self._locks.exclusive(_ep(endpoint_id))
