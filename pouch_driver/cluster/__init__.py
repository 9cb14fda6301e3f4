"""The cluster backend: state shared by several Docker hosts, kept in etcd.

Adapters at the kernel/store level; only the composition root builds them.
"""
