"""Serve a demo split over real HTTP on loopback, so downloaders such as
img2dataset can be exercised end to end without any internet access."""

from __future__ import annotations

import ipaddress
import os
import shutil
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pandas as pd

_CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".parquet": "application/octet-stream",
}
# Several downloader processes x threads can connect at once; the default
# backlog of 5 would make the kernel drop connections under that burst.
_REQUEST_QUEUE_SIZE = 512
# Keep-alive connections from clients that vanish must not pin threads forever.
_IDLE_CONNECTION_TIMEOUT_S = 30
_POLL_INTERVAL_S = 0.05


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = _REQUEST_QUEUE_SIZE

    def __init__(self, address: tuple[str, int], root: Path):
        self.root = root
        super().__init__(address, _FileHandler)

    def handle_error(self, request, client_address) -> None:
        # Downloaders that time out or abort mid-transfer are routine here,
        # not worth a traceback on stderr.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _FileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = _IDLE_CONNECTION_TIMEOUT_S
    server: _Server

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def log_message(self, format: str, *args) -> None:
        pass  # one stderr line per request would drown test and job logs

    def _respond(self, send_body: bool) -> None:
        path = _resolve(self.server.root, self.path)
        if path is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        with open(path, "rb") as f:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", _content_type(path))
            self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            self.end_headers()
            if send_body:
                shutil.copyfileobj(f, self.wfile)


def _resolve(root: Path, request_path: str) -> Path | None:
    """The file a request names, or None if missing or outside ``root``."""
    relative = unquote(urlsplit(request_path).path).lstrip("/")
    if not relative or "\0" in relative:
        return None
    try:
        candidate = (root / relative).resolve()
        # Resolving first defeats both "../" and symlinks pointing outside root.
        if candidate.is_relative_to(root) and candidate.is_file():
            return candidate
    except OSError:  # e.g. a name too long for the filesystem
        pass
    return None


def _content_type(path: Path) -> str:
    return _CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")


def _require_loopback(host: str) -> str:
    address = "127.0.0.1" if host == "localhost" else host
    ip = ipaddress.ip_address(address)
    if ip.version != 4 or not ip.is_loopback:
        raise ValueError(f"LocalImageServer only binds IPv4 loopback, got {host!r}")
    return address


class LocalImageServer:
    """Context manager serving files under ``root`` on an ephemeral loopback port."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(self.root)
        self._requested = (_require_loopback(host), port)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "LocalImageServer":
        self._httpd = _Server(self._requested, self.root)
        # A short poll interval keeps shutdown() from stalling up to 0.5 s.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": _POLL_INTERVAL_S},
            name="LocalImageServer", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = self._thread = None

    @property
    def server_address(self) -> tuple[str, int]:
        if self._httpd is None:
            raise RuntimeError("server is not running; use it as a context manager")
        host, port = self._httpd.server_address[:2]
        return host, port

    @property
    def base_url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}"

    def url_for(self, relative_path: str) -> str:
        return f"{self.base_url}/{quote(relative_path.replace(os.sep, '/').lstrip('/'))}"


_URL_LIST_COLUMNS = ("url", "caption", "colour", "shape", "size", "position", "count",
                     "background", "uid")


def write_url_list(split_parquet: Path, server: LocalImageServer, out_path: Path) -> Path:
    """Turn a split's local ``path`` column into URLs served by ``server``."""
    split_parquet, out_path = Path(split_parquet), Path(out_path)
    frame = pd.read_parquet(split_parquet)
    split_dir = split_parquet.parent.resolve()
    frame["url"] = [server.url_for(_relative_to_root(split_dir / p, server.root))
                    for p in frame["path"]]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        frame[list(_URL_LIST_COLUMNS)].to_parquet(tmp, index=False)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _relative_to_root(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        raise ValueError(f"{path} is not under the served root {root}") from None
