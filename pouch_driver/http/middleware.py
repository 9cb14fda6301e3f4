"""The request pipeline around every call, one job per middleware, outermost first:
request IDs, the access log, the metrics observers, error rendering, the deadline.

Errors are rendered once, here: every failure is ``{"Err": ...}`` with a 4xx/5xx status (the
IPAM side reads ``Err`` on non-200 answers too); 404 means only "no such method".
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from .. import logs
from ..config import Settings
from ..errors import DeadlineExceeded, DriverError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Observer = Callable[[str, float, int], None]

SETTINGS = web.AppKey("settings", Settings)
OBSERVERS = web.AppKey("observers", list[Observer])
#: The request's IDs (network, endpoint, pool) for the access log, set once the body is read.
IDS = web.RequestKey("ids", str)
RID = web.RequestKey("rid", str)
STARTED = web.RequestKey("started", float)

# Request IDs: process ID and a counter (os.urandom per request showed up in loop stalls).
_PID = os.getpid()
_REQUEST_IDS = itertools.count(1)


def error(status: int, message: str) -> web.Response:
    return web.json_response({"Err": message}, status=status)


@web.middleware
async def request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every log line of a request carries its ID."""
    rid = f"{_PID:x}-{next(_REQUEST_IDS):x}"
    request[RID] = rid
    token = logs.request_id.set(rid)
    try:
        return await handler(request)
    finally:
        logs.request_id.reset(token)


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One line per request: the call, the IDs it names, its status and its time."""
    request[STARTED] = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        elapsed = time.perf_counter() - request[STARTED]
        ids = f"{request[IDS]} " if IDS in request else ""
        log.info("%s %s-> %d in %.1f ms", request.path, ids, status, elapsed * 1000)


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Hand each answered request to the observers (the metrics)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        elapsed = time.perf_counter() - started
        for notify in request.app[OBSERVERS]:
            notify(request.path, elapsed, status)


@web.middleware
async def render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Our errors with their status; anything else logged with its traceback, answered 500."""
    try:
        return await handler(request)
    except DriverError as exc:
        log.warning("%s failed: %s", request.path, exc.message)
        return error(exc.status, exc.message)
    except TimeoutError:
        timeout = request.app[SETTINGS].request_timeout
        log.error("%s exceeded its deadline of %ss", request.path, timeout)
        return error(
            DeadlineExceeded.status,
            f"{request.path.lstrip('/')} did not finish within {timeout:g}s; see the plugin log",
        )
    except web.HTTPException as exc:
        return error(exc.status, f"{request.path}: {exc.reason}")
    except Exception:
        log.exception("%s crashed", request.path)
        return error(
            500,
            f"internal error in {request.path.lstrip('/')} (request {request[RID]}); "
            "see the plugin log",
        )


@web.middleware
async def deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The engine waits forever for a v1 plugin (docs/protocol.md §1.4): we do not."""
    async with asyncio.timeout(request.app[SETTINGS].request_timeout):
        return await handler(request)


PIPELINE = (request_ids, access_log, observe, render_errors, deadline)
