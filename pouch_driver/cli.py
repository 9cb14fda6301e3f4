"""Command line: argv + environment -> Settings -> one command. Nothing else lives here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

from . import logs
from .config import LOG_LEVELS, Settings, default_environ, from_environ

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pouch-driver",
        description="Docker/PouchContainer network + IPAM driver (libnetwork remote protocol).",
        epilog="Every flag can also be set as POUCH_DRIVER_<NAME> in the environment "
        "(e.g. POUCH_DRIVER_SOCKET); flags win.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--socket", help="plugin socket (default /run/docker/plugins/pouch.sock)")
        p.add_argument("--state-dir", help="state directory (default /var/lib/pouch-driver)")
        p.add_argument("--log-level", choices=LOG_LEVELS, help="default info")
        p.add_argument("--log-format", choices=("text", "json"), help="default text")
        p.add_argument("--prefix", help="1-3 letters starting every interface/chain we own")

    serve = sub.add_parser("serve", help="run the plugin daemon")
    common(serve)
    serve.add_argument("--pools-v4", help="automatic IPv4 pools, CIDR:SIZE[,...]")
    serve.add_argument("--pools-v6", help="automatic IPv6 pools, CIDR:SIZE[,...]")
    serve.add_argument("--socket-group", help="group owning the socket (mode 0660)")
    serve.add_argument("--request-timeout", type=float, help="seconds per request (default 60)")
    serve.add_argument("--metrics", help="Prometheus metrics on unix:/path or 127.0.0.1:PORT")
    cluster_options(serve)

    status = sub.add_parser("status", help="networks, endpoints and pool use")
    common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    cluster_options(status)
    engine_help = (
        "also ask the engine (e.g. unix:///var/run/docker.sock) which networks and "
        "endpoints it still knows"
    )
    check = sub.add_parser(
        "check", help="compare store, kernel and firewall; exit 1 on any difference"
    )
    common(check)
    check.add_argument("--engine", help=engine_help)
    cluster_options(check)
    gc = sub.add_parser("gc", help="repair what check finds")
    common(gc)
    gc.add_argument("--engine", help=engine_help)
    cluster_options(gc)
    gc.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    return parser


def cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cluster",
        help="etcd members for cluster networks: etcd://HOST:PORT[,...] (etcds:// for TLS)",
    )
    p.add_argument("--advertise-address", help="this host's underlay IPv4 (its VTEP)")
    p.add_argument(
        "--cluster-lease-ttl", type=int, help="seconds before a silent host is forgotten (10)"
    )
    p.add_argument("--cluster-ca", help="CA certificate of the etcd members (PEM)")
    p.add_argument("--cluster-cert", help="client certificate for etcd (PEM)")
    p.add_argument("--cluster-key", help="client key for etcd (PEM)")


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        key: getattr(args, key, None)
        for key in (
            "socket",
            "state_dir",
            "log_level",
            "log_format",
            "prefix",
            "socket_group",
            "request_timeout",
            "metrics",
            "cluster",
            "advertise_address",
            "cluster_lease_ttl",
        )
    }
    from pathlib import Path  # noqa: PLC0415

    from .config import parse_pools  # noqa: PLC0415

    for key in ("cluster_ca", "cluster_cert", "cluster_key"):
        overrides[key] = getattr(args, key, None)
    for key in ("socket", "state_dir", "cluster_ca", "cluster_cert", "cluster_key"):
        if overrides[key] is not None:
            overrides[key] = Path(overrides[key])
    if getattr(args, "pools_v4", None):
        overrides["pools_v4"] = parse_pools(args.pools_v4, v6=False)
    if getattr(args, "pools_v6", None):
        overrides["pools_v6"] = parse_pools(args.pools_v6, v6=True)
    return from_environ(default_environ(), **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except ValueError as exc:
        print(f"pouch-driver: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format)
    if args.command == "serve":
        from .server import StartupError, serve  # noqa: PLC0415

        try:
            asyncio.run(serve(settings))
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            return 1
        return 0
    from . import commands  # noqa: PLC0415
    from .errors import DriverError  # noqa: PLC0415

    try:
        if args.command == "status":
            return asyncio.run(commands.status(settings, args.json))
        mode = "plan" if args.command == "gc" and args.dry_run else args.command
        return asyncio.run(commands.check(settings, mode, engine_url=args.engine))
    except (DriverError, RuntimeError) as exc:
        print(f"pouch-driver {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
