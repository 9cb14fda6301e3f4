"""The HTTP/protocol layer: app factory, middleware, handlers, messages and schemas.

Talks only to the service layer's ``Driver``; never to the kernel, the store or
reconciliation directly.
"""

from .app import DRIVER, make_app

__all__ = ["DRIVER", "make_app"]
