"""Bounds on one HTTP exchange: a watchdog that shuts a request's socket at its deadline (or when the run
stops), and a line splitter for streamed bodies that stays linear in the body's size.

Used by ``core.llm_http`` (every request to a model server); kept apart because it is about sockets
and threads, not about any server's protocol.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

def _lines(pieces):
    """The lines (without their newline) of a body arriving in ``pieces``, in time linear in its size.

    (requests' ``iter_lines`` joins the pending line with every new piece: quadratic on one long line.)
    """
    buf = bytearray()
    for piece in pieces:
        start, searched = 0, len(buf)  # what is already in ``buf`` holds no newline
        buf += piece
        while (end := buf.find(b"\n", searched)) >= 0:
            yield bytes(buf[start:end])
            start = searched = end + 1
        del buf[:start]
    if buf:
        yield bytes(buf)


class _Connection:
    """The connection a request is using (urllib3's HTTPConnection), noted as it is taken from the pool."""

    conn = None


_in_flight = threading.local()  # .request: the _Connection of the request this thread is making


def _tracking(pool_class):
    """``pool_class`` noting each connection it hands out in this thread's ``_in_flight.request``: the
    watchdog can then shut a request's socket before its response exists (headers that trickle)."""
    class Tracking(pool_class):
        def _get_conn(self, timeout=None):
            conn = super()._get_conn(timeout)
            request = getattr(_in_flight, "request", None)
            if request is not None:
                request.conn = conn
            return conn

    return Tracking


class _Watchdog:
    """Shuts a request's socket when its deadline passes or ``stop`` is set.

    A blocked read then returns at once (EOF or an error); ``fired`` says why ("deadline"/"stop").
    Without it a server that trickles bytes (its headers or its body), or streams forever, could hold a
    worker past any limit. Use it as ``with watch.tracking(): session.post(...)``.
    """

    def __init__(self, deadline: float, stop: threading.Event | None):
        self.connection, self.deadline, self.stop = _Connection(), deadline, stop
        self.fired: str | None = None
        self._done = threading.Event()
        threading.Thread(target=self._run, name="llm-watchdog", daemon=True).start()

    def _run(self) -> None:
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.fired = "deadline"
                break
            if self.stop is not None and self.stop.is_set():
                self.fired = "stop"
                break
            if self._done.wait(min(0.1, left)):
                return
        sock = getattr(self.connection.conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._done.set()

    @contextmanager
    def tracking(self):
        """Note the connections the requests made inside take from the pool (see ``_tracking``)."""
        _in_flight.request = self.connection
        try:
            yield
        finally:
            _in_flight.request = None
