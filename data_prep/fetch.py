"""Fetching one image from an untrusted URL list, with the safeguards img2dataset's own fetch lacks.

img2dataset 1.47.0 reads each image with a bare ``urlopen``: its ``timeout`` bounds each socket read, not the
transfer (a server trickling one byte per second holds a thread for as long as it likes); it retries every
failure, 404s included; it follows redirects anywhere, including to loopback and metadata addresses; it reads
bodies of any size, never looks at Content-Type or robots.txt, and hands whatever it got to a decoder that will
allocate the full pixel count of a decompression bomb. :func:`fetch` closes each of these gaps and is swapped in
for img2dataset's fetch by :mod:`data_prep.downloader`:

- one deadline per image over every connection, redirect, retry and read; a watchdog shuts the socket down when
  it passes, so even a read stuck inside the kernel returns;
- every connection (the first and each redirect) goes to an address checked with
  :func:`data_prep.address_guard.is_public_address` at connect time, so a redirect or a DNS answer that changes
  after the pre-download check cannot reach a private network;
- only http and https, no proxies taken from the environment;
- retries only for failures that can pass (timeouts, resets, 5xx, 408, 429), never for 404 and its kind;
- bytes are capped (Content-Length first, then while reading);
- whether a response is an image is decided by its bytes (the format's magic, read by PIL, then img2dataset's
  decode), not by Content-Type: real images are served as text/plain or octet-stream. A Content-Type check is
  opt-in (``check_content_type``); a header that disagrees with the bytes is counted either way;
- X-Robots-Tag opt-outs (img2dataset's own parser) and robots.txt are respected; a robots.txt answered with a 4xx
  means no rules, one that cannot be fetched (network failure, 5xx) is retried like any request and, if it still
  fails, the URLs of that host fail with that error, and the host is tried again later;
- the image header is read before any decode, and images of more than ``max_pixels`` are refused.
"""

from __future__ import annotations

import fnmatch
import functools
import heapq
import http.client
import io
import itertools
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import urllib.robotparser
import warnings
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from PIL import Image

# albumentations (imported with img2dataset) otherwise checks for updates over the network in every process.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
from img2dataset.downloader import is_disallowed  # noqa: E402 - img2dataset's own X-Robots-Tag parser

from data_prep import polite
from data_prep.address_guard import is_allowed_address, parse_networks

USER_AGENT = "Mozilla/5.0 (compatible; {token}; clipline image-text dataset builder; honours robots.txt)"
_CHUNK = 1 << 16
_ROBOTS_MAX_BYTES = 512 * 1024
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
_BACKOFF_S = 0.5
# The header check below refuses large images itself; PIL's warning for them would only add noise per image.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class FetchPolicy:
    """Everything :func:`fetch` needs; picklable, so it travels with the downloader to worker processes."""

    timeout: float = 10.0
    """Seconds any single connect or read may block."""
    deadline: float = 30.0
    """Seconds for the whole image: every attempt, redirect and read."""
    retries: int = 0
    """Extra attempts after a failure that can pass (timeout, reset, 5xx, 408, 429)."""
    max_bytes: int = 20 * 1024 * 1024
    """Largest body read; larger ones are refused."""
    max_pixels: int = 89_478_485
    """Largest width x height accepted, read from the header before decoding (PIL's own bomb threshold)."""
    user_agent_token: str = "clipline"
    disallowed_header_directives: frozenset[str] = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
    respect_robots_txt: bool = True
    allow_private_networks: bool = False
    allowed_networks: tuple[str, ...] = ()
    """CIDRs allowed although not public (e.g. a local server), when allow_private_networks is off."""
    accepted_content_types: tuple[str, ...] = ("image/*", "application/octet-stream", "binary/octet-stream")
    """Content-Type patterns (fnmatch) that agree with image bytes; a response without Content-Type agrees."""
    check_content_type: bool = False
    """Refuse a response whose Content-Type is not accepted, before reading it; off: the bytes decide."""
    max_redirects: int = 5
    per_host_connections: int = 0
    """Most requests at once to one host, per download process (data_prep.polite); 0: no cap."""
    per_host_rate: float = 0.0
    """Most request starts per second to one host, per download process; 0: no limit."""
    max_retry_after: float = 60.0
    """Longest Retry-After (429/503) waited for; a longer one gives the image up."""


