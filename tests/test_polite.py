"""Polite crawling (data_prep.polite through data_prep.fetch): the per-host concurrency cap and rate, and
Retry-After on 429/503, against loopback servers that count concurrent connections."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from data_prep.fetch import FetchPolicy, fetch
from data_prep.polite import retry_after_seconds


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


class CountingServer:
    """Serves /N.jpg; counts concurrent requests (peak); /slowN.jpg first answers 429 with ``retry_after``."""

    def __init__(self, retry_after: str = "1", delay: float = 0.03):
        self.active = 0
        self.served: set[str] = set()
        """Paths answered 200 with the image."""
        self.peak = 0
        self.seen: Counter = Counter()
        self.times: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        server = self
        body = _jpeg()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with server.lock:
                    server.active += 1
                    server.peak = max(server.peak, server.active)
                    server.seen[self.path] += 1
                    server.times.setdefault(self.path, []).append(time.monotonic())
                    first = server.seen[self.path] == 1
                counted = [True]

                def done() -> None:
                    # The request stops counting just before its last bytes go out: once the client has the
                    # whole answer (and frees its slot) this handler is no longer counted, so a next request
                    # that follows at once is not seen as overlapping it.
                    if counted[0]:
                        with server.lock:
                            server.active -= 1
                        counted[0] = False

                try:
                    time.sleep(delay)  # long enough for requests to overlap when nothing caps them
                    if self.path.startswith("/slow") and first:
                        self.send_response(429)
                        self.send_header("Retry-After", retry_after)
                        self.send_header("Content-Length", "0")
                        done()
                        self.end_headers()
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    with server.lock:
                        server.served.add(self.path)
                    done()
                    self.wfile.write(body)
                finally:
                    done()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _policy(**kw) -> FetchPolicy:
    return FetchPolicy(deadline=20, timeout=5, retries=3, respect_robots_txt=False, allow_private_networks=True, **kw)


def test_no_host_sees_more_than_the_cap_and_every_image_arrives_after_429s():
    with CountingServer() as a, CountingServer() as b:
        urls = [s.url(f"{'slow' if i % 10 == 0 else ''}{i}.jpg") for s in (a, b) for i in range(20)]
        notes: Counter = Counter()
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda u: fetch(u, _policy(per_host_connections=2), notes=notes), urls))
    assert all(data is not None for data, _ in results), [r for _, r in results if r]
    # Mutation: ignoring the cap (cap <= 0 branch taken always) lets 8 of the 16 threads in at once per host.
    assert a.peak <= 2 and b.peak <= 2
    assert notes["retry_after"] == 4 and notes["throttled"] > 0
    assert sum(a.seen.values()) == 22 and sum(b.seen.values()) == 22  # 20 images + 2 retried each
    # Mutation: retrying after the exponential backoff alone (0.5 s) instead of the 1 s Retry-After fails here.
    gaps = [t[1] - t[0] for s in (a, b) for p, t in s.times.items() if p.startswith("/slow")]
    assert len(gaps) == 4 and min(gaps) >= 0.95


def test_a_retry_after_longer_than_the_limit_gives_the_image_up():
    with CountingServer(retry_after="120") as s:
        notes: Counter = Counter()
        data, reason = fetch(s.url("slow1.jpg"), _policy(max_retry_after=60), notes=notes)
    assert data is None and reason.startswith("HTTP Error 429")
    assert notes == Counter({"retry_after_too_long": 1}) and s.seen["/slow1.jpg"] == 1


def test_rate_limit_spaces_request_starts():
    with CountingServer() as s:
        start = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: fetch(s.url(f"{i}.jpg"), _policy(per_host_rate=20)), range(10)))
        elapsed = time.monotonic() - start
    assert all(d is not None for d, _ in results)
    assert elapsed >= 9 / 20 - 0.02  # 10 starts at most 20 per second apart: 0.45 s at least


@pytest.mark.parametrize("value, seconds", [("7", 7.0), ("", None), ("soon", None), (None, None)])
def test_retry_after_header_values(value, seconds):
    assert retry_after_seconds(value) == seconds


def test_retry_after_http_date():
    now = time.time()
    assert retry_after_seconds(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)


def test_a_real_build_keeps_each_host_under_the_cap_and_writes_every_served_image(tmp_path):
    """`clipline prep` through img2dataset (2 processes x 8 threads) against two hosts: each sees at most
    processes x per_host_connections requests at once, the 429s are retried after their Retry-After, and the
    shards hold exactly the images the servers served."""
    import json
    import tarfile

    import pandas as pd

    from clipline.cli import main as clipline

    with CountingServer(delay=0.1) as a, CountingServer(delay=0.1) as b:
        paths = [f"{'slow' if i % 8 == 0 else ''}{i}.jpg" for i in range(16)]
        rows = [(s.url(p), f"{name}/{p}") for p in paths for name, s in (("a", a), ("b", b))]
        pd.DataFrame({"url": [u for u, _ in rows], "caption": [f"a red square number {n}" for _, n in rows],
                      "name": [n for _, n in rows]}).to_parquet(tmp_path / "urls.parquet")
        out = tmp_path / "out"
        code = clipline(["prep", f"prep.url_list={tmp_path / 'urls.parquet'}", f"prep.output_dir={out}",
                         "prep.image_size=16", "prep.samples_per_shard=8", "prep.processes=2", "prep.threads=8",
                         "prep.per_host_connections=2", "prep.retries=2", "prep.respect_robots_txt=false",
                         "prep.allow_private_networks=true", "prep.filters.exact_dedup=false"])
    assert code == 0
    # Mutation: ignoring the cap lets up to 16 requests at once reach a host.
    assert 1 <= a.peak <= 4 and 1 <= b.peak <= 4, (a.peak, b.peak)
    written = set()
    for tar in sorted(out.glob("[0-9]*.tar")):
        with tarfile.open(tar) as t:
            written |= {json.loads(t.extractfile(m).read())["name"] for m in t.getmembers()
                        if m.name.endswith(".json")}
    served = {f"{name}{p}" for name, s in (("a", a), ("b", b)) for p in s.served}
    assert len(served) == 32 and written == served
    assert sum(a.seen.values()) == 18 and sum(b.seen.values()) == 18  # 16 images + 2 retried after a 429 each
    stats = json.loads((out / "stats.json").read_text())
    assert stats["politeness"]["retry_after"] == 4 and stats["politeness"]["retry_after_too_long"] == 0
