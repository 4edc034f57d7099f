"""One notion of a location for every path in the config: a local path, or an fsspec URL (s3://, gs://, https://,
http://, file://), with brace patterns (``s3://b/laion/{00000..09999}.tar``) and prefix listing of a bucket "folder".

Every stage calls :func:`configure` with the ``storage:`` section once; the functions here then reach remote
filesystems with those options (and each library's own environment as the fallback: AWS_* and ~/.aws for s3fs).
Writes are atomic: local files through :mod:`clipline.io` (temp file + rename), remote objects in one put (an S3
PUT is all or nothing). Credentials are never part of a message: :func:`redact` strips them from URLs and options.

``pipe:CMD`` specs (webdataset's syntax: a shell command whose stdout is the tar) are a shell command, so they are
accepted only where the user wrote them in a config (:func:`check_not_pipe` guards every location read from data).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import IO, Any, Callable

import braceexpand

from clipline.config import StorageConfig
from clipline.errors import UsageError

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
REMOTE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "http", "https", "az", "abfs", "memory")
_SECRET_KEY = re.compile(r"(secret|token|password|passwd|key|credential|session)", re.IGNORECASE)
_CONFIG = StorageConfig()


class StorageError(UsageError):
    """A location that cannot be reached or used; the message names it (credentials redacted) and the fix."""


# -- the location itself ------------------------------------------------------------------------------------------

def configure(cfg: StorageConfig | None) -> None:
    """Use ``cfg`` (the config's storage section) for every later call in this process."""
    global _CONFIG
    _CONFIG = cfg or StorageConfig()


def current() -> StorageConfig:
    return _CONFIG


def protocol(location: str | Path) -> str:
    m = _SCHEME.match(str(location))
    return m.group(1).lower() if m else ""


def is_pipe(location: str | Path) -> bool:
    return str(location).startswith("pipe:")


def is_remote(location: str | Path) -> bool:
    """True for URLs served by a remote filesystem (not local paths, file:// URLs or pipe: commands)."""
    return protocol(location) not in ("", "file")


def local_path(location: str | Path) -> Path:
    """A local path from a path or a file:// URL."""
    text = str(location)
    return Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()


def join(location: str | Path, *parts: str) -> str | Path:
    """``location/part/...``: a Path for a local location, a string URL for a remote one."""
    if not is_remote(location):
        return local_path(location).joinpath(*parts)
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])


