"""The one error hierarchy of pouch-driver, rendered once by the HTTP layer as ``{"Err": ...}``.

Nothing here performs I/O. Every class carries the HTTP status it is answered with::

    DriverError (500)                   base; an unexpected failure of ours
     +-- InvalidRequest (400)           malformed JSON, wrong types, bad CIDR/IP/MAC, bad IDs
     |    +-- InvalidOption (400)       a -o / --ipam-opt / endpoint option is unknown or bad
     +-- NotFound (500)                 an ID the call needs is unknown (never 404: the engine
     |                                  reads 404 as "method not implemented")
     +-- Conflict (409)                 address in use, overlapping pool, bridge name taken
     +-- Exhausted (507)                no free pool/address/port, bridge port limit
     +-- KernelError (500)              netlink or firewall refused a change
     +-- StoreError (500)               the durable store failed or is damaged
     |    +-- StoreUnavailable (503)    no member of a remote store (etcd) answered in time
     |    +-- LeaseExpired (500)        a store lease we kept alive is gone
     |    +-- WatchCompacted (500)      a watch's next revision was compacted: re-read, re-watch
     +-- DeadlineExceeded (504)         a request ran past its deadline and was abandoned
"""

from __future__ import annotations


class DriverError(Exception):
    """Base of every error we answer the engine with."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(DriverError):
    status = 400


class InvalidOption(InvalidRequest):
    pass


class NotFound(DriverError):
    # 404 is reserved for unknown methods; an unknown ID is an ordinary failure.
    status = 500


class Conflict(DriverError):
    status = 409


class Exhausted(DriverError):
    status = 507


class KernelError(DriverError):
    status = 500


class StoreError(DriverError):
    status = 500


class StoreUnavailable(StoreError):
    """A remote store could not be reached within the call's deadline; the message names the
    store and every endpoint tried, so an operator knows where to look."""

    status = 503


class LeaseExpired(StoreError):
    def __init__(self, message: str, lease: int) -> None:
        super().__init__(message)
        self.lease = lease


class WatchCompacted(StoreError):
    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class DeadlineExceeded(DriverError):
    status = 504
