"""A TCP socket pump, run inside a container's network namespace (``nsenter -t PID -n``).

    python -m bench.pump serve PORT          # count what one client sends, answer the count
    python -m bench.pump send HOST PORT SEC  # send for SEC seconds; print "bytes seconds"

Standard library only. The sender times from its first write until the receiver has
acknowledged every byte (the receiver answers the count after EOF), so the figure is what
crossed the bridge and our FORWARD path, not what sat in a socket buffer.
"""

from __future__ import annotations

import socket
import struct
import sys
import time

CHUNK = 256 * 1024


def serve(port: int) -> None:
    with socket.create_server(("0.0.0.0", port), backlog=1) as srv:  # noqa: S104 - a container netns
        print("listening", flush=True)
        conn, _ = srv.accept()
        with conn:
            total = 0
            buf = bytearray(CHUNK)
            while n := conn.recv_into(buf):
                total += n
            conn.sendall(struct.pack("!Q", total))


def send(host: str, port: int, seconds: float) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    payload = b"\0" * CHUNK
    with conn:
        sent = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end:
            conn.sendall(payload)
            sent += CHUNK
        conn.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 8 and (part := conn.recv(8 - len(got))):
            got += part
        elapsed = time.perf_counter() - t0
    (received,) = struct.unpack("!Q", got)
    if received != sent:
        raise SystemExit(f"receiver counted {received} bytes of {sent}")
    print(f"{sent} {elapsed:.6f}", flush=True)


def main(argv: list[str]) -> None:
    if argv[0] == "serve":
        serve(int(argv[1]))
    elif argv[0] == "send":
        send(argv[1], int(argv[2]), float(argv[3]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