def name(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def parent(location: str | Path) -> str | Path:
    if not is_remote(location):
        return local_path(location).parent
    return str(location).rstrip("/").rsplit("/", 1)[0]


def expand(spec: str) -> list[str]:
    """A brace pattern expanded (``a/{00..02}.tar`` -> three names); anything else is itself."""
    return list(braceexpand.braceexpand(spec))


def check_not_pipe(location: str, source: str) -> None:
    """``pipe:`` runs a shell command: never from data (a manifest, a list), only from the config the user wrote."""
    if is_pipe(location):
        raise StorageError(f"{source} names a 'pipe:' command ({redact(location)[:60]}...): pipe: specs run a shell "
                           f"command and are accepted only in the config itself, never from data files")


# -- credentials -------------------------------------------------------------------------------------------------

def redact(text: str | Path) -> str:
    """``text`` with the user:password@ part of any URL in it replaced by ``***@``."""
    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@", r"\1***@", str(text))


def redact_options(options: dict) -> dict:
    """``options`` without the values of secret-looking keys (key, secret, token, password, ...), nested too."""
    out = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out[k] = redact_options(v)
        elif not _SECRET_KEY.search(str(k)):
            out[k] = v
    return out


def _secrets(cfg: StorageConfig) -> list[str]:
    found = []

    def walk(d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif _SECRET_KEY.search(str(k)) and isinstance(v, str) and len(v) >= 4:
                found.append(v)

    walk(cfg.options)
    found += [v for k, v in os.environ.items() if k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN") and len(v) >= 4]
    return found


def scrub(text: str, cfg: StorageConfig | None = None) -> str:
    """An error text fit to show: URL credentials and every configured secret value replaced by ***."""
    text = redact(text)
    for secret in _secrets(cfg or _CONFIG):
        text = text.replace(secret, "***")
    return text


# -- filesystems -------------------------------------------------------------------------------------------------

def storage_options(proto: str, cfg: StorageConfig | None = None) -> dict:
    """The fsspec options for one protocol from the storage section; the rest comes from each library's environment."""
    cfg = cfg or _CONFIG
    opts: dict[str, Any] = {}
    if proto in ("s3", "s3a"):
        client: dict[str, Any] = {}
        if cfg.endpoint_url:
            opts["endpoint_url"] = cfg.endpoint_url
        if cfg.region:
            client["region_name"] = cfg.region
        if cfg.profile:
            opts["profile"] = cfg.profile
        if client:
            opts["client_kwargs"] = client
    if proto in ("http", "https"):  # plain web servers: credentials, if any, go in the URL (user:pass@)
        import aiohttp

        # No timeout by default: a stalled connection would hang the loader instead of being retried.
        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(sock_connect=30, sock_read=60)}}
    if cfg.anon:
        opts["anon"] = True
    opts.update(cfg.options)
    return opts


def filesystem(location: str | Path, cfg: StorageConfig | None = None):
    """(fsspec filesystem, path within it) of a remote location."""
    import fsspec

    proto = protocol(location)
    try:
        fs = fsspec.filesystem(proto, **storage_options(proto, cfg))
    except (ImportError, ValueError) as e:
        extra = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(proto, "the fsspec backend for it")
        raise StorageError(f"cannot open {redact(location)}: {scrub(str(e), cfg)}; install {extra} "
                           f"(pip install 'clipline[cloud]')") from None
    path = str(location) if proto in ("http", "https") else fs._strip_protocol(str(location))
    return fs, path


def http_status(error: BaseException) -> int | None:
    """The HTTP status behind an error (aiohttp's, or botocore's under the OSError s3fs raises), if there is one."""
    seen = 0
    while error is not None and seen < 8:
        status = getattr(error, "status", None)
        if isinstance(status, int):
            return status
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _describe(location: str | Path, error: BaseException, cfg: StorageConfig | None = None) -> str:
    detail = scrub(f"{type(error).__name__}: {error}".splitlines()[0], cfg)[:300]
    status, cause = http_status(error), error.__cause__
    if status and str(status) not in detail:  # fsspec reports a 403 of a web server as FileNotFoundError(url)
        detail += f" (HTTP {status})"
    elif cause is not None and status is None:  # ... and a server it could not reach, too
        detail += scrub(f" (from {type(cause).__name__}: {cause})".splitlines()[0], cfg)[:200]
    hint = ""
    if isinstance(error, PermissionError) or status in (401, 403) or "AccessDenied" in detail or \
            "Forbidden" in detail or "InvalidAccessKeyId" in detail or "SignatureDoesNotMatch" in detail:
        hint = "; check the credentials (AWS_* variables, storage.profile or storage.options)"
    elif "Could not connect" in detail or "Connect" in type(error).__name__ + type(cause).__name__ or \
            "endpoint" in detail.lower():
        hint = "; check storage.endpoint_url and the network"
    elif "NoSuchBucket" in detail or isinstance(error, FileNotFoundError):
        hint = "; check the bucket and prefix"
    return f"{redact(location)}: {detail}{hint}"


# -- reading and writing -----------------------------------------------------------------------------------------

def exists(location: str | Path) -> bool:
    if not is_remote(location):
        return local_path(location).exists()
    fs, path = filesystem(location)
    return fs.exists(path)


def isdir(location: str | Path) -> bool:
    if not is_remote(location):
        return local_path(location).is_dir()
    fs, path = filesystem(location)
    return fs.isdir(path)


def isfile(location: str | Path) -> bool:
    if not is_remote(location):
        return local_path(location).is_file()
    fs, path = filesystem(location)
    return fs.isfile(path)


def _url(location: str | Path, path: str) -> str:
    proto = protocol(location)
    return path if proto in ("http", "https") or "://" in path else f"{proto}://{path}"


def listdir(location: str | Path) -> list[str]:
    """The entries directly under a folder or bucket prefix, as full locations, sorted; [] when there is none."""
    if not is_remote(location):
        p = local_path(location)
        return sorted(str(c) for c in p.iterdir()) if p.is_dir() else []
    fs, path = filesystem(location)
    try:
        entries = fs.ls(path.rstrip("/"), detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(_url(location, e.rstrip("/")) for e in entries if e.rstrip("/") != path.rstrip("/"))


def read_bytes(location: str | Path) -> bytes:
    if not is_remote(location):
        return local_path(location).read_bytes()
    fs, path = filesystem(location)
    return fs.cat_file(path)


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str | Path, data: bytes) -> None:
    """Atomic: a local temp file renamed into place, or one whole-object put."""
    if not is_remote(location):
        from clipline.io import atomic_write

        atomic_write(local_path(location), lambda p: p.write_bytes(data))
        return
    fs, path = filesystem(location)
    fs.pipe_file(path, data)


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def put_file(local: str | Path, location: str | Path) -> None:
    """Copy one local file to a location (one put for an object store)."""
    if not is_remote(location):
        from clipline.io import atomic_write

        atomic_write(local_path(location), lambda p: shutil.copyfile(local, p))
        return
    fs, path = filesystem(location)
    fs.put_file(str(local), path)


def get_file(location: str | Path, local: str | Path) -> None:
    from clipline.io import atomic_write

    if not is_remote(location):
        atomic_write(local, lambda p: shutil.copyfile(local_path(location), p))
        return
    fs, path = filesystem(location)
    atomic_write(local, lambda p: fs.get_file(path, str(p)))


def put_folder(local: str | Path, location: str | Path, last: tuple[str, ...] = (),
               exclude: tuple[str, ...] = ()) -> None:
    """Upload every file under ``local`` (recursively), the names in ``last`` after all others (a completion
    marker), skipping top-level names in ``exclude``."""
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.relative_to(local).parts[0] not in exclude)
    files.sort(key=lambda p: p.name in last)
    for f in files:
        put_file(f, join(location, *f.relative_to(local).parts))