class FetchRefused(OSError):
    """A fetch stopped on purpose (policy, not network); never retried."""


class _Transient(Exception):
    """A failure worth another attempt while the deadline allows."""


# ------------------------------------------------------------------------------------------------------------
# The deadline watchdog: one thread per process, a heap of (deadline, socket).


class _Watchdog:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._pending: dict[int, socket.socket] = {}
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, sock: socket.socket) -> int:
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fetch-deadline", daemon=True)
                self._thread.start()
            token = next(self._ids)
            self._pending[token] = sock
            earliest = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, token))
            if earliest:  # the thread sleeps until the earliest deadline; only an earlier one needs to wake it
                self._cv.notify()
            return token

    def cancel(self, token: int) -> None:
        with self._cv:
            self._pending.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap:
                    self._cv.wait()
                deadline, token = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0 and token in self._pending:
                    self._cv.wait(timeout=wait)
                    continue
                heapq.heappop(self._heap)
                sock = self._pending.pop(token, None)
            if sock is not None:
                try:  # unblocks a recv stuck in the kernel; the reader sees EOF or an error
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


_WATCHDOG = _Watchdog()


@dataclass
class _Attempt:
    """Per-image state carried on each Request (redirects included)."""

    policy: FetchPolicy
    deadline: float
    tokens: list[int] = field(default_factory=list)
    retry_after: float = 0.0
    """Seconds the server's last Retry-After asked for (the next retry waits at least that long)."""
    notes: Counter | None = None

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise FetchRefused(f"deadline exceeded ({self.policy.deadline:g}s)")
        return left

    def release(self) -> None:
        for token in self.tokens:
            _WATCHDOG.cancel(token)
        self.tokens.clear()


# ------------------------------------------------------------------------------------------------------------
# urllib plumbing: connections that check where they connect and obey the deadline.


@functools.lru_cache(maxsize=16)
def _networks(cidrs: tuple[str, ...]) -> tuple:
    return parse_networks(cidrs)


def _connect_checked(attempt: _Attempt, host: str, port: int, source_address=None) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno == socket.EAI_AGAIN:
            raise
        raise FetchRefused(f"dns failure: {host}") from None
    if not attempt.policy.allow_private_networks:
        allowed = _networks(attempt.policy.allowed_networks)
        bad = [info[4][0] for info in infos if not is_allowed_address(info[4][0], allowed)]
        if bad:
            raise FetchRefused(f"refused non-public address {bad[0]} for host {host}")
    error: OSError | None = None
    for family, type_, proto, _, address in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.settimeout(min(attempt.policy.timeout, attempt.remaining()))
            if source_address:
                sock.bind(source_address)
            sock.connect(address)  # the checked address itself: no second lookup that could answer differently
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error or OSError(f"cannot connect to {host}")


class _Checked:
    """Mixin for http.client connections: connect only to checked addresses, and put the finished socket (after
    the TLS handshake, whose wrapper replaces the plain socket) under the deadline watchdog."""

    def _setup(self, attempt: _Attempt) -> None:
        self._attempt = attempt
        self._create_connection = lambda address, timeout=None, source=None: _connect_checked(
            attempt, address[0], address[1], source)

    def connect(self):
        super().connect()
        self._attempt.tokens.append(_WATCHDOG.watch(self._attempt.deadline, self.sock))


