"""Reading and validating URL + caption lists before any download starts.

A list is one file, a folder of files or a glob, in parquet, csv, tsv, jsonl or txt (one URL per line, optionally
followed by a tab and the caption; a txt list with no caption at all is allowed: its samples carry an empty caption
and no caption filter runs). Validation counts every problem with its first examples, so a bad list is
understood from one report instead of from a failed download hours later; a list that cannot be used at all is a
:class:`UsageError` that names the problem and the fix.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd

from clipline.errors import UsageError

# Undecodable bytes are kept as lone surrogates (errors="surrogateescape") so that they can be counted and shown.
_ENCODING = {"encoding": "utf-8", "encoding_errors": "surrogateescape"}


def _read_txt(p: Path) -> pd.DataFrame:
    """Columns url and caption; url only when no line has a caption (a bare-URL list)."""
    lines = p.read_bytes().decode("utf-8", "surrogateescape").splitlines()
    rows = [line.split("\t", 1) for line in lines if line.strip()]
    df = pd.DataFrame({"url": [r[0] for r in rows]})
    if any(len(r) > 1 for r in rows):
        df["caption"] = [r[1] if len(r) > 1 else "" for r in rows]
    return df


READERS = {
    ".parquet": lambda p: pd.read_parquet(p),
    ".csv": lambda p: pd.read_csv(p, dtype=str, keep_default_na=False, **_ENCODING),
    ".tsv": lambda p: pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False, quoting=3, **_ENCODING),
    ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False, **_ENCODING),
    ".txt": _read_txt,
}
"""One reader per file extension; txt lists are `URL` or `URL<TAB>caption` per line."""

CAPTIONLESS = "captionless"
"""``DataFrame.attrs`` flag of a list with no caption at all (bare-URL .txt files): its samples get an empty
caption and no caption filter runs on them."""

MAX_LIST_CAPTION_CHARS = 10_000
"""A caption longer than this is taken as a wrong column (HTML, a whole page) rather than a caption."""
EXAMPLES_PER_ISSUE = 3
_URL_RE = re.compile(r"(?i)^https?://")
_SURROGATE_RE = re.compile("[\udc80-\udcff]")
_CONTROL_RE = re.compile(r"[\x00-\x20\x7f]")


@dataclass
class ListReport:
    """What validation found in a URL list: rows read, and for each problem its count and first examples."""

    files: list[str] = field(default_factory=list)
    rows_in: int = 0
    issues: dict[str, dict] = field(default_factory=dict)
    """reason -> {"count": n, "examples": [...]}; every row with an issue is dropped before download."""

    def add(self, reason: str, values: pd.Series) -> None:
        if len(values):
            examples = [_short(v) for v in values.head(EXAMPLES_PER_ISSUE)]
            self.issues[reason] = {"count": int(len(values)), "examples": examples}

    @property
    def dropped(self) -> dict[str, int]:
        return {reason: issue["count"] for reason, issue in self.issues.items()}

    def lines(self) -> list[str]:
        """One line per problem: count and first examples, for the console and report.md."""
        return [f"{reason.replace('_', ' ')}: {i['count']} (e.g. {', '.join(repr(e) for e in i['examples'])})"
                for reason, i in self.issues.items()]


def _short(value, limit: int = 80) -> str:
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "..."


def _remote_files(spec: str) -> list[Path]:
    """A list in a bucket or on a web server (a file, a prefix of files, or a brace pattern of either), each file
    downloaded whole into storage.cache_dir/lists/... and read from there."""
    from clipline import storage

    names: list[str] = []
    if storage.is_pipe(spec):
        raise UsageError("prep.url_list is a 'pipe:' command; give a file, folder, glob, bucket prefix or URL")
    for item in storage.expand(spec):
        if storage.protocol(item) not in ("http", "https") and storage.isdir(item):
            found = [e for e in storage.listdir(item) if storage.isfile(e)]
            if not found:
                raise UsageError(f"URL list prefix {storage.redact(item)} holds no files")
            names += found
        elif storage.exists(item):
            names.append(item)
        else:
            storage.check_reachable(storage.parent(item), "the URL list at")
            raise UsageError(f"URL list not found: {storage.redact(item)}")
    unsupported = [n for n in names if Path(storage.name(n)).suffix.lower() not in READERS]
    if unsupported and len(unsupported) == len(names):
        raise UsageError(f"URL list {storage.redact(unsupported[0])} has unsupported extension "
                         f"{Path(storage.name(unsupported[0])).suffix!r}; use one of {sorted(READERS)}")
    files = []
    for n in names:
        if n in unsupported:
            continue  # a prefix may hold other objects (a _SUCCESS marker, a README) beside the lists
        local = storage.local_cache("lists", n)
        storage.get_file(n, local)
        files.append(local)
    return files


def list_files(spec: str) -> list[Path]:
    """The files a URL list spec names: a file, every supported file in a folder, or a glob pattern; or, for an
    s3://, gs:// or https:// location, a file, a bucket prefix of files or a brace pattern of them."""
    if not spec:
        raise UsageError("prep.url_list is not set: pass the URL + caption list, e.g. prep.url_list=urls.parquet "
                         "(a file, a folder or a glob such as 'lists/*.parquet')")
    from clipline import storage

    if storage.is_pipe(spec) or any(storage.is_remote(item) for item in storage.expand(spec)):
        return _remote_files(spec)
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in READERS)
        where = f"folder {p}"
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
        where = f"pattern {spec!r}"
    elif p.is_file():
        files, where = [p], str(p)
    else:
        raise UsageError(f"URL list not found: {p}")
    if not files:
        raise UsageError(f"URL list {where} matches no {'/'.join(sorted(READERS))} files")
    unsupported = [f for f in files if f.suffix.lower() not in READERS]
    if unsupported:
        raise UsageError(f"URL list {unsupported[0]} has unsupported extension {unsupported[0].suffix!r}; "
                         f"use one of {sorted(READERS)}")
    return files


