"""A loopback HTTP server that misbehaves in every way a web server can, for the prep tests.

Routes (``NAME`` is a key of the ``images`` dict given to the server):

    /img/NAME                the image, image/jpeg or image/png by extension
    /html/NAME               the image bytes served as text/html
    /plain/NAME              the image bytes served as text/plain
    /noctype/NAME            the image without a Content-Type header
    /404/x, /500/x           those statuses (hits are counted per path, to check retries)
    /stall/x                 waits ``stall_s`` before answering (a timeout)
    /slow/NAME               the image after ``slow_s`` (to make a build take long enough to interrupt)
    /trickle/NAME            the headers, then one byte every ``trickle_s`` (a per-read timeout never fires)
    /truncated/NAME          Content-Length of the whole image, half of it sent, connection closed
    /corrupt/x               random bytes as image/jpeg
    /bomb/x                  a PNG whose header claims 100000 x 100000 pixels (a few hundred bytes)
    /endless/x               a chunked body with no Content-Length that never ends
    /optout/NAME             the image with X-Robots-Tag: noai
    /optout-other/NAME       the image with X-Robots-Tag: otherbot: noai (another crawler's opt-out)
    /redirect/NAME           302 to /img/NAME
    /redirect-to/HOST/PATH   302 to http://HOST:PORT/PATH (e.g. a loopback address the server does not bind)
    /private/NAME            the image, but robots.txt disallows /private/ for the clipline crawler
    /robots.txt              ``robots`` if given, else 404; the first ``robots_resets`` requests get the
                             connection closed without an answer (a reset)
"""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROBOTS_TXT = "User-agent: clipline\nDisallow: /private/\n\nUser-agent: *\nDisallow:\n"


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height pixels, with a tiny (incomplete) image body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


def jpeg(size: tuple[int, int], colour=(200, 30, 30), quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self.server.hits[self.path] += 1
        parts = self.path.lstrip("/").split("/", 1)
        route, rest = parts[0], (parts[1] if len(parts) > 1 else "")
        handler = getattr(self, "_route_" + route.replace("-", "_").replace(".", "_"), None)
        if handler is None:
            self._status(404)
            return
        try:
            handler(rest)
        except (BrokenPipeError, ConnectionResetError):
            pass

    # -- helpers
    def _status(self, code: int, headers: dict | None = None, body: bytes = b""):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _image(self, name: str, content_type: str | None = "auto", extra: dict | None = None):
        data = self.server.images.get(name)
        if data is None:
            self._status(404)
            return
        headers = dict(extra or {})
        if content_type == "auto":
            content_type = "image/png" if name.endswith(".png") else "image/jpeg"
        if content_type:
            headers["Content-Type"] = content_type
        self._status(200, headers, data)

    # -- routes
    def _route_img(self, name):
        self._image(name)

    def _route_private(self, name):
        self._image(name)

    def _route_html(self, name):
        self._image(name, "text/html; charset=utf-8")

    def _route_plain(self, name):
        self._image(name, "text/plain")

    def _route_noctype(self, name):
        self._image(name, None)

    def _route_404(self, _):
        self._status(404, {"Content-Type": "text/html"}, b"not found")

    def _route_500(self, _):
        self._status(500, {"Content-Type": "text/html"}, b"oops")

    def _route_stall(self, _):
        time.sleep(self.server.stall_s)
        self._status(503)

    def _route_slow(self, name):
        time.sleep(self.server.slow_s)
        self._image(name)

    def _route_trickle(self, name):
        data = self.server.images[name]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for i in range(len(data)):
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            if self.server.stopping.wait(self.server.trickle_s):
                return

    def _route_truncated(self, name):
        data = self.server.images[name]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True

    def _route_corrupt(self, _):
        self._status(200, {"Content-Type": "image/jpeg"}, os.urandom(3000))

    def _route_bomb(self, _):
        self._status(200, {"Content-Type": "image/png"}, png_bomb())

    def _route_endless(self, _):
        self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        block = b"\xff" * 65536
        while not self.server.stopping.is_set():
            self.wfile.write(b"%x\r\n" % len(block) + block + b"\r\n")

    def _route_optout(self, name):
        self._image(name, extra={"X-Robots-Tag": "noai"})

    def _route_optout_other(self, name):
        self._image(name, extra={"X-Robots-Tag": "otherbot: noai"})

    def _route_redirect(self, name):
        self._status(302, {"Location": f"/img/{name}"})

    def _route_redirect_to(self, rest):
        host, _, path = rest.partition("/")
        self._status(302, {"Location": f"http://{host}:{self.server.server_address[1]}/{path}"})

    def _route_robots_txt(self, _):
        if self.server.hits[self.path] <= self.server.robots_resets:
            self.close_connection = True  # no status line: the client sees the connection closed
            return
        if self.server.robots is None:
            self._status(404)
        else:
            self._status(200, {"Content-Type": "text/plain"}, self.server.robots.encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request, client_address):
        pass  # clients that give up mid-transfer are the point of this server


class MisbehavingServer:
    """Context manager: ``with MisbehavingServer(images) as s: s.url("img/a.jpg")``."""

    def __init__(self, images: dict[str, bytes], robots: str | None = ROBOTS_TXT, stall_s: float = 3.0,
                 trickle_s: float = 0.2, slow_s: float = 0.05, robots_resets: int = 0):
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.images = images
        self._httpd.robots = robots
        self._httpd.stall_s = stall_s
        self._httpd.trickle_s = trickle_s
        self._httpd.slow_s = slow_s
        self._httpd.robots_resets = robots_resets
        self._httpd.hits = Counter()
        self._httpd.stopping = threading.Event()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> "MisbehavingServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    @property
    def hits(self) -> Counter:
        return self._httpd.hits

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"
