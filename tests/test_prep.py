"""`clipline prep`: bad input fails before anything is written; the address guard; a real run over loopback."""

from __future__ import annotations

import json
import socket
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from clipline.config import PrepConfig
from clipline.errors import UsageError
from data_prep.address_guard import is_public_address, refusal_reason
from data_prep.demo_scenes import write_demo_split
from data_prep.prep import run_prep
from data_prep import serve
from data_prep.serve import LocalImageServer, write_url_list

from conftest import run_cli


@pytest.fixture
def no_connections(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def fake_dns(monkeypatch):
    table = {"intranet.example": "10.1.2.3", "metadata.example": "169.254.169.254", "public.example": "93.184.216.34",
             "sneaky.example": "127.0.0.1"}

    def getaddrinfo(host, *args, **kwargs):
        if host in table:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (table[host], 0))]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize("address, public", [
    ("127.0.0.1", False), ("10.0.0.8", False), ("172.16.5.4", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("::1", False), ("fe80::1", False), ("fd00::1", False), ("::ffff:10.0.0.1", False),
    ("0.0.0.0", False), ("93.184.216.34", True), ("2606:4700::1111", True),
])
def test_public_address_check(address, public):
    assert is_public_address(address) is public


@pytest.mark.parametrize("url, reason", [
    ("http://intranet.example/a.jpg", "private_address"),
    ("http://metadata.example/latest/meta-data", "private_address"),
    ("http://sneaky.example:8080/x.png", "private_address"),
    ("http://169.254.169.254/latest/meta-data", "private_address"),
    ("http://10.0.0.1/x.jpg", "private_address"),
    ("http://no-such-host.example/x.jpg", "dns_failure"),
    ("http:///nohost", "malformed_url"),
    ("https://public.example/cat.jpg", None),
])
@pytest.mark.fault
def test_refusal_without_any_connection(url, reason, fake_dns, no_connections, fault_row):
    got = refusal_reason(url)
    assert got == reason
    fault_row(area="hostile input", fault=f"URL {url} (host names resolved by a patched DNS)",
              happened=f"pre-download check: {got or 'allowed'}; no connection was attempted",
              lost="nothing fetched" if got else "nothing: a public address goes on to the download")


def test_hosts_are_resolved_once(monkeypatch, no_connections):
    calls = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: calls.append(host) or
                        [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 0))])
    cache = {}
    for i in range(5):
        assert refusal_reason(f"http://public.example/{i}.jpg", cache) is None
    assert calls == ["public.example"]


def _write_list(path: Path, rows: list[dict]) -> str:
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


@pytest.mark.parametrize("rows, columns, message", [
    ([{"url": "http://x/a.jpg", "text": "a cat"}], None, "has no column 'caption'"),
    ([], ["url", "caption"], "is empty"),
])
@pytest.mark.fault
def test_unusable_lists_fail_before_writing(tmp_path, rows, columns, message, fault_row):
    url_list = tmp_path / "urls.parquet"
    pd.DataFrame(rows, columns=columns).to_parquet(url_list)
    out = tmp_path / "shards"
    out.mkdir()
    (out / "keep.txt").write_text("already here")
    result = run_cli("prep", f"prep.url_list={url_list}", f"prep.output_dir={out}")
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "already here"
    fault_row(area="data prep", fault=f"a URL list that {message}",
              happened=f"exit {result.returncode}, one line: "
                       f"\"{result.stderr.strip().replace(str(tmp_path), '$TMP')}\"",
              lost=f"nothing: the output folder still holds only {[p.name for p in out.iterdir()]}")


def test_missing_list_is_a_clear_error(tmp_path):
    result = run_cli("prep", f"prep.url_list={tmp_path}/nope.parquet", f"prep.output_dir={tmp_path}/out")
    assert result.returncode == 2 and "URL list not found" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.fault
