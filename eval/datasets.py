"""Eval splits read from disk, in every supported layout: clipline shards, CLIP_benchmark's webdataset layout,
ImageFolder trees, CSV/TSV files and torchvision datasets. Nothing is downloaded.

A split is a list of image references (read lazily, see eval.images) with one label or a list of captions per
image, plus the class names and templates stored with the data. Labels of images that cannot be used are -1,
so that image features, computed once per split and shared by every dataset entry that reads it, stay aligned.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand

from clipline.config import EvalDatasetConfig
from clipline.errors import UsageError
from clipline.shards import unsafe_member_name
from eval.images import ImageRef, TarMember

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
NAMED_SPLIT_FORMATS = ("clip_benchmark_wds", "torchvision")
SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "eval"
"""Template and class-name files shipped with clipline, found by bare name (e.g. templates_file: imagenet)."""


@dataclass
class EvalSplit:
    name: str
    """The dataset entry and split, for messages."""
    refs: list[ImageRef]
    images_key: tuple
    """Identifies the images: entries with the same key share one feature computation."""
    labels: list[int] = field(default_factory=list)
    """Classification: class index per image, -1 for an image without a usable label."""
    captions: list[list[str]] = field(default_factory=list)
    """Retrieval: the captions of each image (an empty list for an image without any)."""
    classnames: list[str] = field(default_factory=list)
    templates: list[str] | None = None
    """Templates stored with the data (CLIP_benchmark's zeroshot_classification_templates.txt), if any."""
    indexed: Any = None
    """For int refs: the map-style dataset they index (torchvision)."""
    skipped: Counter = field(default_factory=Counter)


@dataclass
class _Scan:
    """What a layout holds before any dataset entry interprets it: refs and per-image raw metadata."""

    refs: list[ImageRef]
    metas: list[Any]
    skipped: Counter
    classes: list[str] | None = None
    templates: list[str] | None = None
    indexed: Any = None


class SplitCache:
    """Scans of the same files are shared by the dataset entries of a suite (e.g. six label fields of one split)."""

    def __init__(self) -> None:
        self.scans: dict[tuple, _Scan] = {}

    def get(self, key: tuple, scan) -> _Scan:
        if key not in self.scans:
            self.scans[key] = scan()
        return self.scans[key]


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def load_split(ds: EvalDatasetConfig, role: str = "test", cache: SplitCache | None = None) -> EvalSplit:
    """The images and targets of one split of ``ds``: role 'test' (path/split), 'train' or 'val' (linear probe)."""
    cache = cache or SplitCache()
    root, split = _location(ds, role)
    fmt = detect_format(ds, root, split)
    split = _default_split(ds, fmt, role, root, split)
    where = f"eval dataset {ds.name!r} ({role} split {fmt}:{root}{'/' + split if split else ''})"
    if ds.task == "retrieval" and fmt in ("imagefolder", "torchvision"):
        raise UsageError(f"{where}: retrieval needs captions, which a {fmt} dataset does not have (use shards, "
                         f"clip_benchmark_wds or a CSV with a caption column)")
    key = (fmt, str(root), split, ds.torchvision_class)
    if fmt == "csv":  # what a CSV scan holds depends on its columns and task
        key += (ds.image_field, ds.caption_field if ds.task == "retrieval" else ds.label_field or "label")
    scan = cache.get(key, lambda: _SCANNERS[fmt](ds, root, split, where))
    out = EvalSplit(name=where, refs=scan.refs, images_key=key, indexed=scan.indexed,
                    skipped=Counter(scan.skipped), templates=scan.templates)
    if ds.task == "retrieval":
        _captions(ds, fmt, scan, out, where)
        usable = sum(1 for c in out.captions if c)
    else:
        _labels(ds, fmt, scan, out, where)
        usable = sum(1 for y in out.labels if y >= 0)
    if not usable:
        raise UsageError(f"{where} has no usable samples (skipped: {dict(out.skipped) or 'none'})"
                         + _no_samples_hint(ds, fmt))
    return out


def _location(ds: EvalDatasetConfig, role: str) -> tuple[str, str]:
    if role == "test":
        return ds.path, ds.split
    if role == "train":
        return ds.train_path or ds.path, ds.train_split
    return ds.val_path or ds.train_path or ds.path, ds.val_split


def _default_split(ds: EvalDatasetConfig, fmt: str, role: str, root: str, split: str) -> str:
    if split:
        return split
    if fmt not in NAMED_SPLIT_FORMATS:
        if role == "train" and root == ds.path:
            raise UsageError(f"eval dataset {ds.name!r}: a linear probe on a {fmt} dataset needs its training "
                             f"images: set train_path (or train_split, a subfolder of path)")
        return split
    if role == "val":
        raise UsageError(f"eval dataset {ds.name!r}: set val_split, the name of the validation split in {root}")
    return "train" if role == "train" else "test"


def _no_samples_hint(ds: EvalDatasetConfig, fmt: str) -> str:
    if ds.task == "retrieval":
        return "; retrieval needs captions (.txt in shards, caption_field in a CSV)"
    if fmt == "shards":
        return f"; check that label_field {ds.label_field!r} holds one of the classnames or label_values"
    return "; check that the labels match the class names"


def detect_format(ds: EvalDatasetConfig, root: str, split: str) -> str:
    if ds.format != "auto":
        return ds.format
    if ds.torchvision_class:
        return "torchvision"
    p = Path(root)
    if p.suffix.lower() in (".csv", ".tsv") and p.is_file():
        return "csv"
    if p.is_dir():
        if any((p / f).is_file() for f in ("classnames.txt", "dataset_type.txt",
                                            "zeroshot_classification_templates.txt")) \
                or (p / (split or "test") / "nshards.txt").is_file():
            return "clip_benchmark_wds"
        here = p / split if split else p
        if any(here.glob("*.tar")):
            return "shards"
        if here.is_dir() and any(c.is_dir() for c in here.iterdir()):
            return "imagefolder"
    elif "{" in root and any(Path(s).is_file() for s in braceexpand.braceexpand(root)):
        return "shards"
    if not p.exists() and "{" not in root:
        raise UsageError(f"eval dataset {ds.name!r}: {root} does not exist (set path to the dataset's folder or "
                         f"file; nothing is downloaded)")
    raise UsageError(f"eval dataset {ds.name!r}: cannot tell the format of {root}; set format to one of shards, "
                     f"clip_benchmark_wds, imagefolder, csv, torchvision")


# ----------------------------------------------------------------------------------------------------------------
# Scanning each layout


def _tar_samples(shard: str, skipped: Counter) -> list[tuple[ImageRef, dict[str, bytes]]]:
    """(image ref, {ext: bytes} of the other members) per sample key; image bytes stay on disk."""
    out: list[tuple[ImageRef, dict[str, bytes]]] = []
    current, image, meta = None, None, {}

    def flush():
        if current is None:
            return
        if image is None:
            skipped["no_image"] += 1
        else:
            out.append((image, meta))

    compressed = shard.endswith((".gz", ".tgz", ".xz", ".bz2"))
    try:
        with tarfile.open(shard, "r|*" if compressed else "r:") as tar:
            for member in tar:
                if not member.isfile():
                    if member.issym() or member.islnk():
                        skipped["link_member"] += 1
                    continue
                if unsafe_member_name(member.name):  # never used as a path, but a sign of a hostile shard
                    skipped["unsafe_member_name"] += 1
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, dot, ext = base.partition(".")
                if not dot or not key:
                    continue
                if key != current:
                    flush()
                    current, image, meta = key, None, {}
                ext = ext.lower()
                if ext in IMAGE_EXTS and image is None:
                    # Compressed tars cannot be read at an offset: keep those images' bytes instead.
                    image = (tar.extractfile(member).read() if compressed
                             else TarMember(shard, member.offset_data, member.size, member.name))
                elif ext not in IMAGE_EXTS:
                    meta[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        skipped["unreadable_shard"] += 1
        log.warning("skipping the rest of shard %s: %s", shard, e)
        return out  # the sample being read when the damage was found may be incomplete
    flush()
    return out


def _scan_tars(shards: list[str]) -> _Scan:
    scan = _Scan([], [], Counter())
    for shard in shards:
        for ref, meta in _tar_samples(shard, scan.skipped):
            scan.refs.append(ref)
            scan.metas.append(meta)
    return scan


def _scan_shards(ds: EvalDatasetConfig, root: str, split: str, where: str) -> _Scan:
    from clipline.shards import list_shards

    try:
        return _scan_tars(list_shards(str(Path(root) / split) if split else root))
    except FileNotFoundError as e:
        raise UsageError(f"{where}: {e}") from None


def _scan_clip_benchmark_wds(ds: EvalDatasetConfig, root: str, split: str, where: str) -> _Scan:
    folder = Path(root) / split
    nshards = folder / "nshards.txt"
    if nshards.is_file():
        shards = [str(folder / f"{i}.tar") for i in range(int(nshards.read_text().strip()))]
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise UsageError(f"{where}: nshards.txt lists {len(shards)} shards but {missing[0]} is missing")
    else:
        shards = sorted((str(s) for s in folder.glob("*.tar")), key=lambda s: _natural_key(Path(s).name))
        if not shards:
            raise UsageError(f"{where}: no shards in {folder} (CLIP_benchmark's layout is ROOT/SPLIT/0.tar ... "
                             f"with ROOT/SPLIT/nshards.txt)")
    scan = _scan_tars(shards)
    classes_file = Path(root) / "classnames.txt"
    scan.classes = read_classnames(classes_file) if classes_file.is_file() else None
    templates_file = Path(root) / "zeroshot_classification_templates.txt"
    scan.templates = read_templates(templates_file) if templates_file.is_file() else None
    return scan


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _scan_imagefolder(ds: EvalDatasetConfig, root: str, split: str, where: str) -> _Scan:
    folder = Path(root) / split if split else Path(root)
    if not folder.is_dir():
        raise UsageError(f"{where}: {folder} is not a folder")
    scan = _Scan([], [], Counter())
    classes = []
    for class_dir in sorted(c for c in folder.iterdir() if c.is_dir()):
        files = sorted(f for f in class_dir.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not files:
            log.warning("%s: class folder %s holds no images; it is not a class", where, class_dir.name)
            continue
        classes.append(class_dir.name)
        scan.refs += [str(f) for f in files]
        scan.metas += [class_dir.name] * len(files)
    if not classes:
        raise UsageError(f"{where}: no CLASS/IMAGE subfolders with images in {folder}")
    scan.classes = classes
    return scan


def _scan_csv(ds: EvalDatasetConfig, root: str, split: str, where: str) -> _Scan:
    import pandas as pd

    path = Path(root)
    if split:
        raise UsageError(f"{where}: a CSV holds one split; point path (or train_path, val_path) at its file and "
                         f"leave the split empty")
    if not path.is_file():
        raise UsageError(f"{where}: file not found: {path}")
    table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
    target = ds.caption_field if ds.task == "retrieval" else (ds.label_field or "label")
    keys = {ds.image_field: "image_field", target: "caption_field" if ds.task == "retrieval" else "label_field"}
    for column, key in keys.items():
        if column not in table.columns:
            raise UsageError(f"{where}: no column {column!r}; set {key} to one of its columns {list(table.columns)}")
    scan = _Scan([], [], Counter())
    position: dict[str, int] = {}
    for image, value in zip(table[ds.image_field], table[target]):
        ref = str((path.parent / image) if not Path(image).is_absolute() else Path(image))
        if ds.task == "retrieval":
            if ref not in position:  # several rows of one image are its several captions
                position[ref] = len(scan.refs)
                scan.refs.append(ref)
                scan.metas.append([])
            if value.strip():
                scan.metas[position[ref]].append(value.strip())
        else:
            scan.refs.append(ref)
            scan.metas.append(value.strip())
    return scan


def _scan_torchvision(ds: EvalDatasetConfig, root: str, split: str, where: str) -> _Scan:
    import inspect

    import torchvision.datasets as tvd

    cls = getattr(tvd, ds.torchvision_class, None)
    if not isinstance(cls, type):
        raise UsageError(f"eval dataset {ds.name!r}: torchvision.datasets has no class {ds.torchvision_class!r}")
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {"download": False} if "download" in params else {}
    if "split" in params:
        kwargs["split"] = split
    elif "train" in params:
        if split not in ("train", "test"):
            raise UsageError(f"{where}: {ds.torchvision_class} has only 'train' and 'test' splits")
        kwargs["train"] = split == "train"
    try:
        dataset = cls(root=root, **kwargs)
    except (RuntimeError, FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"{where}: torchvision could not open it ({e}); it must already be on disk under {root}"
                         f" (nothing is downloaded)") from None
    targets = _torchvision_targets(dataset)
    classes = getattr(dataset, "classes", None)
    return _Scan(list(range(len(dataset))), targets, Counter(), classes=list(classes) if classes else None,
                 indexed=dataset)


def _torchvision_targets(dataset) -> list[int]:
    for attr in ("targets", "_labels", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None and len(values) == len(dataset):
            return [int(v) for v in values]
    for attr in ("samples", "_samples"):
        values = getattr(dataset, attr, None)
        if values is not None and len(values) == len(dataset):
            return [int(v[1]) for v in values]
    log.warning("%s stores no label list: reading every sample once to get the labels", type(dataset).__name__)
    return [int(dataset[i][1]) for i in range(len(dataset))]


_SCANNERS = {"shards": _scan_shards, "clip_benchmark_wds": _scan_clip_benchmark_wds,
             "imagefolder": _scan_imagefolder, "csv": _scan_csv, "torchvision": _scan_torchvision}


# ----------------------------------------------------------------------------------------------------------------
# Targets: captions and labels


def _captions(ds: EvalDatasetConfig, fmt: str, scan: _Scan, out: EvalSplit, where: str) -> None:
    for meta in scan.metas:
        if isinstance(meta, list):
            lines = meta
        else:
            text = meta.get("txt", b"").decode("utf-8", "replace")
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            out.skipped["no_caption"] += 1
        out.captions.append(lines)


def _labels(ds: EvalDatasetConfig, fmt: str, scan: _Scan, out: EvalSplit, where: str) -> None:
    classnames = _configured_classnames(ds)
    if fmt == "shards":
        if not ds.label_field:
            raise UsageError(f"{where}: set label_field, the key of the label in each sample's .json")
        values = [_json_label(m, ds.label_field) for m in scan.metas]
        by_value = True
    elif fmt == "clip_benchmark_wds":
        values = [_cls_label(m) for m in scan.metas]
        by_value = False
    elif fmt == "torchvision":
        values, by_value = scan.metas, False
    elif fmt == "imagefolder":
        values, by_value = scan.metas, True
        if classnames is None:
            classnames = [c.replace("_", " ") for c in scan.classes]
        if not ds.label_values:  # folder i is class i, as in torchvision's ImageFolder
            position = {c: i for i, c in enumerate(scan.classes)}
            by_value, values = False, [position[v] for v in scan.metas]
    else:  # csv
        values = scan.metas
        by_value = bool(ds.label_values) or not all(v.lstrip("-").isdigit() for v in values if v)
        if classnames is None and by_value and not ds.label_values:
            classnames = sorted({v for v in values if v})
            log.warning("%s: no class names given; using its %d distinct labels as class names", where,
                        len(classnames))
        if not by_value:
            values = [int(v) if v else None for v in values]
    if classnames is None:
        classnames = scan.classes
    elif fmt in ("imagefolder", "torchvision") and scan.classes and not ds.label_values \
            and len(classnames) != len(scan.classes):
        raise UsageError(f"{where}: {len(classnames)} class names for {len(scan.classes)} classes in the data; "
                         f"give one name per class, in the order of {scan.classes[:3]}...")
    if classnames is None:
        raise UsageError(f"{where}: no class names: set classnames or classnames_file"
                         + (" (or add classnames.txt beside the splits)" if fmt == "clip_benchmark_wds" else ""))
    if by_value:
        index = {str(v): i for i, v in enumerate(ds.label_values or classnames)}
        labels = [index.get(str(v), -1) if v is not None else -1 for v in values]
    else:
        labels = [v if v is not None and 0 <= v < len(classnames) else -1 for v in values]
    out.skipped["unknown_label"] += sum(1 for y in labels if y < 0)
    out.classnames, out.labels = _drop_blank_classes(classnames, labels, out.skipped, where)
    if len(out.classnames) < 2:
        raise UsageError(f"{where}: needs at least 2 class names, got {out.classnames}")


def _configured_classnames(ds: EvalDatasetConfig) -> list[str] | None:
    if ds.classnames:
        return list(ds.classnames)
    if ds.classnames_file:
        return read_classnames(shipped_file(ds.classnames_file, "classnames", f"eval dataset {ds.name!r}"))
    return None


def _json_label(meta: dict, key: str):
    try:
        return json.loads(meta.get("json", b"{}") or b"{}").get(key)
    except (json.JSONDecodeError, AttributeError):
        return None


def _cls_label(meta: dict) -> int | None:
    try:
        return int(meta["cls"].decode().strip())
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


def _drop_blank_classes(classnames: list[str], labels: list[int], skipped: Counter,
                        where: str) -> tuple[list[str], list[int]]:
    """A blank class name is no class: drop it and its images, keeping the other labels pointing right."""
    if all(c.strip() for c in classnames):
        return [c.strip() for c in classnames], labels
    blank = [i for i, c in enumerate(classnames) if not c.strip()]
    log.warning("%s: ignoring %d blank class name(s) (positions %s) and their images", where, len(blank), blank)
    new_index, kept = {}, []
    for i, c in enumerate(classnames):
        if c.strip():
            new_index[i] = len(kept)
            kept.append(c.strip())
    remapped = [new_index.get(y, -1) for y in labels]
    skipped["label_of_blank_class"] += sum(1 for y, r in zip(labels, remapped) if y >= 0 > r)
    return kept, remapped


# ----------------------------------------------------------------------------------------------------------------
# Class-name and template files


def shipped_file(name: str, kind: str, where: str) -> Path:
    """A path as given, or a bare name of a file shipped in configs/eval/<kind>/."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = SHIPPED / kind / f"{name}.txt"
    if "/" not in name and shipped.is_file():
        return shipped
    available = sorted(f.stem for f in (SHIPPED / kind).glob("*.txt"))
    raise UsageError(f"{where}: {kind} file {name!r} not found; pass a path or one of the shipped names: "
                     f"{', '.join(available)}")


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the {what} file {path}: {e}") from None
    lines = [ln.strip() for ln in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def read_classnames(path: str | Path) -> list[str]:
    """One class per line. Blank lines keep their position (labels are line indices) and are dropped later,
    with a warning: CLIP_benchmark would turn each into a class with an empty name."""
    lines = _read_lines(Path(path), "class names")
    if not any(lines):
        raise UsageError(f"the class names file {path} is empty")
    return lines


def read_templates(path: str | Path) -> list[str]:
    lines = _read_lines(Path(path), "templates")
    blank = [i + 1 for i, ln in enumerate(lines) if not ln]
    if blank:
        log.warning("templates file %s: ignoring blank line(s) %s", path, blank)
    templates = [ln for ln in lines if ln]
    check_templates(templates, str(path))
    return templates


def check_templates(templates: list[str], where: str) -> None:
    if not templates:
        raise UsageError(f"{where}: no templates")
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise UsageError(f"{where}: {len(bad)} template(s) lack '{{c}}', the class name's place, e.g. {bad[0]!r}; "
                         f"write them like 'a photo of a {{c}}.'")


def resolve_templates(ds: EvalDatasetConfig, on_disk: list[str] | None) -> list[str]:
    """Inline templates, else templates_file, else the data's own, else OpenAI's ImageNet set."""
    where = f"eval dataset {ds.name!r}"
    if ds.templates:
        check_templates(ds.templates, where)
        return list(ds.templates)
    if ds.templates_file:
        return read_templates(shipped_file(ds.templates_file, "templates", where))
    if on_disk:
        return on_disk
    return read_templates(shipped_file("imagenet", "templates", where))
