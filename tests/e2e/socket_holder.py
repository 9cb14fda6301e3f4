"""What systemd does for pouch-driver.socket + pouch-driver.service, without systemd as PID 1.

Run as ``systemd-socket-activate -l SOCKET -- python socket_holder.py [options] -- CMD...``:
systemd-socket-activate binds SOCKET and, on the first connection, execs this script with the
listening socket as fd 3 (``LISTEN_FDS=1``, ``LISTEN_PID`` = our pid). We keep that fd open
for our whole life, as PID 1 keeps a .socket unit's socket, and run CMD with it handed on the
same way (fd 3, ``LISTEN_FDS=1``, ``LISTEN_PID`` = CMD's pid). When CMD exits we start it again
after ``--restart-sec`` seconds (``Restart=always`` + ``RestartSec=``). Meanwhile connections
queue in the socket's backlog: nobody is refused.

Events go to stdout, one line each, ``<unix time> start <pid>`` / ``<unix time> exit <pid>
<code>``; ``--pidfile`` holds the pid of the running CMD (removed while none runs).
SIGTERM/SIGINT: stop CMD (SIGTERM, like ``systemctl stop``) and exit. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

LISTEN_FD = 3
# Sets LISTEN_PID to the pid CMD will have (exec keeps it), as systemd does after fork().
_EXEC_WITH_LISTEN_PID = 'LISTEN_PID=$$; LISTEN_FDS=1; export LISTEN_PID LISTEN_FDS; exec "$@"'


def _event(*parts: object) -> None:
    print(f"{time.time():.3f}", *parts, flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restart-sec", type=float, default=1.0)
    parser.add_argument("--pidfile", type=Path, required=True)
    parser.add_argument("cmd", nargs="+")
    args = parser.parse_args(argv)

    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        print("socket_holder: run me under systemd-socket-activate -l SOCKET", file=sys.stderr)
        return 2
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    os.set_inheritable(LISTEN_FD, True)

    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    while not stopping:
        child = subprocess.Popen(
            ["sh", "-c", _EXEC_WITH_LISTEN_PID, "sh", *args.cmd], pass_fds=(LISTEN_FD,)
        )
        args.pidfile.write_text(f"{child.pid}\n")
        _event("start", child.pid)
        if stopping:  # a signal between Popen and here
            child.send_signal(signal.SIGTERM)
        code = child.wait()
        with contextlib.suppress(FileNotFoundError):
            args.pidfile.unlink()
        _event("exit", child.pid, code)
        deadline = time.monotonic() + args.restart_sec
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
