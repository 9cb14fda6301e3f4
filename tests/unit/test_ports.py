"""Host port choice (``ports.resolve_ports``): what a repeated Program keeps."""

from __future__ import annotations

import pytest

from pouch_driver import ports
from pouch_driver.model import PortBinding, Proto

LOW = ports.EPHEMERAL_PORTS[0]


@pytest.fixture(autouse=True)
def every_port_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """No real socket probes: only the choice among our own bindings is under test."""
    monkeypatch.setattr(ports, "port_free", lambda *_a, **_k: True)


def _any(port: int, low: int = 0, high: int = 0, proto: Proto = Proto.TCP) -> PortBinding:
    return PortBinding(proto, port, low, high, None)


def _got(port: int, host_port: int, proto: Proto = Proto.TCP) -> PortBinding:
    return PortBinding(proto, port, host_port, host_port, None)


async def test_port_0_keeps_what_the_endpoint_had_over_the_lowest_free() -> None:
    (b,) = await ports.resolve_ports([_any(80)], [], None, keep=[_got(80, LOW + 1)])
    assert b.host_port == LOW + 1
    (fresh,) = await ports.resolve_ports([_any(80)], [], None)
    assert fresh.host_port == LOW, "the control: without it, the lowest free port"


async def test_a_range_keeps_its_earlier_choice_while_it_is_in_the_range() -> None:
    (b,) = await ports.resolve_ports([_any(80, 8000, 8010)], [], None, keep=[_got(80, 8005)])
    assert b.host_port == 8005
    (b,) = await ports.resolve_ports([_any(80, 8000, 8003)], [], None, keep=[_got(80, 8005)])
    assert b.host_port == 8000, "the range changed: the earlier port is outside it"


async def test_an_earlier_port_now_held_by_another_endpoint_is_not_kept() -> None:
    (b,) = await ports.resolve_ports(
        [_any(80)], [_got(81, LOW + 1)], None, keep=[_got(80, LOW + 1)]
    )
    assert b.host_port == LOW


async def test_each_earlier_binding_serves_the_binding_it_was_for() -> None:
    got = await ports.resolve_ports(
        [_any(80), _any(80, proto=Proto.UDP), _any(443)],
        [],
        None,
        keep=[_got(443, LOW + 7), _got(80, LOW + 5, Proto.UDP), _got(80, LOW + 3)],
    )
    assert [b.host_port for b in got] == [LOW + 3, LOW + 5, LOW + 7]