def get_folder(location: str | Path, local: str | Path) -> None:
    """Download every object under a prefix (recursively) into ``local``."""
    local = Path(local)
    if not is_remote(location):
        shutil.copytree(local_path(location), local, dirs_exist_ok=True)
        return
    fs, path = filesystem(location)
    root = path.rstrip("/")
    for obj in fs.find(root):
        get_file(_url(location, obj), local / obj[len(root):].lstrip("/"))


def remove(location: str | Path) -> None:
    """Delete a file or a whole folder / prefix; nothing when it is gone already."""
    if not is_remote(location):
        p = local_path(location)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache()


def check_reachable(location: str | Path, what: str = "location") -> None:
    """Fail now, in one line naming the location (never a secret), when a remote location cannot be listed."""
    if not is_remote(location):
        return
    try:
        fs, path = filesystem(location)
        fs.invalidate_cache()
        if protocol(location) in ("http", "https"):
            fs.info(path)
        else:  # not exists(): s3fs answers False for wrong credentials too, and the error is what to show
            try:
                fs.ls(path, detail=False)
            except FileNotFoundError:
                fs.info(path)
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001  (each backend has its own error types; the message says what went wrong)
        raise StorageError(f"cannot reach {what} {_describe(location, e)}") from None


def local_cache(kind: str, location: str | Path) -> Path:
    """The local folder beside remote ``location`` under storage.cache_dir/kind (e.g. runs, checkpoints)."""
    text = redact(location)
    safe = re.sub(r"[^A-Za-z0-9._/-]+", "_", text.replace("://", "/")).strip("/")
    return Path(_CONFIG.cache_dir).expanduser() / kind / safe


# -- streaming reads with retries ---------------------------------------------------------------------------------

_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def transient(error: BaseException) -> bool:
    """Worth retrying: a reset, timeout, 5xx or throttling; not a missing object, a denial or another 4xx, which
    the same request would get again."""
    status = http_status(error)
    if status is not None:
        return status >= 500 or status in (408, 425, 429)
    if isinstance(error, FileNotFoundError):  # fsspec's http says so of a server it could not reach, from that error
        return error.__cause__ is not None and not isinstance(error.__cause__, _NOT_TRANSIENT)
    return not isinstance(error, _NOT_TRANSIENT)


class ShardUnreadable(OSError):
    """A remote file still failing after storage.retries retries, or gone."""


