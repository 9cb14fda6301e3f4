"""br_netfilter: loaded when missing, its switches turned on, and a fix named when neither
can be done; a host without it does not stop start-up, it fails CreateNetwork. A fake
/proc/sys in a temporary directory stands in for the kernel's."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import pytest

from pouch_driver.config import Settings
from pouch_driver.daemon import build_driver
from pouch_driver.errors import KernelError
from pouch_driver.kernel.fake import FakeFirewall, FakeLinks
from pouch_driver.kernel.sysctl import Sysctls
from pouch_driver.model import IPAMData, NetworkOptions
from pouch_driver.service.reconcile import start_up

KEYS = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables")


def values(sysctl_dir: Path) -> list[str]:
    return [(sysctl_dir / "net/bridge" / k).read_text().strip() for k in KEYS]


async def test_a_missing_module_is_loaded_with_modprobe(tmp_path: Path) -> None:
    """The stand-in modprobe does what the real one would: the module's keys appear."""
    script = (
        "import pathlib, sys; d = pathlib.Path(sys.argv[1]) / 'net/bridge'; "
        "assert sys.argv[2] == 'br_netfilter'; d.mkdir(parents=True); "
        + "; ".join(f"(d / '{k}').write_text('0')" for k in KEYS)
    )
    modprobe = [sys.executable, "-c", script, str(tmp_path)]
    await Sysctls(tmp_path, modprobe=modprobe).ensure_bridge_netfilter()
    assert values(tmp_path) == ["1", "1"]


@pytest.mark.parametrize(
    "modprobe",
    [
        ["/nonexistent/modprobe"],  # no modprobe (a slim image)
        ["false"],  # modprobe fails (no permission, no such module)
        ["true"],  # modprobe "works" but the module stays invisible (a managed plugin)
    ],
)
async def test_no_way_to_load_it_names_the_fix(tmp_path: Path, modprobe: list[str]) -> None:
    with pytest.raises(KernelError, match="load br_netfilter on the host: modprobe br_netfilter"):
        await Sysctls(tmp_path, modprobe=modprobe).ensure_bridge_netfilter()
    assert not (tmp_path / "net").exists()


async def test_without_it_start_up_goes_on_and_create_network_names_the_fix(
    settings: Settings,
) -> None:
    """Start-up only warns (the networks that exist keep what they can); CreateNetwork is
    refused before anything is made, and works once the host is fixed."""
    links, firewall = FakeLinks(), FakeFirewall()
    firewall.bridge_netfilter = False
    driver = build_driver(settings, links=links, firewall=firewall)
    await start_up(driver)
    try:
        v4 = IPAMData(
            "PouchLocal",
            ipaddress.ip_network("10.5.0.0/24"),
            ipaddress.ip_interface("10.5.0.1/24"),
        )
        with pytest.raises(KernelError, match="modprobe br_netfilter"):
            await driver.networks.create_network("1" * 64, NetworkOptions(), [v4], [])
        assert driver.state.networks == {} and links.links == {}
        firewall.bridge_netfilter = True  # the operator ran modprobe br_netfilter
        await driver.networks.create_network("1" * 64, NetworkOptions(), [v4], [])
        assert list(driver.state.networks) == ["1" * 64]
    finally:
        await driver.stop()
