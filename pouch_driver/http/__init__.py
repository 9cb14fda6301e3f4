"""The HTTP/protocol layer: app factory, handlers and schemas. Talks only to ``service``."""

from .app import make_app

__all__ = ["make_app"]