class _CheckedHTTPConnection(_Checked, http.client.HTTPConnection):
    def __init__(self, *args, attempt: _Attempt, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(attempt)


class _CheckedHTTPSConnection(_Checked, http.client.HTTPSConnection):
    def __init__(self, *args, attempt: _Attempt, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup(attempt)


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_CheckedHTTPConnection, req, attempt=req.clipline_attempt)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_CheckedHTTPSConnection, req, context=self._context, attempt=req.clipline_attempt)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            if urlsplit(new.full_url).scheme.lower() not in ("http", "https"):
                raise FetchRefused(f"redirect to a non-http URL: {new.full_url[:80]}")
            new.clipline_attempt = req.clipline_attempt
            new.timeout = req.timeout
        return new


def _build_opener(max_redirects: int) -> urllib.request.OpenerDirector:
    # Built by hand: build_opener() would add proxies from the environment and the file:, ftp: and data: handlers.
    opener = urllib.request.OpenerDirector()
    redirect = _RedirectHandler()
    redirect.max_redirections = max_redirects
    for handler in (_HTTPHandler(), _HTTPSHandler(), redirect, urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


_OPENERS: dict[int, urllib.request.OpenerDirector] = {}


def _opener(policy: FetchPolicy) -> urllib.request.OpenerDirector:
    if policy.max_redirects not in _OPENERS:
        _OPENERS[policy.max_redirects] = _build_opener(policy.max_redirects)
    return _OPENERS[policy.max_redirects]


# ------------------------------------------------------------------------------------------------------------
# One attempt, retries, robots.txt


def _content_type_ok(value: str | None, accepted: tuple[str, ...]) -> bool:
    if not value:
        return True
    main = value.split(";", 1)[0].strip().lower()
    return any(fnmatch.fnmatchcase(main, pattern) for pattern in accepted)


def _read_capped(response, attempt: _Attempt, max_bytes: int) -> bytes:
    length = response.headers.get("Content-Length")
    if length and length.strip().isdigit() and int(length) > max_bytes:
        raise FetchRefused(f"too large: Content-Length {int(length)} > {max_bytes} bytes")
    buf = bytearray()
    while True:
        attempt.remaining()
        chunk = response.read1(_CHUNK)
        if not chunk:
            break
        buf += chunk
        if len(buf) > max_bytes:
            raise FetchRefused(f"too large: more than {max_bytes} bytes")
    attempt.remaining()  # a read cut short by the watchdog looks like a normal end of stream
    if length and length.strip().isdigit() and len(buf) < int(length):
        raise _Transient(f"truncated body: {len(buf)} of {int(length)} bytes")
    return bytes(buf)


def _open(url: str, attempt: _Attempt):
    policy = attempt.policy
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchRefused(f"unsupported url scheme: {scheme or 'none'}")
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT.format(token=policy.user_agent_token)})
    request.clipline_attempt = attempt
    return _opener(policy).open(request, timeout=min(policy.timeout, attempt.remaining()))


def _classify(err: BaseException) -> BaseException:
    """Map an exception to FetchRefused (final) or _Transient (retry), keeping a readable message."""
    if isinstance(err, (FetchRefused, _Transient)):
        return err
    if isinstance(err, urllib.error.HTTPError):
        message = f"HTTP Error {err.code}: {err.reason}"
        return _Transient(message) if err.code in _RETRY_STATUSES else FetchRefused(message)
    if isinstance(err, urllib.error.URLError):
        reason = err.reason
        if isinstance(reason, FetchRefused):
            return reason
        if isinstance(reason, BaseException):
            return _classify(reason)
        return FetchRefused(f"url error: {reason}")
    if isinstance(err, (TimeoutError, socket.timeout)):
        return _Transient("timed out")
    if isinstance(err, (ConnectionError, http.client.HTTPException, OSError)):
        return _Transient(f"{type(err).__name__}: {err}")
    return FetchRefused(f"{type(err).__name__}: {err}")


