"""The aiohttp application: factory, the one error renderer, request IDs and deadlines.

Every answer is a JSON object; every failure is ``{"Err": ...}`` with a 4xx/5xx status (the
IPAM proxy also reads ``Err`` on non-200 answers). 404 means only "no such method".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from marshmallow import Schema, ValidationError

from .. import logs
from ..config import Settings
from ..errors import DeadlineExceeded, DriverError, InvalidRequest
from ..kernel import Firewall, Links
from ..kernel.firewall import IptablesFirewall
from ..kernel.links import NetlinkLinks
from ..naming import Names
from ..reconcile import start_up, sweep_forever
from ..service import Service, short
from ..store import Store
from .handlers import CALLS, Call
from .schemas import flatten_errors

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
SERVICE = web.AppKey("service", Service)

_ID_FIELDS = ("NetworkID", "EndpointID", "PoolID")
# Request IDs: process ID and a counter (os.urandom per request showed up in loop stalls).
_PID = os.getpid()
_REQUEST_IDS = itertools.count(1)
IDS = web.RequestKey("ids", str)
Observer = Callable[[str, float, int], None]
OBSERVERS = web.AppKey("observers", list[Observer])


@functools.cache
def _schema(cls: type[Schema]) -> Schema:
    """One instance per schema: building one costs ~0.1 ms, and they hold no request state."""
    return cls()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"Err": message}, status=status)


def _parse_body(raw: bytes, method: str) -> dict[str, Any]:
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
        return _error(404, f"{path} is not implemented by pouch-driver")
    if request.method != "POST":
        return _error(405, f"{path} must be called with POST")
    raw = await request.read()
    method = path.lstrip("/")
    body: dict[str, Any] = {}
    if call.request is not None:
        payload = _parse_body(raw, method)
        ids = " ".join(
            f"{k}={short(str(payload[k]))!r}"
            for k in _ID_FIELDS if isinstance(payload.get(k), str)
        )
        request[IDS] = ids
        log.debug("%s %s payload=%s", method, ids, raw[:2000].decode(errors="replace"))
        try:
            body = _schema(call.request).load(payload)
        except ValidationError as exc:
            raise InvalidRequest("; ".join(flatten_errors(exc.messages))) from None
        except RecursionError:
            raise InvalidRequest("the request is nested too deeply") from None
    svc = request.app[SERVICE]
    result = await call.handler(svc, body)
    return web.json_response(_schema(call.response).dump(result))


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    rid = f"{_PID:x}-{next(_REQUEST_IDS):x}"
    token = logs.request_id.set(rid)
    started = time.perf_counter()
    status = 500
    try:
        async with asyncio.timeout(request.app[SETTINGS].request_timeout):
            response = await handler(request)
        status = response.status
        return response
    except DriverError as exc:
        status = exc.status
        log.warning("%s failed: %s", request.path, exc.message)
        return _error(exc.status, exc.message)
    except TimeoutError:
        status = DeadlineExceeded.status
        log.error("%s exceeded its deadline of %ss", request.path,
                  request.app[SETTINGS].request_timeout)
        return _error(status, f"{request.path.lstrip('/')} did not finish within "
                              f"{request.app[SETTINGS].request_timeout:g}s; see the plugin log")
    except web.HTTPException as exc:
        status = exc.status
        return _error(exc.status, f"{request.path}: {exc.reason}")
    except Exception:
        log.exception("%s crashed", request.path)
        return _error(500, f"internal error in {request.path.lstrip('/')} (request {rid}); "
                           "see the plugin log")
    finally:
        elapsed = time.perf_counter() - started
        log.info("%s %s-> %d in %.1f ms", request.path,
                 f"{request[IDS]} " if IDS in request else "", status, elapsed * 1000)
        for observe in request.app[OBSERVERS]:
            observe(request.path, elapsed, status)
        logs.request_id.reset(token)


def make_app(
    settings: Settings,
    *,
    links: Links | None = None,
    firewall: Firewall | None = None,
) -> web.Application:
    """The plugin as an aiohttp app. Tests pass fakes for ``links`` and ``firewall``."""
    app = web.Application(client_max_size=settings.max_body, middlewares=[error_middleware])
    app[SETTINGS] = settings
    app[OBSERVERS] = []

    async def service_ctx(app: web.Application) -> AsyncIterator[None]:
        svc = Service(
            settings,
            Store(settings.db_path),
            links or NetlinkLinks(workers=settings.netlink_workers),
            firewall or IptablesFirewall(Names(settings.prefix), sysctl_dir=settings.sysctl_dir),
        )
        await start_up(svc)
        sweeper = (
            asyncio.create_task(sweep_forever(svc, settings.gc_interval), name="sweeper")
            if settings.gc_interval > 0 else None
        )
        app[SERVICE] = svc
        yield
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        await svc.stop()

    app.cleanup_ctx.append(service_ctx)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app
