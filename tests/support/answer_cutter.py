"""A TCP proxy in front of PostgreSQL that lets every statement through and loses some answers: the reply to
every `every`-th statement that names `marker` is dropped with the connection, after the server ran (and, in
autocommit, committed) it. The client sees "server closed the connection" with its work done."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

# ReadyForQuery: the end of a statement's reply, its transaction over.
READY = b"Z\x00\x00\x00\x05"


class AnswerCutter:
    """Forwards 127.0.0.1:`port` to `target`; counts the answers it cut in `cut`."""

    def __init__(self, target: tuple[str, int], marker: bytes, every: int) -> None:
        self.target = target
        self.marker = marker
        self.every = every
        self.cut = 0
        self._seen = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closing = threading.Event()

    def __enter__(self) -> AnswerCutter:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._closing.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            marked = threading.Event()  # the statement in flight on this connection names the marker
            threading.Thread(target=self._pipe, args=(client, server, marked, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, marked, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, marked: threading.Event, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                if not answers and self.marker in data:
                    marked.set()
                if answers and marked.is_set() and READY in data:
                    marked.clear()
                    if self._lose():
                        break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def _lose(self) -> bool:
        with self._lock:
            self._seen += 1
            if self._seen % self.every:
                return False
            self.cut += 1
            return True
