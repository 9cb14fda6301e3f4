"""Benchmarks of pouch-driver against Docker's built-in bridge driver and the kernel floor.

Run everything with ``sudo scripts/bench`` (or ``python -m bench`` as root from the repository
root); see ``bench/README.md``. Benchmarks print numbers and ratios measured in the same run
and never assert on time.
"""
