"""Fixtures shared by every suite: settings on short paths, fakes, and the blocking-call guard."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from blockbuster import BlockBuster, blockbuster_ctx

from pouch_driver.config import Settings


@pytest.fixture(autouse=True)
def blockbuster(request: pytest.FixtureRequest) -> Iterator[BlockBuster | None]:
    """Fail any blocking call made on a running event loop (async tests only)."""
    if request.node.get_closest_marker("allow_blocking") or not _is_async(request):
        yield None
        return
    # kernel.links runs only on its worker threads, where pyroute2 drives a private event loop
    # with blocking socket calls; the server's loop never enters it except through the executor.
    with blockbuster_ctx(
        scanned_modules=["pouch_driver"], excluded_modules=["pouch_driver.kernel.links"]
    ) as bb:
        yield bb


def _is_async(request: pytest.FixtureRequest) -> bool:
    import inspect  # noqa: PLC0415

    fn = getattr(request.node, "function", None)
    return fn is not None and inspect.iscoroutinefunction(fn)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: Unix socket paths must stay under 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="pd-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def settings(short_tmp: Path) -> Settings:
    return Settings(
        socket=short_tmp / "p.sock",
        state_dir=short_tmp / "state",
        gc_interval=0,
        prefix="pu",
    )


def is_root() -> bool:
    return os.geteuid() == 0


STRICT = os.environ.get("POUCH_DRIVER_TEST_STRICT") == "1"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Under scripts/test (CI) nothing may skip: a skipped suite is a suite that did not run."""
    report = yield
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under POUCH_DRIVER_TEST_STRICT=1: {report.longrepr}"
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark by directory (a pytestmark in a conftest marks nothing): -m root / -m docker."""
    for item in items:
        parts = item.path.parts
        if "kernel" in parts:
            item.add_marker(pytest.mark.root)
        elif "e2e" in parts:
            item.add_marker(pytest.mark.docker)
