"""HTTP servers on 127.0.0.1 that fail the way real networks do, for the tests of P17.

``FaultyServer(files, mode)`` serves ``files`` ({path: bytes}, with byte ranges) and
misbehaves as ``mode`` says:

- ``"ok"``: a correct server (ranges, HEAD, index pages of folders);
- ``"stall"``: accepts every request and never answers;
- ``"stall-get"``: answers HEADs (sizes) and index pages, never a GET of a file;
- ``"trickle"``: answers GETs with headers, then one byte of the body every ``interval``
  seconds (1: a byte a second);
- ``"endless-index"``: a folder's index page never ends (links, forever);
- ``"flaky"``: the first ``fail`` GETs of each path are 503s, then it serves;
- ``"no-ranges"``: every GET is answered with the whole object (200), ranges ignored;
- ``"reset"``: a range is answered with half of its bytes, then the connection is reset
  (``fail`` times per path; then it serves).

Every handler ends when the server is stopped (a stalled one waits on an event), so the
test's ``with`` block leaves no thread behind.
"""

from __future__ import annotations

import http.server
import re
import socket
import struct
import threading
import time
from collections import Counter


class FaultyServer:
    def __init__(
        self, files: dict[str, bytes], mode: str = "ok", *, fail: int = 2, interval: float = 1.0
    ) -> None:
        self.files, self.mode, self.fail, self.interval = files, mode, fail, interval
        self.stop = threading.Event()
        self.gets: Counter = Counter()
        self.sent = 0  # bytes of endless index pages sent
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                if owner.mode == "stall":
                    owner.stop.wait(30)
                    return
                body = owner.files.get(self.path)
                if body is None:
                    self._status(404 if not self._is_folder() else 200, 0, "text/html")
                    return
                self._status(200, len(body))

            def do_GET(self):
                owner.gets[self.path] += 1
                mode = owner.mode
                if mode == "stall" or (mode == "stall-get" and not self._is_folder()):
                    owner.stop.wait(30)
                    return
                if self._is_folder():
                    if mode == "endless-index":
                        return self._endless_index()
                    return self._index()
                body = owner.files.get(self.path)
                if body is None:
                    return self._status(404, 0)
                if mode == "flaky" and owner.gets[self.path] <= owner.fail:
                    return self._status(503, 0)
                start, end = 0, len(body) - 1
                m = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if mode == "no-ranges":
                    m = None
                if m:
                    start = int(m.group(1))
                    end = min(int(m.group(2)) if m.group(2) else end, end)
                part = body[start : end + 1]
                self.send_response(206 if m else 200)
                if m:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if mode == "trickle":
                    for i in range(len(part)):
                        if owner.stop.wait(owner.interval):
                            return
                        self.wfile.write(part[i : i + 1])
                        self.wfile.flush()
                    return
                if mode == "reset" and owner.gets[self.path] <= owner.fail and len(part) > 1:
                    self.wfile.write(part[: len(part) // 2])
                    self.wfile.flush()
                    linger = struct.pack("ii", 1, 0)  # close with RST, not FIN
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    self.close_connection = True
                    return
                self.wfile.write(part)

            def _is_folder(self) -> bool:
                return self.path.endswith("/")

            def _status(self, code: int, length: int, kind: str = "application/octet-stream"):
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def _index(self):
                names = sorted(p[len(self.path) :] for p in owner.files if p.startswith(self.path))
                page = "".join(f'<a href="{n}">{n}</a>\n' for n in names).encode()
                self._status(200, len(page), "text/html")
                self.wfile.write(page)

            def _endless_index(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                block = "".join(f'<a href="x{i:06d}.npy">x</a>\n' for i in range(4096)).encode()
                deadline = time.monotonic() + 60
                try:
                    while not owner.stop.is_set() and time.monotonic() < deadline:
                        self.wfile.write(block)
                        owner.sent += len(block)
                except OSError:
                    pass  # the client gave up: what the test wants

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 128  # zarr opens ten connections at once: none may wait

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
