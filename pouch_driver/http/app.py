"""The aiohttp application: the factory, and the dispatch of each call to its handler.

The app serves a ``Driver`` it is handed by the composition root (``pouch_driver.daemon``),
through a lifetime context; it builds nothing below the service layer.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from aiohttp import web
from marshmallow import Schema, ValidationError

from ..config import Settings
from ..errors import InvalidRequest
from ..service.driver import Driver
from ..service.state import short
from .handlers import CALLS, Call
from .middleware import IDS, OBSERVERS, PIPELINE, SETTINGS, error
from .schemas import flatten_errors

log = logging.getLogger(__name__)

DRIVER = web.AppKey("driver", Driver)
Lifetime = Callable[[], AbstractAsyncContextManager[Driver]]

_ID_FIELDS = ("NetworkID", "EndpointID", "PoolID")


@functools.cache
def _schema(cls: type[Schema]) -> Schema:
    """One instance per schema: building one costs ~0.1 ms, and they hold no request state."""
    return cls()


def _parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise InvalidRequest("the request body is empty; a JSON object is required")
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad JSON, bad UTF-8 and integers too long to convert.
        raise InvalidRequest(f"malformed JSON: {str(exc)[:200]}") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return payload


async def dispatch(request: web.Request) -> web.Response:
    path = request.path
    call: Call | None = CALLS.get(path)
    if call is None:
        return error(404, f"{path} is not implemented by pouch-driver")
    if request.method != "POST":
        return error(405, f"{path} must be called with POST")
    raw = await request.read()
    message = None
    if call.request is not None:
        payload = _parse_body(raw)
        ids = " ".join(
            f"{k}={short(str(payload[k]))!r}" for k in _ID_FIELDS if isinstance(payload.get(k), str)
        )
        request[IDS] = ids
        log.debug("%s %s payload=%s", path.lstrip("/"), ids, raw[:2000].decode(errors="replace"))
        try:
            message = _schema(call.request).load(payload)
        except ValidationError as exc:
            raise InvalidRequest("; ".join(flatten_errors(exc.messages))) from None
        except RecursionError:
            raise InvalidRequest("the request is nested too deeply") from None
    answer = await call.handler(request.app[DRIVER], message)
    return web.json_response(_schema(call.response).dump(answer))


def make_app(settings: Settings, lifetime: Lifetime) -> web.Application:
    """The plugin as an aiohttp app, serving the driver ``lifetime`` opens and closes."""
    app = web.Application(client_max_size=settings.max_body, middlewares=PIPELINE)
    app[SETTINGS] = settings
    app[OBSERVERS] = []

    async def driver_ctx(app: web.Application) -> AsyncIterator[None]:
        async with lifetime() as driver:
            app[DRIVER] = driver
            yield

    app.cleanup_ctx.append(driver_ctx)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app
