"""`clipline prep` as a dataset builder runs it (the CLI, then the artifacts), on the cases of issue 18: every
count in the funnel and report.md true, no real image lost, shards checkable against their manifest."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest

from clipline.cli import main as clipline

from conftest import REPO, make_samples
from prep_server import MisbehavingServer

CAPTIONS = {"a": "a red ring on a white table", "b": "a blue square in a green field",
            "c": "special case redirect_301 at /redirect/n20.jpg", "f": "a yellow circle behind a fence",
            "e": "a picture that robots.txt keeps out"}


def _samples(out: Path) -> list[dict]:
    """Every written sample's .json plus its .txt, in shard order."""
    rows = []
    for shard in sorted(out.glob("[0-9]*.tar")):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in files if n.endswith(".json")):
            key = name[:-len(".json")]
            rows.append({**json.loads(files[name]), "txt": files[key + ".txt"].decode()})
    return rows


def _dead_port() -> socket.socket:
    """A bound loopback port nobody listens on (connection refused), held so no one else takes it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


COMMON = ["prep.image_size=32", "prep.processes=1", "prep.threads=4", "prep.timeout=1", "prep.deadline=5",
          "prep.retries=1", "prep.samples_per_shard=4", "prep.allowed_networks=[127.0.0.1/32]"]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """One CSV list (URL, TEXT, license) over two servers and a dead port, built with the CLI."""
    tmp = tmp_path_factory.mktemp("correct")
    samples = make_samples(5, seed=41, image_size=48)
    images = {f"{k}.jpg": s["jpg"] for k, s in zip("abcef", samples)}
    images["a2.jpg"] = images["a.jpg"]
    dead = _dead_port()
    with MisbehavingServer(images) as one, MisbehavingServer(images, robots_resets=1) as two:
        rows = [(one.url("img/a.jpg"), CAPTIONS["a"]),
                (one.url("img/a2.jpg"), "the same red ring listed again"),         # same bytes: exact dedup
                (one.url("plain/b.jpg"), CAPTIONS["b"]),                           # a JPEG served as text/plain
                (one.url("img/c.jpg"), CAPTIONS["c"]),                             # a sentence ending in a file name
                (one.url("img/c.jpg?1"), "IMG 0042.JPG"), (one.url("img/c.jpg?2"), "IMG 0042.JPG"),
                (one.url("img/c.jpg?3"), "DSC 1234"),                              # file names: boilerplate
                (f"http://127.0.0.1:{dead.getsockname()[1]}/img/x.jpg", "a picture on a host that is down"),
                (one.url("private/e.jpg"), CAPTIONS["e"]),                         # a real robots.txt opt-out
                (two.url("img/f.jpg"), CAPTIONS["f"])]                             # robots.txt reset once
        url_list = tmp / "urls.csv"
        pd.DataFrame({"URL": [r[0] for r in rows], "TEXT": [r[1] for r in rows],
                      "license": [f"cc-by-{i}" for i in range(len(rows))]}).to_csv(url_list, index=False)
        out = tmp / "out"
        code = clipline(["prep", f"prep.url_list={url_list}", f"prep.output_dir={out}", "prep.url_col=URL",
                         "prep.caption_col=TEXT", *COMMON])
        robots_hits = (one.hits["/robots.txt"], two.hits["/robots.txt"])
    dead.close()
    return {"code": code, "out": out, "rows": rows, "tmp": tmp, "robots_hits": robots_hits,
            "stats": json.loads((out / "stats.json").read_text()), "report": (out / "report.md").read_text()}


def _funnel(stats: dict) -> dict[str, dict]:
    return {s["stage"]: s for s in stats["funnel"]}


def test_a_dead_host_is_a_network_failure_and_a_failed_robots_txt_is_retried(build):
    assert build["code"] == 0
    download = _funnel(build["stats"])["download"]["removed"]
    # The dead port: its robots.txt cannot be fetched; counted as the connection error it is, not as an opt-out.
    assert download == {"connection_error": 1, "opt_out_robots_txt": 1}
    assert "disallowed by robots.txt: 1" in build["report"] or "opt out robots txt: 1" in build["report"]
    # Server two reset its first robots.txt request: retried (prep.retries=1), read, and its image written.
    assert build["robots_hits"] == (1, 2)
    assert CAPTIONS["f"] in {s["caption"] for s in _samples(build["out"])}


def test_an_image_served_as_text_plain_is_kept_and_counted(build):
    written = {s["caption"] for s in _samples(build["out"])}
    assert CAPTIONS["b"] in written
    assert build["stats"]["content_type_not_image"] == 1
    assert "Content-Type that is not an image type" in build["report"] and "true refuses them): 1." in build["report"]


def test_only_whole_captions_that_are_file_names_are_boilerplate(build):
    written = {s["caption"] for s in _samples(build["out"])}
    assert CAPTIONS["c"] in written
    assert _funnel(build["stats"])["caption filters"]["removed"] == {"boilerplate_caption": 3}
    assert build["stats"]["removed_captions"] == {"boilerplate_caption": [["IMG 0042.JPG", 2],
                                                                          ["DSC 1234", 1]]}
    assert "- boilerplate caption: 'IMG 0042.JPG' (2), 'DSC 1234' (1)" in build["report"]


def test_report_rows_agree_with_the_funnel_and_the_shards(build):
    stats, samples = build["stats"], _samples(build["out"])
    funnel = _funnel(stats)
    assert stats["success"] == funnel["download"]["count"] == 5      # a, its copy, b, c, f
    assert funnel["written"]["count"] == len(samples) == 4           # the copy of a: exact dedup after download
    assert "| downloaded | 5 |" in build["report"]
    assert "| removed after download by the filters | 1 |" in build["report"]
    assert "| written | 4 |" in build["report"]
    assert "downloaded and written" not in build["report"]


def _verify(folder: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = clipline(["prep", "--verify", str(folder)])
    return code, capsys.readouterr().out


def test_verify_checks_every_shard_against_the_manifest(build, tmp_path, capsys):
    manifest = json.loads((build["out"] / "manifest.json").read_text())
    assert set(manifest["checksums"]) == set(manifest["shards"]) and len(manifest["shards"]) == 1
    code, out = _verify(build["out"], capsys)
    assert code == 0 and "1 shards, 4 samples" in out and "every shard matches manifest.json" in out

    copy = tmp_path / "copy"
    shutil.copytree(build["out"], copy, ignore=shutil.ignore_patterns("_download"))
    shard = copy / "00000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, one byte changed
    shard.write_bytes(bytes(data))
    code, out = _verify(copy, capsys)
    assert code == 1 and "00000.tar: sha256" in out and "corrupted" in out
    shard.write_bytes(bytes(data[:-1024]))
    code, out = _verify(copy, capsys)
    assert code == 1 and f"00000.tar: {len(data) - 1024} bytes, the manifest says {len(data)}" in out
    shard.unlink()
    code, out = _verify(copy, capsys)
    assert code == 1 and "00000.tar: missing" in out
    (copy / "manifest.json").unlink()
    code, out = _verify(copy, capsys)
    assert code == 1 and "no manifest.json" in out


def test_another_list_or_other_download_settings_are_refused(build, tmp_path, capsys):
    folder = tmp_path / "out"
    shutil.copytree(build["out"], folder)
    # The same urls and captions, with a uid column instead of license: the samples' .json would differ.
    df = pd.read_csv(build["tmp"] / "urls.csv").drop(columns="license")
    df["uid"] = [f"u{i}" for i in range(len(df))]
    jsonl = tmp_path / "urls.jsonl"
    df.to_json(jsonl, orient="records", lines=True)
    base = ["prep", f"prep.output_dir={folder}", "prep.url_col=URL", "prep.caption_col=TEXT", *COMMON]
    capsys.readouterr()
    assert clipline([*base, f"prep.url_list={jsonl}"]) == 2
    assert "prep.mode=overwrite" in capsys.readouterr().err
    # The same list with another image size would mix 32 px and 64 px downloads.
    assert clipline([*base, f"prep.url_list={build['tmp'] / 'urls.csv'}", "prep.image_size=64"]) == 2
    assert "prep.mode=overwrite" in capsys.readouterr().err
    assert json.loads((folder / "manifest.json").read_text())["checksums"]  # the build is untouched
    # The same list and settings: up to date, nothing downloaded.
    assert clipline([*base, f"prep.url_list={build['tmp'] / 'urls.csv'}"]) == 0
    assert "is up to date (4 samples)" in capsys.readouterr().out


def test_a_bare_url_txt_list_builds_with_empty_captions(tmp_path):
    images = {f"{k}.jpg": s["jpg"] for k, s in zip("ab", make_samples(2, seed=43, image_size=48))}
    with MisbehavingServer(images) as server:
        url_list = tmp_path / "urls.txt"
        url_list.write_text(f"{server.url('img/a.jpg')}\n{server.url('img/b.jpg')}\n")
        out = tmp_path / "out"
        assert clipline(["prep", f"prep.url_list={url_list}", f"prep.output_dir={out}", *COMMON,
                         "prep.filters.languages=[en]"]) == 0
    samples = _samples(out)
    assert len(samples) == 2 and {s["txt"] for s in samples} == {""}
    stats = json.loads((out / "stats.json").read_text())
    assert all(s["count"] == 2 for s in stats["funnel"]) and stats["captionless"]
    assert "caption filters (none: the list has no captions)" in [s["stage"] for s in stats["funnel"]]
    assert "no caption filter ran" in (out / "report.md").read_text()


def test_a_bad_list_is_refused_before_the_heavy_imports(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("link,text\nhttp://example.com/a.jpg,a cat on a mat\n")
    probe = ("import sys; from clipline.cli import main; code = main(['prep', 'prep.url_list=" + str(bad) + "']); "
             "print(code, sorted(m for m in ('torch', 'img2dataset') if m in sys.modules))")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert result.stdout.split("\n")[-2] == "2 []", result.stdout + result.stderr
    assert "has no column 'url', 'caption'" in result.stderr
    assert elapsed < 20  # loose on a busy machine; the import check above is the strict part
