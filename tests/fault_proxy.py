"""A TCP proxy on 127.0.0.1 that forwards to a storage emulator and can be told to fail: after a
given number of object uploads has passed it, every connection is cut (as a dropped network would)."""

from __future__ import annotations

import contextlib
import socket
import threading

UPLOAD = b"POST /upload/storage/v1/b/"


class FaultProxy:
    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.fail_after: int | None = None  # None: never fail
        self.uploads_seen = 0
        self.cut = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def heal(self) -> None:
        self.fail_after, self.uploads_seen = None, 0
        self.cut.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and UPLOAD in data:
                    with self._lock:
                        self.uploads_seen += data.count(UPLOAD)
                        if self.fail_after is not None and self.uploads_seen > self.fail_after:
                            self.cut.set()
                if self.cut.is_set():
                    break  # drop this request mid-flight
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.listener.close()
