"""pouch-driver: a libnetwork remote network and IPAM driver for Docker and PouchContainer."""

__version__ = "0.1.0"
