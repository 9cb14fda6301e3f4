"""The plugin app over fakes, driven through aiohttp's real test client."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from pouch_driver.config import Settings
from pouch_driver.daemon import build_app
from pouch_driver.http import DRIVER
from pouch_driver.kernel.fake import FakeFirewall, FakeLinks
from pouch_driver.service.driver import Driver

PAYLOADS = Path(__file__).parent / "payloads"


def payloads(engine: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PAYLOADS / f"{engine}.json").read_text())
    data.pop("_comment", None)
    return data


@dataclass
class Plugin:
    client: TestClient[Any, Any]
    links: FakeLinks
    firewall: FakeFirewall

    @property
    def service(self) -> Driver:
        return self.client.app[DRIVER]  # type: ignore[index]

    async def call(
        self,
        method: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """POST like the engine: no Content-Type, empty body for argument-less calls."""
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        resp = await self.client.post(
            f"/{method}",
            data=data,
            headers={"Accept": "application/vnd.docker.plugins.v1.2+json", **(headers or {})},
        )
        text = await resp.text()
        assert resp.status == status, f"{method}: {resp.status} {text}"
        assert text, "every answer must be a JSON object, never an empty body"
        doc = json.loads(text)
        assert isinstance(doc, dict)
        if status != 200:
            assert doc.get("Err"), f"error answers carry a non-empty Err: {doc}"
        return doc


PluginFactory = Callable[..., Awaitable[Plugin]]


@pytest.fixture
def make_plugin(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    settings: Settings,
) -> PluginFactory:
    async def factory(
        links: FakeLinks | None = None, firewall: FakeFirewall | None = None, **overrides: Any
    ) -> Plugin:
        links = links or FakeLinks()
        firewall = firewall or FakeFirewall()
        app = build_app(settings.with_overrides(**overrides), links=links, firewall=firewall)
        return Plugin(await aiohttp_client(app), links, firewall)

    return factory


@pytest.fixture
async def plugin(make_plugin: PluginFactory) -> Plugin:
    return await make_plugin()