class RetryingReader:
    """A read-only file over a remote object that survives transient errors: on a connection reset, 5xx, throttling
    or timeout it waits (exponential backoff), reopens the object and seeks to the byte where it stopped. Reads go
    through fsspec's read-ahead block cache of storage.read_ahead_mib, never a whole-object download."""

    def __init__(self, location: str, cfg: StorageConfig | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.location, self.cfg, self.sleep = location, cfg or _CONFIG, sleep
        # Opened by the first read, inside the retries: a server that is down as a shard starts is retried too.
        self.offset, self.retried, self._f = 0, 0, None

    def _open(self) -> None:
        fs, path = filesystem(self.location, self.cfg)
        block = int(self.cfg.read_ahead_mib * 2**20)
        self._f = fs.open(path, "rb", block_size=block, cache_type="readahead")
        if self.offset:
            self._f.seek(self.offset)

    def _retry(self, error: BaseException, attempt: int) -> None:
        if not transient(error) or attempt > self.cfg.retries:
            raise ShardUnreadable(f"{redact(self.location)} unreadable at byte {self.offset} after {attempt - 1} "
                                  f"retries: {scrub(f'{type(error).__name__}: {error}', self.cfg)[:200]}") from None
        wait = min(30.0, self.cfg.retry_wait_s * 2 ** (attempt - 1))
        log.warning("reading %s at byte %d failed (%s); retry %d/%d in %.1f s", redact(self.location), self.offset,
                    scrub(f"{type(error).__name__}: {error}", self.cfg)[:200], attempt, self.cfg.retries, wait)
        self.retried += 1
        self.close()
        self.sleep(wait)

    def read(self, n: int = -1) -> bytes:
        attempt = 0
        while True:
            try:
                if self._f is None:
                    self._open()
                data = self._f.read(n)
                self.offset += len(data)
                return data
            except Exception as e:  # noqa: BLE001  (aiohttp, botocore and OSError all signal transient faults)
                attempt += 1
                self._retry(e, attempt)

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # noqa: BLE001  (closing a broken connection may fail again; nothing to keep)
                pass
            self._f = None

    def __enter__(self) -> "RetryingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PipeReader:
    """stdout of a ``pipe:CMD`` spec (webdataset's syntax), read as a file; a non-zero exit is an OSError."""

    def __init__(self, spec: str):
        self.spec = spec
        self.proc = subprocess.Popen(spec[len("pipe:"):], shell=True, stdout=subprocess.PIPE)  # noqa: S602

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if n != 0 and not data and self.proc.wait() != 0:
            raise OSError(f"pipe command exited with status {self.proc.returncode}")
        return data

    def close(self) -> None:
        self.proc.stdout.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> "PipeReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_read(location: str, buffering: int = 1 << 20) -> IO[bytes]:
    """A readable binary stream of a local file, a remote object (retried, resumed) or a ``pipe:`` command."""
    if is_pipe(location):
        return PipeReader(location)  # type: ignore[return-value]
    if is_remote(location):
        return RetryingReader(location)  # type: ignore[return-value]
    return open(local_path(location), "rb", buffering=buffering)


def glob_suffix(location: str | Path, suffixes: tuple[str, ...]) -> list[str]:
    """Entries directly under ``location`` whose names end in one of ``suffixes``, sorted."""
    return [e for e in listdir(location) if e.endswith(suffixes)]


def root_of(location: str | Path) -> str:
    """The bucket (or host) of a remote location: ``s3://bucket/a/b`` -> ``s3://bucket``."""
    proto = protocol(location)
    rest = str(location)[len(proto) + 3:]
    return f"{proto}://{rest.split('/', 1)[0]}"


def sync_down(location: str | Path, local: Path, names: tuple[str, ...]) -> None:
    """Copy the files ``names`` directly under a remote folder into ``local`` where they exist there."""
    for n in names:
        remote = join(location, n)
        if exists(remote):
            get_file(remote, local / n)


def sync_up(local: Path, location: str | Path, exclude: tuple[str, ...] = ()) -> None:
    """Upload the files of a local mirror to its remote folder (each one whole, in one put)."""
    if local.is_dir():
        put_folder(local, location, exclude=exclude)
