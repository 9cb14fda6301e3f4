"""What we ship besides the package: plugin/config.json and the systemd units, checked
against the daemon's own defaults so the three cannot drift apart. (Built and run for real in
tests/e2e/test_managed_plugin.py and tests/e2e/test_service_mode.py.)"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pouch_driver.config import Settings, parse_pools

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "packaging" / "systemd"


def _config() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((REPO / "plugin" / "config.json").read_text())
    return data


def _unit(name: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_plugin_config_interface_and_privileges() -> None:
    cfg = _config()
    assert sorted(cfg["interface"]["types"]) == [
        "docker.ipamdriver/1.0",
        "docker.networkdriver/1.0",
    ]
    sock = cfg["interface"]["socket"]
    assert "/" not in sock
    # /run/docker/plugins/<64 hex>/<socket> must stay under the 108-byte sun_path limit.
    assert len(f"/run/docker/plugins/{'0' * 64}/{sock}") < 108
    entry = cfg["entrypoint"]
    assert entry[:2] == ["/usr/local/bin/pouch-driver", "serve"]
    assert entry[entry.index("--socket") + 1] == f"/run/docker/plugins/{sock}"
    assert cfg["network"]["type"] == "host"
    assert cfg["linux"]["capabilities"] == ["CAP_NET_ADMIN"]


def test_plugin_config_mounts_and_env_match_the_daemon() -> None:
    cfg = _config()
    defaults = Settings()
    mounts = {m["name"]: m for m in cfg["mounts"]}
    assert mounts["state"]["destination"] == str(defaults.state_dir)
    assert mounts["state"]["source"] == str(defaults.state_dir)
    assert mounts["state"]["settable"] == ["source"]
    env = {e["name"]: e for e in cfg["env"]}
    assert env["POUCH_DRIVER_SYSCTL_DIR"]["value"] + "/net" == mounts["sysctl-net"]["destination"]
    assert mounts["sysctl-net"]["source"] == "/proc/sys/net"
    settable = {k: e["value"] for k, e in env.items() if e.get("settable") == ["value"]}
    assert set(settable) == {
        "POUCH_DRIVER_LOG_LEVEL",
        "POUCH_DRIVER_LOG_FORMAT",
        "POUCH_DRIVER_POOLS_V4",
        "POUCH_DRIVER_POOLS_V6",
        "POUCH_DRIVER_PREFIX",
    }
    # The values shown by `docker plugin inspect` are the daemon's defaults.
    assert settable["POUCH_DRIVER_LOG_LEVEL"] == defaults.log_level
    assert settable["POUCH_DRIVER_LOG_FORMAT"] == defaults.log_format
    assert settable["POUCH_DRIVER_PREFIX"] == defaults.prefix
    assert parse_pools(settable["POUCH_DRIVER_POOLS_V4"], v6=False) == defaults.pools_v4
    assert parse_pools(settable["POUCH_DRIVER_POOLS_V6"], v6=True) == defaults.pools_v6


def test_systemd_units_agree_with_the_daemon() -> None:
    service = _unit("pouch-driver.service")
    socket = _unit("pouch-driver.socket")
    assert socket["Socket"]["ListenStream"] == [str(Settings().socket)]
    assert socket["Socket"]["SocketMode"] == ["0660"]
    assert "docker.service" in " ".join(socket["Unit"]["Before"])
    assert "docker.service" in " ".join(service["Unit"]["Before"])
    assert service["Unit"]["Requires"] == ["pouch-driver.socket"]
    (exec_start,) = service["Service"]["ExecStart"]
    # Settings come from the EnvironmentFile: flags would override it.
    assert shlex.split(exec_start) == ["/usr/local/bin/pouch-driver", "serve"]


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    program = Path(sys.executable).with_name("pouch-driver")
    if not program.is_file():
        pytest.skip(f"the pouch-driver command is not installed ({program})")
    for unit in UNITS.iterdir():
        text = unit.read_text()
        # verify insists that the program exists: point it at the installed one.
        text = text.replace("ExecStart=/usr/local/bin/pouch-driver", f"ExecStart={program}")
        (tmp_path / unit.name).write_text(text)
    r = subprocess.run(
        [analyze, "verify", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (
        f"systemd-analyze verify:\n{r.stdout}{r.stderr}"
    )
