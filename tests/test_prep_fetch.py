"""data_prep.fetch against a misbehaving loopback server, in-process: one test per safeguard img2dataset lacks."""

from __future__ import annotations

import socket
import time
from collections import Counter

import pytest

from data_prep.fetch import FetchPolicy, RobotsCache, check_image_header, failure_reason, fetch

from conftest import make_samples
from prep_server import MisbehavingServer, jpeg, png_bomb

IMAGE = make_samples(1, seed=5, image_size=48)[0]["jpg"]
POLICY = FetchPolicy(timeout=1.0, deadline=3.0, retries=2, max_bytes=100_000, allowed_networks=("127.0.0.1/32",))


@pytest.fixture(scope="module")
def server():
    with MisbehavingServer({"a.jpg": IMAGE, "big.jpg": jpeg((1200, 1200), quality=100)}, stall_s=2.0,
                           trickle_s=0.2) as s:
        yield s


@pytest.fixture
def loopback_only(monkeypatch):
    """Fail the test if anything connects anywhere but 127.0.0.1."""
    real = socket.socket.connect

    def connect(self, address):
        assert address[0] == "127.0.0.1", f"connection attempted to {address}"
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def _fetch(server, path, policy=POLICY):
    return fetch(server.url(path), policy, RobotsCache())


def test_a_good_image_and_its_redirect(server):
    assert _fetch(server, "img/a.jpg") == (IMAGE, None)
    assert _fetch(server, "redirect/a.jpg") == (IMAGE, None)
    assert _fetch(server, "noctype/a.jpg") == (IMAGE, None)


@pytest.mark.fault
def test_404_is_not_retried_and_500_is(server, fault_row):
    before = dict(server.hits)
    assert _fetch(server, "404/x1") == (None, "HTTP Error 404: Not Found")
    assert _fetch(server, "500/x1") == (None, "HTTP Error 500: Internal Server Error")
    assert server.hits["/404/x1"] - before.get("/404/x1", 0) == 1
    assert server.hits["/500/x1"] - before.get("/500/x1", 0) == 3
    fault_row(area="data prep", fault="HTTP 404 and 500 responses (retries=2)",
              happened=f"404 requested {server.hits['/404/x1'] - before.get('/404/x1', 0)} time, 500 "
                       f"{server.hits['/500/x1'] - before.get('/500/x1', 0)} times; both reported with their status",
              lost="those two images, counted as failures by reason")


@pytest.mark.fault
def test_a_trickling_server_is_cut_at_the_deadline(server, fault_row):
    # timeout=5 s per read never fires at one byte per 0.2 s; the 1.5 s deadline does.
    start = time.monotonic()
    data, error = _fetch(server, "trickle/a.jpg", FetchPolicy(timeout=5.0, deadline=1.5, allowed_networks=("127.0.0.1/32",)))
    assert data is None and error == "deadline exceeded (1.5s)"
    assert time.monotonic() - start < 2.5
    fault_row(area="hostile input", fault="a server trickling one byte per 0.2 s (per-read timeout 5 s)",
              happened=f"cut after {time.monotonic() - start:.1f} s: {error!r}",
              lost="that image only; the download thread is free again")


@pytest.mark.fault
def test_a_stalled_server_times_out_and_the_deadline_covers_retries(server, fault_row):
    start = time.monotonic()
    data, error = _fetch(server, "stall/x2", FetchPolicy(timeout=0.5, deadline=1.2, retries=5,
                                                         allowed_networks=("127.0.0.1/32",)))
    assert data is None and error in ("deadline exceeded (1.2s)", "timed out")
    assert time.monotonic() - start < 2.0
    fault_row(area="data prep", fault="a server that never answers (timeout 0.5 s, 5 retries, deadline 1.2 s)",
              happened=f"given up after {time.monotonic() - start:.1f} s: {error!r}",
              lost="that image only")


CHECK_CT = FetchPolicy(timeout=1.0, deadline=3.0, retries=2, max_bytes=100_000, allowed_networks=("127.0.0.1/32",),
                       check_content_type=True)