def _guarded(attempt: _Attempt, body):
    """Run ``body()`` (one request), mapping any failure to FetchRefused (final) or _Transient (retry)."""
    try:
        return body()
    except BaseException as e:  # noqa: BLE001 - every failure becomes a counted reason
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        if isinstance(e, urllib.error.HTTPError):
            attempt.retry_after = polite.LIMITER.retry_after(e.url, e.code, e.headers.get("Retry-After"),
                                                             attempt.policy.max_retry_after, attempt.notes)
            e.close()
        if time.monotonic() >= attempt.deadline:
            raise FetchRefused(f"deadline exceeded ({attempt.policy.deadline:g}s)") from None
        raise _classify(e) from None
    finally:
        attempt.release()


def _fetch_once(url: str, attempt: _Attempt) -> tuple[bytes, str | None]:
    """The body and its Content-Type."""
    policy = attempt.policy

    def body():
        with polite.LIMITER.slot(url, policy.per_host_connections, policy.per_host_rate, attempt.deadline,
                                 attempt.notes), _open(url, attempt) as response:
            if policy.disallowed_header_directives and is_disallowed(
                    response.headers, policy.user_agent_token.lower(), policy.disallowed_header_directives):
                raise FetchRefused("Use of image disallowed by X-Robots-Tag directive")
            content_type = response.headers.get("Content-Type")
            if policy.check_content_type and not _content_type_ok(content_type, policy.accepted_content_types):
                raise FetchRefused(f"wrong content type: {content_type.split(';')[0].strip()}")
            return _read_capped(response, attempt, policy.max_bytes), content_type

    return _guarded(attempt, body)


def _retrying(once, attempt: _Attempt):
    """``once(attempt)`` until it succeeds, fails for good, or ``retries`` transient failures have been spent;
    FetchRefused with the last failure's message then."""
    policy = attempt.policy
    for n in range(policy.retries + 1):
        try:
            return once(attempt)
        except _Transient as e:
            pause, attempt.retry_after = max(_BACKOFF_S * 2 ** n, attempt.retry_after), 0.0
            if n == policy.retries or time.monotonic() + pause >= attempt.deadline:
                raise FetchRefused(str(e)) from None
            time.sleep(pause)
    raise FetchRefused("no attempt made")


