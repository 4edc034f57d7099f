"""Reading and validating URL + caption lists before any download starts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from clipline.errors import UsageError

READERS = {
    ".parquet": lambda p: pd.read_parquet(p),
    ".csv": lambda p: pd.read_csv(p, dtype=str, keep_default_na=False),
    ".tsv": lambda p: pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False),
    ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
}


def read_url_list(path: str, url_col: str, caption_col: str) -> pd.DataFrame:
    """Load a URL list and check it is usable; raise UsageError naming the problem otherwise."""
    p = Path(path)
    if not path:
        raise UsageError("prep.url_list is not set: pass the URL + caption list, e.g. prep.url_list=urls.parquet")
    if not p.is_file():
        raise UsageError(f"URL list not found: {p}")
    reader = READERS.get(p.suffix.lower())
    if reader is None:
        raise UsageError(f"URL list {p} has unsupported extension {p.suffix!r}; use one of {sorted(READERS)}")
    try:
        df = reader(p)
    except Exception as e:  # pandas raises many types for malformed files
        raise UsageError(f"cannot read URL list {p}: {type(e).__name__}: {e}") from None
    missing = [c for c in (url_col, caption_col) if c not in df.columns]
    if missing:
        raise UsageError(f"URL list {p} has no column {', '.join(repr(m) for m in missing)}; its columns are "
                         f"{list(df.columns)} (set prep.url_col / prep.caption_col to the right names)")
    if len(df) == 0:
        raise UsageError(f"URL list {p} is empty: it has the columns but no rows")
    return df


def clean_rows(df: pd.DataFrame, url_col: str, caption_col: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop rows that cannot become a sample, returning the rest and a count per reason."""
    urls = df[url_col].astype("string").fillna("").str.strip()
    captions = df[caption_col].astype("string").fillna("")
    reasons = {
        "missing_url": urls == "",
        "not_http_url": (urls != "") & ~urls.str.match(r"(?i)^https?://[^\s/]+"),
        "empty_caption": captions.str.strip() == "",
    }
    dropped: dict[str, int] = {}
    keep = pd.Series(True, index=df.index)
    for reason, mask in reasons.items():
        n = int((mask & keep).sum())
        if n:
            dropped[reason] = n
        keep &= ~mask
    out = df[keep].copy()
    out[url_col] = urls[keep]
    out[caption_col] = captions[keep]
    before = len(out)
    out = out.drop_duplicates(subset=[url_col])
    if before - len(out):
        dropped["duplicate_url"] = before - len(out)
    return out.reset_index(drop=True), dropped