def test_the_bytes_decide_and_the_content_type_check_is_opt_in(server):
    notes = Counter()
    for route in ("html", "plain", "noctype", "img"):
        data, error = fetch(server.url(f"{route}/a.jpg"), POLICY, RobotsCache(), notes=notes)
        assert (data, error) == (IMAGE, None), route
    assert notes == {"content_type_not_image": 2}  # text/html and text/plain disagree with the JPEG bytes
    assert _fetch(server, "html/a.jpg", CHECK_CT) == (None, "wrong content type: text/html")
    assert _fetch(server, "noctype/a.jpg", CHECK_CT)[1] is None


@pytest.mark.parametrize("path, error", [
    ("corrupt/x", "not a recognised image"),
    ("bomb/x", "decompression bomb"),
    ("endless/x", "too large: more than 100000 bytes"),
    ("img/big.jpg", None),  # checked below against a smaller cap
    ("optout/a.jpg", "Use of image disallowed by X-Robots-Tag directive"),
    ("private/a.jpg", "disallowed by robots.txt"),
])
@pytest.mark.fault
def test_refusals(server, path, error, fault_row):
    if path == "img/big.jpg":
        data, error_ = _fetch(server, path, FetchPolicy(max_bytes=1000, allowed_networks=("127.0.0.1/32",)))
        assert data is None and error_.startswith("too large: Content-Length")
        fault_row(area="hostile input", fault="a response larger than prep.max_image_bytes (1000 bytes)",
                  happened=f"refused from its header: {error_!r}", lost="no body read")
        return
    got = _fetch(server, path)
    assert got == (None, error)
    fault_row(area="hostile input", fault=f"server route /{path.split('/')[0]}/ ({error.split(':')[0]})",
              happened=f"refused: {got[1]!r}", lost="no image kept")


def test_another_crawlers_opt_out_does_not_apply(server):
    assert _fetch(server, "optout-other/a.jpg") == (IMAGE, None)


@pytest.mark.fault
def test_truncated_transfers_are_retried_then_reported(server, fault_row):
    data, error = _fetch(server, "truncated/a.jpg", FetchPolicy(retries=1, allowed_networks=("127.0.0.1/32",)))
    assert data is None and error.startswith("truncated body")
    assert server.hits["/truncated/a.jpg"] == 2
    fault_row(area="data prep", fault="a body cut short of its Content-Length (retries=1)",
              happened=f"requested {server.hits['/truncated/a.jpg']} times, then reported: {error!r}",
              lost="that image only, counted as truncated")


@pytest.mark.fault
def test_redirects_to_non_public_addresses_are_refused_before_connecting(server, loopback_only, fault_row):
    refused = []
    for target in ("169.254.169.254", "10.0.0.1", "127.0.0.2"):
        data, error = _fetch(server, f"redirect-to/{target}/latest/meta-data")
        assert data is None and error == f"refused non-public address {target} for host {target}"
        refused.append(target)
    fault_row(area="hostile input", fault="302 redirects to cloud-metadata, private and loopback addresses",
              happened=f"{len(refused)} of 3 refused before connecting ({', '.join(refused)}); every connect() "
                       f"went to 127.0.0.1 only", lost="nothing fetched from those addresses")


@pytest.mark.fault
def test_a_host_resolving_to_a_private_address_at_connect_time_is_refused(server, loopback_only, monkeypatch,
                                                                          fault_row):
    # DNS answers may change between the pre-download check and the connection (rebinding): checked again here.
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "rebind.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.8.7", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    data, error = fetch(f"http://rebind.example:{server.port}/img/a.jpg", POLICY, RobotsCache())
    assert data is None and error == "refused non-public address 10.9.8.7 for host rebind.example"
    fault_row(area="hostile input", fault="a DNS name that resolves to a private address at connect time "
                                          "(rebinding)",
              happened=f"refused at connect: {error!r}", lost="nothing fetched")


@pytest.mark.fault
def test_loopback_is_refused_unless_allowed(server, fault_row):
    data, error = _fetch(server, "img/a.jpg", FetchPolicy(respect_robots_txt=False))
    assert data is None and error == "refused non-public address 127.0.0.1 for host 127.0.0.1"
    assert _fetch(server, "img/a.jpg", FetchPolicy(allow_private_networks=True)) == (IMAGE, None)
    fault_row(area="hostile input", fault="a loopback URL with default settings",
              happened=f"refused: {error!r}; fetched only with allow_private_networks=true",
              lost="nothing fetched by default")


