"""URL lists: every input format, column mapping, the validation report, and the caption filters; no download."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from clipline.config import ConfigError, PrepConfig, PrepFilterConfig, load_config
from clipline.errors import UsageError
from data_prep.filters import Funnel, caption_keep_mask, detect_languages
from data_prep.prep import prepare_input
from data_prep.url_list import MAX_LIST_CAPTION_CHARS, read_url_list, validate_rows

ROWS = [("http://a.example/1.jpg", "a red ring on grey", "u1"), ("http://a.example/2.jpg", "two blue stars", "u2")]


def _write(path, fmt: str, rows=ROWS, url_col="url", caption_col="caption"):
    df = pd.DataFrame(rows, columns=[url_col, caption_col, "uid"])
    if fmt == "parquet":
        df.to_parquet(path)
    elif fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, sep="\t", index=False)
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    elif fmt == "txt":
        path.write_text("".join(f"{u}\t{c}\n" for u, c, _ in rows))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "txt"])
def test_every_format_reads_the_same_rows(tmp_path, fmt):
    df = read_url_list(str(_write(tmp_path / f"list.{fmt}", fmt)), "url", "caption")
    assert df["url"].tolist() == [r[0] for r in ROWS] and df["caption"].tolist() == [r[1] for r in ROWS]


def test_folders_and_globs_concatenate_files_in_name_order(tmp_path):
    _write(tmp_path / "b.csv", "csv", rows=[ROWS[1]])
    _write(tmp_path / "a.parquet", "parquet", rows=[ROWS[0]])
    (tmp_path / "notes.md").write_text("ignored: not a list format")
    for spec in (str(tmp_path), str(tmp_path / "*.*[tv]")):  # *.parquet + *.csv
        df = read_url_list(spec, "url", "caption")
        assert df["url"].tolist() == [ROWS[0][0], ROWS[1][0]]


def test_columns_are_mapped_and_extra_columns_carried(tmp_path):
    path = _write(tmp_path / "l.csv", "csv", url_col="link", caption_col="alt")
    cfg = PrepConfig(url_list=str(path), url_col="link", caption_col="alt", allow_private_networks=True)
    df, report = prepare_input(cfg)
    assert list(df.columns) == ["url", "caption", "uid"] and report.rows_in == 2


@pytest.mark.parametrize("rows, columns, url_col, message", [
    ([("http://x/a.jpg", "a cat")], ["url", "text"], "url", "has no column 'caption'"),
    ([("a cat", "http://x/a.jpg")], ["caption", "link"], "url", "column 'link' holds URLs"),
    ([("not a url", "a cat", "http://x/a.jpg")], ["url", "caption", "href"], "url",
     "holds no http(s) URLs (e.g. 'not a url'); column 'href' does: set prep.url_col=href"),
    ([], ["url", "caption"], "url", "is empty"),
])
def test_unusable_lists_name_the_problem_and_the_fix(tmp_path, rows, columns, url_col, message):
    path = tmp_path / "l.parquet"
    pd.DataFrame(rows, columns=columns).to_parquet(path)
    with pytest.raises(UsageError) as e:
        read_url_list(str(path), url_col, "caption")
    assert message in str(e.value)


@pytest.mark.parametrize("spec, message", [
    ("nope.parquet", "URL list not found"),
    ("*.nothing", "matches no"),
])
def test_missing_files(tmp_path, spec, message):
    with pytest.raises(UsageError, match=message):
        read_url_list(str(tmp_path / spec), "url", "caption")


def test_unsupported_extension(tmp_path):
    (tmp_path / "l.xlsx").write_text("x")
    with pytest.raises(UsageError, match="unsupported extension '.xlsx'"):
        read_url_list(str(tmp_path / "l.xlsx"), "url", "caption")


def test_validation_counts_every_problem_with_examples(tmp_path):
    long_caption = "word " * (MAX_LIST_CAPTION_CHARS // 5 + 1)
    raw = (b"url,caption\n"
           b"http://a.example/1.jpg,a fine caption\n"
           b",no url at all\n"
           b"ftp://a.example/2.jpg,an ftp url\n"
           b"http://a.example/3 4.jpg,a url with a space\n"
           b"http://[::1/5.jpg,a broken ipv6 host\n"
           b"http://a.example/6.jpg,\n"
           b"http://a.example/7.jpg,caf\xe9 in latin-1\n"
           + f"http://a.example/8.jpg,{long_caption}\n".encode()
           + b"http://a.example/1.jpg,the first url again\n")
    (tmp_path / "l.csv").write_bytes(raw)
    df, report = validate_rows(read_url_list(str(tmp_path / "l.csv"), "url", "caption"), "url", "caption")
    assert df["url"].tolist() == ["http://a.example/1.jpg"] and report.rows_in == 9
    assert report.dropped == {"missing_url": 1, "malformed_url": 3, "empty_caption": 1, "non_utf8_caption": 1,
                              "caption_too_long": 1, "duplicate_url": 1}
    assert report.issues["malformed_url"]["examples"] == ["ftp://a.example/2.jpg", "http://a.example/3 4.jpg",
                                                          "http://[::1/5.jpg"]
    assert report.issues["non_utf8_caption"]["examples"] == ["caf\\udce9 in latin-1"]
    assert any(line.startswith("duplicate url: 1") for line in report.lines())


def test_rows_dropped_everywhere_is_an_error_naming_the_counts(tmp_path):
    path = _write(tmp_path / "l.csv", "csv", rows=[("http://a.example/1.jpg", "IMG_0001.jpg", "u"), ("http://a.example/2.jpg", "DSC 0002.JPG", "v")])
    with pytest.raises(UsageError, match=r"all 2 were dropped \({.too_few_words.: 1, .boilerplate_caption.: 1}\)"):
        prepare_input(PrepConfig(url_list=str(path), allow_private_networks=True))


def test_reserved_extra_columns_are_refused(tmp_path):
    path = tmp_path / "l.parquet"
    pd.DataFrame({"url": ["http://a.example/1.jpg"], "caption": ["a red ring"], "width": [3]}).to_parquet(path)
    df, _ = prepare_input(PrepConfig(url_list=str(path), allow_private_networks=True))
    assert "width" not in df.columns  # carried by default only when img2dataset does not use the name itself
    with pytest.raises(UsageError, match="collide with names img2dataset writes"):
        prepare_input(PrepConfig(url_list=str(path), extra_columns=["width"], allow_private_networks=True))


# ------------------------------------------------------------------------------------------------------------
# Caption filters


def _mask(captions: list[str], **kwargs) -> tuple[list[bool], dict]:
    funnel = Funnel()
    funnel.start("listed", len(captions))
    keep = caption_keep_mask(pd.Series(captions), PrepFilterConfig(**kwargs), funnel)
    return keep.tolist(), funnel.stages[-1].removed


def test_caption_length_in_characters_and_words():
    keep, removed = _mask(["tiny", "two words", "one-word-but-long", "a b c d e f"], min_caption_chars=5,
                          min_caption_words=2, max_caption_words=4)
    assert keep == [False, True, False, False]
    assert removed == {"caption_too_short": 1, "too_few_words": 1, "too_many_words": 1}
    keep, removed = _mask(["x" * 30 + " y", "short one"], max_caption_chars=20)
    assert keep == [False, True] and removed == {"caption_too_long": 1}


@pytest.mark.parametrize("caption, boilerplate", [
    ("IMG_1234.JPG", True), ("DSC01234", True), ("image", True), ("Untitled", True), ("no description", True),
    ("https://example.com/a b", False), ("https://example.com/photo.jpg", True), ("photo 12", True),
    ("click to enlarge", True), ("12345", True), ("a dog playing in the image of a park", False),
    ("an image of a red ring", False),
    # Whole-caption matches only: a sentence that ends in (or mentions) a file name or a number is a caption.
    ("special case redirect_301 at /redirect/n20.jpg", False), ("IMG 0042.JPG", True),
    ("photo 1 shows a dog on the beach", False), ("P1 racing car on the track", False), ("beach.jpg", True),
])
def test_boilerplate_captions(caption, boilerplate):
    keep, _ = _mask([caption], min_caption_chars=0, min_caption_words=0)
    assert keep == [not boilerplate]


def test_language_filter_uses_a_model_shipped_in_the_package(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("the language detector tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    captions = ["a photo of a black cat sleeping on the sofa", "une photo d'un chat noir qui dort sur le canapé",
                "ein Foto einer schwarzen Katze, die auf dem Sofa schläft"]
    lang, score = detect_languages(pd.Series(captions))
    assert lang.tolist() == ["en", "fr", "de"] and (score > 0.5).all()
    keep, removed = _mask(captions, languages=["en", "de"])
    assert keep == [True, False, True] and removed == {"wrong_language": 1}


_MIXED = ["a photo of a black cat sleeping on the sofa", "une photo d'un chat noir qui dort sur le canapé",
          "ein Foto einer schwarzen Katze, die auf dem Sofa schläft", "una foto de un gato negro en el sofá",
          "the view from the top of the mountain at sunrise", "una foto di un gatto nero sul divano"] * 5


def test_language_job_in_forked_processes_gives_the_in_process_answer(monkeypatch):
    import data_prep.filters as filters

    captions = pd.Series(_MIXED, index=range(100, 100 + len(_MIXED)))  # an index that is not 0..n-1
    expected_lang, expected_score = detect_languages(captions)
    monkeypatch.setattr(filters, "LANGUAGE_ROWS_PER_PROCESS", 7)  # 30 captions -> 4 processes (processes=4)
    job = filters.LanguageJob(captions, processes=4)
    assert len(job._pending) == 4
    lang, score = job.result()
    assert lang.tolist() == expected_lang.tolist() and lang.index.equals(captions.index)
    assert score.to_numpy() == pytest.approx(expected_score.to_numpy())
    assert job.cpu_seconds > 0  # the work was done in the children, which said how much
    subset = captions.iloc[[3, 0, 17]]
    assert job.lookup(subset)[0].tolist() == expected_lang.loc[subset.index].tolist()
    # Through the caption filters: the same verdicts as the in-process detector.
    keep = caption_keep_mask(captions, PrepFilterConfig(languages=["en"]), Funnel(),
                             languages=filters.LanguageJob(captions, processes=2))
    assert keep.tolist() == caption_keep_mask(captions, PrepFilterConfig(languages=["en"]), Funnel()).tolist()


def test_language_job_without_fork_classifies_in_process(monkeypatch):
    import multiprocessing

    import data_prep.filters as filters

    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])  # as on Windows
    captions = pd.Series(_MIXED[:6])
    job = filters.LanguageJob(captions, processes=2)
    assert not job._pending
    assert job.result()[0].tolist() == ["en", "fr", "de", "es", "en", "it"]


def test_language_processes_are_stopped_when_every_caption_fell_to_an_earlier_filter(tmp_path):
    import multiprocessing
    import signal

    # A SIGTERM handler that does not exit (as a trainer's preemption handler), inherited by the forked processes.
    previous = signal.signal(signal.SIGTERM, lambda *args: None)

    # Every caption is too short, so the language filter never asks for the answer the processes hold.
    path = tmp_path / "list.csv"
    pd.DataFrame({"url": [f"http://a.example/{i}.jpg" for i in range(3000)], "caption": ["x"] * 3000}).to_csv(path)
    cfg = PrepConfig(url_list=str(path), output_dir=str(tmp_path / "out"), filters=PrepFilterConfig(languages=["en"]))
    try:
        with pytest.raises(UsageError, match="no usable rows"):
            prepare_input(cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not [p for p in multiprocessing.active_children() if p.name == "prep-language-id"]


def test_a_language_process_that_dies_is_an_error_that_says_so(monkeypatch):
    import os

    import data_prep.filters as filters

    monkeypatch.setattr(filters, "_classify_forked", lambda lo, hi, conn: os._exit(9))  # as if killed
    job = filters.LanguageJob(pd.Series(_MIXED[:6]), processes=1)
    with pytest.raises(RuntimeError, match="exited with code 9 before answering.*prep.filters.languages=\\[\\]"):
        job.result()


def test_language_filter_config_is_checked():
    with pytest.raises(ConfigError, match="ISO 639-1"):
        load_config([], ["prep.filters.languages=[english]"])


@pytest.mark.parametrize("override, message", [
    ("prep.filters.boilerplate_patterns=['(unclosed']", "not a regular expression"),
    ("prep.filters.clip_keep_fraction=0.3", "need prep.filters.clip_model"),
    ("prep.filters.near_dedup_distance=40", "near_dedup_distance must be in -1..16"),
    ("prep.allowed_networks=[not-a-net]", "is not a network"),
    ("prep.deadline=0", "prep.deadline must be > 0"),
    ("prep.encode_format=png", "compression level for png: 0..9"),
    ("prep.filters.nearr_dedup_distance=2", "did you mean 'near_dedup_distance'"),
])
def test_bad_prep_settings_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])


def test_funnel_stages_add_up():
    funnel = Funnel()
    funnel.start("listed", 10)
    funnel.record("a", {"x": 2, "y": 0})
    keep = funnel.apply("b", pd.Series([True] * 8), [("z", pd.Series([True, False] * 4))])
    assert funnel.to_list() == [{"stage": "listed", "count": 10, "removed": {}},
                                {"stage": "a", "count": 8, "removed": {"x": 2}},
                                {"stage": "b", "count": 4, "removed": {"z": 4}}]
    assert keep.sum() == 4 and json.dumps(funnel.to_list())
