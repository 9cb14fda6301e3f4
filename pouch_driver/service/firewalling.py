"""Keeping the firewall in step with the state: one apply serves every request that asked
while the previous one ran."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..kernel import Firewall, FirewallPlan, VxlanFilter
from ..locks import Coalescer
from .desired import PlanMemo, firewall_plan
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
        self._coalescer = Coalescer(lambda: self._apply(state))
        self._memo = PlanMemo()  # only ``_apply`` uses it: the coalescer runs one at a time

    def plan(self, state: State) -> FirewallPlan:
        return firewall_plan(state.networks.values(), state.endpoints.values(), self._vxlan())

    async def _apply(self, state: State) -> None:
        # The records as they are now (a copy: the loop goes on changing the dicts), turned
        # into a plan on a worker thread: a host with hundreds of networks and a thousand
        # ports takes milliseconds to walk.
        networks, endpoints = tuple(state.networks.values()), tuple(state.endpoints.values())
        plan = await asyncio.to_thread(
            firewall_plan, networks, endpoints, self._vxlan(), self._memo
        )
        await self._firewall.apply(plan)

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