@pytest.mark.fault
def test_only_http_schemes_are_opened(tmp_path, fault_row):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(IMAGE)
    data, error = fetch(secret.as_uri(), FetchPolicy(respect_robots_txt=False), RobotsCache())
    assert (data, error) == (None, "unsupported url scheme: file")
    fault_row(area="hostile input", fault="a file:// URL pointing at a local file",
              happened=f"refused: {error!r}", lost="no local file read")


def test_robots_txt_is_read_once_per_host(server):
    robots = RobotsCache()
    before = server.hits["/robots.txt"]
    for _ in range(5):
        assert fetch(server.url("img/a.jpg"), POLICY, robots)[1] is None
    assert fetch(server.url("private/a.jpg"), POLICY, robots) == (None, "disallowed by robots.txt")
    assert server.hits["/robots.txt"] - before == 1


def test_an_unreachable_robots_txt_is_a_network_failure_not_an_opt_out():
    with MisbehavingServer({"a.jpg": IMAGE}) as s:
        url = s.url("img/a.jpg")
    # The server is gone: robots.txt cannot be read, so nothing on that host is fetched, and the URL fails with
    # the connection error it had (counted as such), not as an opt-out.
    data, error = fetch(url, POLICY, RobotsCache())
    assert data is None and error.endswith("(while fetching robots.txt)") and "Connection" in error
    assert failure_reason(error) == "connection_error"


def test_a_robots_txt_failure_is_retried_and_not_kept_for_the_whole_process():
    with MisbehavingServer({"a.jpg": IMAGE}, robots_resets=3) as s:
        robots = RobotsCache(retry_after_s=0.0)
        one_retry = FetchPolicy(timeout=1.0, deadline=3.0, retries=1, allowed_networks=("127.0.0.1/32",))
        # Two attempts, both reset: the URL fails with the reset, counted as a connection error.
        data, error = fetch(s.url("img/a.jpg"), one_retry, robots)
        assert data is None and failure_reason(error) == "connection_error" and s.hits["/robots.txt"] == 2
        # Later (retry_after_s has passed): asked again; one more reset, then the retry reads it.
        assert fetch(s.url("img/a.jpg"), one_retry, robots) == (IMAGE, None)
        assert s.hits["/robots.txt"] == 4
        assert fetch(s.url("private/a.jpg"), one_retry, robots) == (None, "disallowed by robots.txt")
        assert s.hits["/robots.txt"] == 4  # a robots.txt that was read is kept


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_4xx_robots_txt_means_no_rules(status, monkeypatch):
    import urllib.error

    from data_prep import fetch as fetch_module

    def answer(url, attempt):
        raise urllib.error.HTTPError(url, status, "no", {}, None)

    monkeypatch.setattr(fetch_module, "_open", answer)
    parser, failure = fetch_module._load_robots("http://example.invalid", POLICY)
    assert failure is None and parser.can_fetch("clipline", "http://example.invalid/private/a.jpg")


def test_image_header_check_reads_no_pixels():
    assert check_image_header(IMAGE, 10_000) is None
    assert check_image_header(IMAGE, 100) == "decompression bomb: 48x48 pixels > 100"
    # 10^10 pixels is past PIL's own limit (2 x Image.MAX_IMAGE_PIXELS): refused even with our cap raised above it
    assert check_image_header(png_bomb(), 10**12) == "decompression bomb"
    assert check_image_header(b"<html>", 10**6) == "not a recognised image"


@pytest.mark.parametrize("message, reason", [
    ("HTTP Error 404: Not Found", "http_404"), ("deadline exceeded (30s)", "deadline_exceeded"),
    ("refused non-public address 10.0.0.1 for host x", "refused_private_address"),
    ("Use of image disallowed by X-Robots-Tag directive", "opt_out_x_robots_tag"), ("weird", "other"),
])
def test_failure_reasons(message, reason):
    assert failure_reason(message) == reason
