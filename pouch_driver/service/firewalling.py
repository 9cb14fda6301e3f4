"""Keeping the firewall in step with the state: one apply serves every request that asked
while the previous one ran."""

from __future__ import annotations

from collections.abc import Callable

from ..kernel import Firewall, FirewallPlan, VxlanFilter
from ..locks import Coalescer
from .desired import firewall_plan
from .state import State


class FirewallSync:
    def __init__(
        self,
        firewall: Firewall,
        state: State,
        *,
        enabled: bool = True,
        vxlan: Callable[[], VxlanFilter | None] = lambda: None,
    ) -> None:
        self._enabled = enabled
        self._firewall = firewall
        self._vxlan = vxlan
        self._coalescer = Coalescer(lambda: firewall.apply(self.plan(state)))

    def plan(self, state: State) -> FirewallPlan:
        return firewall_plan(state.networks.values(), state.endpoints.values(), self._vxlan())

    async def sync(self) -> None:
        """Make the firewall match the state; returns once an apply covering it ran."""
        if self._enabled:
            await self._coalescer.sync()

    async def ready(self) -> None:
        """Bridged traffic passes iptables (br_netfilter loaded, its switches on), or a
        ``KernelError`` that says how to fix the host."""
        if self._enabled:
            await self._firewall.ensure_bridge_netfilter()

    async def idle(self) -> None:
        await self._coalescer.idle()
