import http.client
import io
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from data_prep.demo_scenes import write_demo_split
from data_prep.serve import LocalImageServer, write_url_list

TIMEOUT_S = 10


def _image_bytes(fmt: str, colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture()
def root(tmp_path) -> Path:
    served = tmp_path / "served"
    (served / "sub dir").mkdir(parents=True)
    (served / "a.png").write_bytes(_image_bytes("PNG", "red"))
    (served / "b.jpg").write_bytes(_image_bytes("JPEG", "blue"))
    (served / "sub dir" / "c.png").write_bytes(_image_bytes("PNG", "green"))
    (tmp_path / "secret.txt").write_text("outside the served root")
    return served


def _get(url: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, b"", dict(err.headers)


def _raw_status(server: LocalImageServer, raw_path: str, method: str = "GET") -> int:
    """Send a path verbatim; urllib might normalise away the "../" under test."""
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    try:
        conn.request(method, raw_path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_serves_exact_bytes_with_headers(root):
    with LocalImageServer(root) as server:
        for rel, ctype in [("a.png", "image/png"), ("b.jpg", "image/jpeg"),
                           ("sub dir/c.png", "image/png")]:
            status, body, headers = _get(server.url_for(rel))
            assert status == 200
            assert body == (root / rel).read_bytes()
            assert headers["Content-Type"] == ctype
            assert int(headers["Content-Length"]) == len(body)


def test_head_returns_length_without_body(root):
    with LocalImageServer(root) as server:
        request = urllib.request.Request(server.url_for("a.png"), method="HEAD")
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:
            assert int(resp.headers["Content-Length"]) == (root / "a.png").stat().st_size
            assert resp.read() == b""


def test_missing_file_and_directory_are_404(root):
    with LocalImageServer(root) as server:
        assert _get(server.url_for("nope.png"))[0] == 404
        assert _get(server.url_for("sub dir"))[0] == 404
        assert _get(server.base_url + "/")[0] == 404


@pytest.mark.parametrize("raw_path", [
    "/../secret.txt", "/sub%20dir/../../secret.txt", "/%2e%2e/secret.txt",
    "/..%2fsecret.txt", "//etc/passwd", "/" + "x" * 5000,
])
def test_path_traversal_is_404(root, raw_path):
    with LocalImageServer(root) as server:
        assert _raw_status(server, raw_path) == 404


def test_symlink_out_of_root_is_404(root):
    os.symlink(root.parent / "secret.txt", root / "link.txt")
    with LocalImageServer(root) as server:
        assert _get(server.url_for("link.txt"))[0] == 404


def test_binds_loopback_only_and_shuts_down(root):
    with LocalImageServer(root) as server:
        host, port = server.server_address
        assert host == "127.0.0.1" and port > 0
        assert server.base_url == f"http://127.0.0.1:{port}"
        assert server.url_for("sub dir/c.png") == f"http://127.0.0.1:{port}/sub%20dir/c.png"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/a.png", timeout=TIMEOUT_S)


def test_refuses_non_loopback_host(root):
    with pytest.raises(ValueError):
        LocalImageServer(root, host="0.0.0.0")


def test_concurrent_fetches_all_succeed_quietly(root, capfd):
    expected = {rel: (root / rel).read_bytes() for rel in ["a.png", "b.jpg", "sub dir/c.png"]}
    rels = list(expected) * 70
    with LocalImageServer(root) as server:
        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(lambda rel: _get(server.url_for(rel)), rels))
    assert len(results) == 210
    for rel, (status, body, _) in zip(rels, results):
        assert status == 200 and body == expected[rel]
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_write_url_list_urls_resolve_to_split_images(tmp_path):
    split = write_demo_split(tmp_path / "data" / "train", n=12, seed=4)
    out = tmp_path / "lists" / "train_urls.parquet"
    # Serving the parent checks that paths are mapped relative to the root.
    with LocalImageServer(tmp_path / "data") as server:
        assert write_url_list(split, server, out) == out
        urls = pd.read_parquet(out)
        for row in urls.itertuples():
            assert row.url.startswith(server.base_url + "/train/images/")
            status, body, _ = _get(row.url)
            assert status == 200
            assert body == (split.parent / row.url.split("/train/", 1)[1]).read_bytes()
    samples = pd.read_parquet(split)
    assert list(urls.columns) == ["url", "caption", "colour", "shape", "size", "position",
                                  "count", "background", "uid"]
    pd.testing.assert_frame_equal(urls.drop(columns="url"),
                                  samples.drop(columns="path")[urls.columns[1:]])
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_write_url_list_rejects_split_outside_root(tmp_path, root):
    split = write_demo_split(tmp_path / "elsewhere", n=2, seed=0)
    with LocalImageServer(root) as server, pytest.raises(ValueError):
        write_url_list(split, server, tmp_path / "urls.parquet")