def check_image_header(data: bytes, max_pixels: int) -> str | None:
    """None for a recognised image within ``max_pixels``; otherwise why it is refused. Reads the header only."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        return "decompression bomb"
    except Exception:  # noqa: BLE001 - PIL raises many types for non-images
        return "not a recognised image"
    if width * height > max_pixels:
        return f"decompression bomb: {width}x{height} pixels > {max_pixels}"
    return None


ROBOTS_RETRY_AFTER_S = 60.0
"""A robots.txt that could not be fetched (network failure, 5xx) is asked again after this long; meanwhile the
URLs of its host fail with the same error (a dead host is not asked once per URL)."""


class RobotsCache:
    """robots.txt verdicts per origin, shared by all threads of a process: a fetched (or 4xx) robots.txt is kept
    for the process; a failure to fetch it only for ``retry_after_s``."""

    def __init__(self, retry_after_s: float = ROBOTS_RETRY_AFTER_S) -> None:
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[threading.Event, list]] = {}

    def _entry(self, origin: str, policy: FetchPolicy) -> tuple:
        """(parser or None, the failure) for ``origin``, fetching robots.txt if no thread has or is."""
        with self._lock:
            entry = self._entries.get(origin)
            if entry is not None and entry[0].is_set() and entry[1] and entry[1][0][2] <= time.monotonic():
                entry = None  # a failure whose time is up: ask again
            owner = entry is None
            if owner:
                entry = self._entries[origin] = (threading.Event(), [])
        event, holder = entry
        if owner:
            try:
                parser, failure = _load_robots(origin, policy)
                expires = time.monotonic() + self.retry_after_s if failure else float("inf")
                holder.append((parser, failure, expires))
            finally:
                event.set()
        else:
            event.wait()
        return holder[0][:2] if holder else (None, "robots.txt not read")

    def refusal(self, url: str, policy: FetchPolicy) -> str | None:
        """None if robots.txt lets ``policy.user_agent_token`` fetch ``url``; otherwise why not."""
        parts = urlsplit(url)
        parser, failure = self._entry(f"{parts.scheme.lower()}://{parts.netloc.lower()}", policy)
        if failure:
            return failure
        return None if parser.can_fetch(policy.user_agent_token, url) else "disallowed by robots.txt"


def _load_robots(origin: str, policy: FetchPolicy) -> tuple[urllib.robotparser.RobotFileParser | None, str | None]:
    """The parsed robots.txt, or None and the error that kept it from being read (retried as any request is).

    As RFC 9309 says, a 4xx (401 and 403 included) means there are no rules. A robots.txt that cannot be read
    (network failure, 5xx) means stay out, and the URLs of its host fail with that error: not an opt-out, which
    only a robots.txt that was read can express."""
    parser = urllib.robotparser.RobotFileParser(origin + "/robots.txt")

    def once(attempt: _Attempt) -> str | None:
        def body():
            try:
                with _open(origin + "/robots.txt", attempt) as response:
                    return _read_capped(response, attempt, _ROBOTS_MAX_BYTES).decode("utf-8", "replace")
            except urllib.error.HTTPError as e:
                if 400 <= e.code < 500 and e.code not in _RETRY_STATUSES:
                    e.close()
                    return None
                raise
        return _guarded(attempt, body)

    try:
        text = _retrying(once, _Attempt(policy, time.monotonic() + policy.deadline))
    except FetchRefused as e:
        if str(e).startswith("refused non-public address"):  # the host itself is refused, whatever the path
            return None, str(e)
        return None, f"{e} (while fetching robots.txt)"
    if text is None:
        parser.allow_all = True
    else:
        parser.parse(text.splitlines())
    return parser, None


ROBOTS = RobotsCache()
_NOTES_LOCK = threading.Lock()


def fetch(url: str, policy: FetchPolicy, robots: RobotsCache = ROBOTS,
          notes: Counter | None = None) -> tuple[bytes | None, str | None]:
    """(image bytes, None), or (None, the reason it was not fetched). ``notes`` counts images whose Content-Type
    disagrees with their bytes (``content_type_not_image``)."""
    if policy.respect_robots_txt:
        refused = robots.refusal(url, policy)
        if refused:
            return None, refused
    try:
        data, content_type = _retrying(functools.partial(_fetch_once, url), _Attempt(policy, time.monotonic() + policy.deadline,
                                                                            notes=notes))
    except FetchRefused as e:
        return None, str(e)
    reason = check_image_header(data, policy.max_pixels)
    if reason:
        return None, reason
    if notes is not None and not _content_type_ok(content_type, policy.accepted_content_types):
        with _NOTES_LOCK:  # one Counter per shard, shared by its download threads
            notes["content_type_not_image"] += 1
    return data, None


_REASONS = [
    ("deadline exceeded", "deadline_exceeded"), ("timed out", "timeout"), ("wrong content type", "wrong_content_type"),
    ("too large", "too_large"), ("decompression bomb", "decompression_bomb"),
    ("not a recognised image", "not_an_image"), ("X-Robots-Tag", "opt_out_x_robots_tag"),
    ("disallowed by robots.txt", "opt_out_robots_txt"), ("refused non-public address", "refused_private_address"),
    ("redirect to a non-http", "refused_redirect_scheme"), ("truncated body", "truncated"),
    ("dns failure", "dns_failure"), ("redirect error", "too_many_redirects"),
    ("Image decoding error", "decode_error"), ("Connection", "connection_error"),
    ("RemoteDisconnected", "connection_error"),
]


def failure_reason(message: str | None) -> str:
    """A short, countable reason for a fetch or decode error message ('http_404', 'deadline_exceeded', ...)."""
    message = message or "unknown"
    if message.startswith("HTTP Error "):
        return "http_" + message[len("HTTP Error "):].split(":", 1)[0]
    for needle, reason in _REASONS:
        if needle in message:
            return reason
    return "other"
