"""Runs a command in a process group of its own and takes the whole group down with it.

    python -m hfedmoe.tracking.server_guard COMMAND [ARG ...]   (stdin: a pipe from the parent)

``hfedmoe ui`` starts ``mlflow server`` through this guard. The server is a tree (uvicorn,
a job runner, its huey consumers), and after SIGTERM the server alone exits in its own
time while its consumers live on; so the guard stops the group: SIGTERM, then SIGKILL
after ``GRACE_S``. It does so when it gets SIGTERM, SIGHUP or SIGINT (the parent stopping
it), when the server exits, and when its stdin reaches end of file: the parent's end of
that pipe closes however the parent dies, SIGKILL included. The guard exits with the
server's return code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

GRACE_S = 5.0


def stop_group(server: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """SIGTERM the server's process group, SIGKILL whatever is left of it after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:  # no member left
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            server.poll()  # reap the leader, or the group never empties
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def main(command: list[str]) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)

    def parent_gone() -> None:
        sys.stdin.buffer.read()  # returns at end of file only
        stop.set()

    threading.Thread(target=parent_gone, daemon=True).start()
    while not stop.wait(0.2) and server.poll() is None:
        pass
    stop_group(server)
    return server.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