def _read_file(p: Path) -> pd.DataFrame:
    try:
        return READERS[p.suffix.lower()](p)
    except Exception as e:  # pandas and pyarrow raise many types for malformed files
        raise UsageError(f"cannot read URL list {p}: {type(e).__name__}: {e}") from None


def _looks_like_urls(column: pd.Series) -> float:
    sample = column.dropna().astype(str).head(1000)
    return float(sample.str.match(_URL_RE).mean()) if len(sample) else 0.0


def _bare_urls(path: Path, df: pd.DataFrame, caption_col: str) -> bool:
    """A .txt list of URLs without any caption."""
    return path.suffix.lower() == ".txt" and caption_col not in df.columns


def _check_columns(df: pd.DataFrame, where: str, url_col: str, caption_col: str | None) -> None:
    missing = [c for c in (url_col, caption_col) if c is not None and c not in df.columns]
    if missing:
        hint = ""
        url_like = [c for c in df.columns if c != url_col and _looks_like_urls(df[c]) > 0.5]
        if url_col in missing and url_like:
            hint = f"; column {url_like[0]!r} holds URLs"
        raise UsageError(f"URL list {where} has no column {', '.join(repr(m) for m in missing)}; its columns are "
                         f"{list(df.columns)}{hint} (set prep.url_col / prep.caption_col to the right names)")


def read_url_list(path: str, url_col: str, caption_col: str) -> pd.DataFrame:
    """Load every file of a URL list, in name order, and check it is usable; UsageError naming the problem if not."""
    files = list_files(path)
    frames = []
    for f in files:
        df = _read_file(f)
        if len(df.columns) or len(df):
            _check_columns(df, str(f), url_col, None if _bare_urls(f, df, caption_col) else caption_col)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    where = path if len(files) > 1 else str(files[0])
    captionless = caption_col not in df.columns and all(_bare_urls(f, d, caption_col) for f, d in zip(files, frames))
    if captionless:
        df[caption_col] = ""
        df.attrs[CAPTIONLESS] = True
    _check_columns(df, where, url_col, caption_col)
    if len(df) == 0:
        raise UsageError(f"URL list {where} is empty: it has the columns but no rows")
    if _looks_like_urls(df[url_col]) == 0.0:
        others = [c for c in df.columns if c != url_col and _looks_like_urls(df[c]) > 0.5]
        raise UsageError(f"column {url_col!r} of {where} holds no http(s) URLs (e.g. {_short(df[url_col].iloc[0])!r})"
                         + (f"; column {others[0]!r} does: set prep.url_col={others[0]}" if others else ""))
    return df


def _as_text(column: pd.Series) -> pd.Series:
    """Strings, with bytes decoded as UTF-8 (undecodable bytes kept as surrogates, to be reported)."""
    def one(v):
        if isinstance(v, (bytes, bytearray)):
            return bytes(v).decode("utf-8", "surrogateescape")
        return "" if v is None or (isinstance(v, float) and v != v) else str(v)
    return column.map(one).astype(object)


def _malformed_url(url: str) -> bool:
    if not _URL_RE.match(url) or _CONTROL_RE.search(url) or _SURROGATE_RE.search(url):
        return True
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises for a port that is not a number in range
    except ValueError:
        return True
    return not parts.hostname


def validate_rows(df: pd.DataFrame, url_col: str, caption_col: str) -> tuple[pd.DataFrame, ListReport]:
    """Drop rows that cannot become a sample (and repeated URLs), counting each reason with its first examples.
    An empty caption is such a row, except in a list that has no captions at all (``CAPTIONLESS``)."""
    report = ListReport(rows_in=len(df))
    urls = _as_text(df[url_col]).str.strip()
    captions = _as_text(df[caption_col])
    checks = [
        ("missing_url", urls == "", urls),
        ("malformed_url", urls.map(_malformed_url), urls),
        ("empty_caption", (captions.str.strip() == "") & (not df.attrs.get(CAPTIONLESS)), urls),
        ("non_utf8_caption", captions.str.contains(_SURROGATE_RE), captions),
        ("caption_too_long", captions.str.len() > MAX_LIST_CAPTION_CHARS, captions),
    ]
    keep = pd.Series(True, index=df.index)
    for reason, mask, shown in checks:
        hit = mask.astype(bool) & keep
        report.add(reason, shown[hit])
        keep &= ~hit
    out = df[keep].copy()
    out[url_col] = urls[keep]
    out[caption_col] = captions[keep]
    repeated = out.duplicated(subset=[url_col])
    report.add("duplicate_url", out.loc[repeated, url_col])
    return out[~repeated].reset_index(drop=True), report