def test_loopback_list_is_refused_by_default(tmp_path, no_connections, fault_row):
    # A caption that passes the caption filters, so that the address check is what refuses the row.
    url_list = _write_list(tmp_path / "u.parquet", [{"url": "http://127.0.0.1:9/a.jpg",
                                                     "caption": "a red circle on a white background"}])
    with pytest.raises(UsageError, match="allow_private_networks") as refused:
        run_prep(PrepConfig(url_list=url_list, output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    fault_row(area="hostile input", fault="a URL list whose only URL is on loopback (default settings)",
              happened=f"UsageError before any download: "
                       f"\"{str(refused.value).replace(str(tmp_path), '$TMP')[:150]}...\"",
              lost="nothing fetched, no output folder created")


@pytest.fixture(scope="module")
def served_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    return write_demo_split(root, n=60, seed=9, image_size=32)


def test_prep_over_loopback_writes_the_shard_contract(tmp_path, served_split, monkeypatch):
    requests: list[str] = []  # every request the loopback server answers (list.append is thread-safe)
    respond = serve._FileHandler._respond
    monkeypatch.setattr(serve._FileHandler, "_respond",
                        lambda handler, send_body: (requests.append(handler.path), respond(handler, send_body))[1])
    with LocalImageServer(served_split.parent) as server:
        urls = write_url_list(served_split, server, tmp_path / "urls.parquet")
        df = pd.read_parquet(urls)
        df.loc[3, "url"] = server.url_for("images/missing.png")  # a 404
        df.loc[4, "caption"] = ""                                  # dropped before download
        df.loc[5, "url"] = df.loc[6, "url"]                        # duplicate URL
        df.to_parquet(urls)
        out = tmp_path / "shards"
        cfg = PrepConfig(url_list=str(urls), output_dir=str(out), image_size=32, samples_per_shard=25,
                         processes=1, threads=4, allow_private_networks=True)
        manifest = run_prep(cfg)
        first_requests = len(requests)
        # Same command again, the same server still up: resumes with nothing to do, sends no request.
        again = run_prep(cfg)
    assert first_requests >= 58 and len(requests) == first_requests, requests[first_requests:][:5]
    assert again.total_samples == 57 and again.sizes == manifest.sizes and again.stats == manifest.stats
    assert manifest.total_samples == 57
    assert manifest.stats["dropped_empty_caption"] == 1 and manifest.stats["dropped_duplicate_url"] == 1
    assert manifest.stats["failed_to_download"] == 1
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == 57 and sorted(sizes) == sorted(p.name for p in out.glob("*.tar"))
    assert "failed to download | 1" in (out / "report.md").read_text()
    with tarfile.open(out / sorted(sizes)[0]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile([n for n in names if n.endswith(".json")][0]).read())
    assert {n.rsplit(".", 1)[1] for n in names} == {"jpg", "txt", "json"}
    assert {"colour", "shape", "uid", "url", "caption"} <= set(meta)  # extra columns carried into .json


def test_another_list_into_the_same_folder_is_refused(tmp_path, served_split):
    out = tmp_path / "shards"
    with LocalImageServer(served_split.parent) as server:
        urls = write_url_list(served_split, server, tmp_path / "urls.parquet")
        run_prep(PrepConfig(url_list=str(urls), output_dir=str(out), image_size=32, processes=1, threads=4,
                            allow_private_networks=True))
        other = pd.read_parquet(urls).head(10)
        other.to_parquet(tmp_path / "other.parquet")
        with pytest.raises(UsageError, match="another URL list"):
            run_prep(PrepConfig(url_list=str(tmp_path / "other.parquet"), output_dir=str(out),
                                allow_private_networks=True))


def test_the_list_check_judges_literals_without_dns(monkeypatch, no_connections):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("a DNS lookup was made"))
    assert refusal_reason("http://10.0.0.1/a.jpg", resolve=False) == "private_address"
    assert refusal_reason("http://[::1]:80/a.jpg", resolve=False) == "private_address"
    assert refusal_reason("http://LOCALHOST./a.jpg", resolve=False) == "private_address"
    assert refusal_reason("http://intranet.example/a.jpg", resolve=False) is None  # checked at connect time
