"""What the plugin serves, in memory: networks and endpoints, as the store last committed them.

Plain data and queries over it; no I/O. Every change goes through the store first (see
``durable``), then lands here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidRequest, NotFound
from ..model import Endpoint, Network


def short(value: str) -> str:
    """IDs in messages and logs: the first 12 characters, as ``docker`` shows them."""
    return value[:12]


@dataclass
class State:
    networks: dict[str, Network] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)

    def network(self, network_id: str) -> Network:
        net = self.networks.get(network_id)
        if net is None:
            raise NotFound(f"network {short(network_id)} is unknown to pouch-driver")
        return net

    def endpoint(self, network_id: str, endpoint_id: str) -> Endpoint:
        ep = self.endpoint_on(network_id, endpoint_id)
        if ep is None:
            raise NotFound(f"endpoint {short(endpoint_id)} is unknown to pouch-driver")
        return ep

    def endpoint_on(self, network_id: str, endpoint_id: str) -> Endpoint | None:
        """The endpoint, None if unknown; an error if the engine names another network."""
        ep = self.endpoints.get(endpoint_id)
        if ep is not None and ep.network_id != network_id:
            raise InvalidRequest(
                f"endpoint {short(endpoint_id)} belongs to network {short(ep.network_id)}, "
                f"not {short(network_id)}"
            )
        return ep

    def endpoints_of(self, network_id: str) -> list[Endpoint]:
        return [e for e in self.endpoints.values() if e.network_id == network_id]

    def known_links(self) -> set[str]:
        """Every interface name a record of ours stands for."""
        return {n.bridge for n in self.networks.values()} | {
            name for e in self.endpoints.values() for name in (e.host_ifname, e.container_ifname)
        }
