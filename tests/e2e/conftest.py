"""Fixtures for the end-to-end tests: a real dockerd drives the real plugin.

* ``engine`` (session): dockerd + the plugin in a private netns, a remote-host netns, the
  ``pouch-test:busybox`` image. Started once; stopped and erased at session end. Leftovers of
  an interrupted earlier run are removed first.
* ``e2e`` (function): a :class:`~harness.Scope` bound to the engine. It names what the test
  creates ``<base>-t<N>`` and removes it afterwards, then checks that no interface carrying the
  plugin's prefix was left behind (a leak fails the test at teardown).

Set ``PDE2E_LOG_DIR=<dir>`` to keep dockerd's and the plugin's logs after the session (e.g. as
CI artifacts); otherwise they are shown only in failure reports and then erased.

The directory is skipped only when not running as root or when ``dockerd`` is not installed.
When ``CI`` (any value but ``""``/``0``/``false``/``no``), ``PDE2E_REQUIRE=1`` or
``POUCH_DRIVER_TEST_STRICT=1`` is set, those conditions fail the tests instead, so a CI job
can never silently skip them.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Generator, Iterator

import pytest

from .harness import (
    ENGINES,
    PLUGIN_LOG_NOISE,
    Engine,
    Scope,
    SessionLock,
    cleanup_leftovers,
    tail,
    wait_until,
)

_REQUIRED_TOOLS = ("docker", "busybox", "nsenter", "ip", "iptables", "umount")

_engine: Engine | None = None  # for the failure report hook
_log_offsets = pytest.StashKey[tuple[int, int]]()
_test_counter = 0
_timings: dict[str, float] = {}  # filled at engine teardown, shown in the summary


def _required() -> bool:
    if os.environ.get("PDE2E_REQUIRE", "") not in ("", "0"):
        return True
    if os.environ.get("POUCH_DRIVER_TEST_STRICT") == "1":  # scripts/test (see tests/conftest)
        return True
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "e2e tests need root (they run dockerd in a private network namespace)"
    if shutil.which("dockerd") is None:
        return "e2e tests need dockerd (apt-get install docker.io)"
    return None


@pytest.fixture(scope="session", autouse=True)
def _e2e_prerequisites() -> None:
    reason = _skip_reason()
    if reason is not None:
        if _required():
            pytest.fail(
                f"{reason}; CI/PDE2E_REQUIRE/POUCH_DRIVER_TEST_STRICT is set, "
                "so this is an error, not a skip"
            )
        pytest.skip(reason)
    missing = [t for t in _REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"e2e tests need {', '.join(missing)} on PATH")


def _engine_names() -> list[str]:
    """The engines the session drives: ``PDE2E_ENGINES`` (comma-separated), else all."""
    wanted = [n for n in os.environ.get("PDE2E_ENGINES", "").split(",") if n]
    unknown = [n for n in wanted if n not in ENGINES]
    if unknown:
        raise pytest.UsageError(
            f"PDE2E_ENGINES: unknown engine {unknown[0]} (have {list(ENGINES)})"
        )
    return wanted or list(ENGINES)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Every e2e test runs once per engine; pytest groups them so each engine starts once.
    if "engine_kind" in metafunc.fixturenames:
        metafunc.parametrize("engine_kind", _engine_names(), scope="session")


@pytest.fixture(scope="session")
def engine(_e2e_prerequisites: None, engine_kind: str) -> Iterator[Engine]:
    """The session's dockerd + plugin + remote host (see harness.Engine), one per engine."""
    global _engine  # noqa: PLW0603
    kind = ENGINES[engine_kind]
    if kind.bin_dir is not None and not (kind.bin_dir / "dockerd").exists():
        pytest.fail(f"engine {kind.name}: {kind.bin_dir} has no dockerd (run scripts/fetch-engine)")
    lock = SessionLock()
    # Sessions queue (benchmarks and parallel work share one machine): wait for the lock.
    lock.acquire(timeout=float(os.environ.get("PDE2E_LOCK_WAIT", "1800")))
    try:
        t0 = time.monotonic()
        cleanup_leftovers(log=lambda msg: print(f"[pde2e] {msg}"))
        eng = Engine(kind=kind)
        eng.timings["leftover cleanup"] = time.monotonic() - t0
        try:
            eng.start()
        except Exception as exc:  # noqa: BLE001 - any start-up failure: report logs, clean up
            plugin_log = tail(eng.plugin.log_path, 40, drop=PLUGIN_LOG_NOISE)
            logs = (
                f"{type(exc).__name__}: {exc}\n"
                f"--- dockerd log ---\n{tail(eng.log_path, 40)}\n"
                f"--- plugin log ---\n{plugin_log}"
            )
            try:
                eng.close()
            finally:
                pytest.fail(f"e2e engine failed to start: {logs}")
        except BaseException:
            eng.close()
            raise
        _engine = eng
        try:
            yield eng
        finally:
            _engine = None
            try:
                eng.close()
            finally:
                _timings.update({f"{kind.name} {k}": v for k, v in eng.timings.items()})
    finally:
        lock.release()


@pytest.fixture
def e2e(engine: Engine, request: pytest.FixtureRequest) -> Iterator[Scope]:
    """Per-test helper; removes the test's containers and networks afterwards."""
    global _test_counter  # noqa: PLW0603
    _test_counter += 1
    if not engine.plugin.running:
        engine.plugin.start()
    request.node.stash[_log_offsets] = (
        engine.plugin.log_offset(),
        os.path.getsize(engine.log_path),
    )
    baseline = set(engine.plugin_links())
    scope = Scope(engine, _test_counter)
    yield scope
    problems = scope.cleanup()
    try:
        wait_until(
            lambda: not (set(engine.plugin_links()) - baseline),
            timeout=5,
            message="the plugin's interfaces to go away",
        )
    except AssertionError:
        leaked = sorted(set(engine.plugin_links()) - baseline)
        problems.append(f"interfaces left in the engine netns after cleanup: {leaked}")
    if problems:
        pytest.fail("e2e cleanup failed:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Failed e2e test: attach the plugin's and dockerd's log lines written during it."""
    report = yield
    if report.failed and _engine is not None and _log_offsets in item.stash:
        plugin_from, dockerd_from = item.stash[_log_offsets]
        plugin_log = tail(_engine.plugin.log_path, 150, plugin_from, drop=PLUGIN_LOG_NOISE)
        report.sections.append(("plugin log (this test)", plugin_log))
        report.sections.append(
            ("dockerd log (this test, tail)", tail(_engine.log_path, 60, dockerd_from))
        )
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _timings:
        terminalreporter.write_sep("-", "pde2e engine timings")
        for k, v in _timings.items():
            terminalreporter.write_line(f"{k:>26}: {v:6.2f}s")
