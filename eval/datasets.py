"""Eval splits read from disk, in every supported layout: clipline shards, CLIP_benchmark's webdataset layout,
ImageFolder trees, CSV/TSV files, torchvision datasets, and caption files beside an images folder (Flickr's and
COCO's, as CLIP_benchmark reads them with --dataset_root and --annotation_file). Nothing is downloaded.

A split is a list of image references (read lazily, see eval.images) with one label or a list of captions per
image, plus the class names and templates stored with the data. Labels of images that cannot be used are -1,
so that image features, computed once per split and shared by every dataset entry that reads it, stay aligned.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand

from clipline import storage
from clipline.config import EvalDatasetConfig
from clipline.errors import UsageError
from clipline.shards import unsafe_member_name
from eval.images import ImageRef, TarMember
from eval.remote import is_remote_dataset, localize

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
NAMED_SPLIT_FORMATS = ("clip_benchmark_wds", "torchvision")
CAPTION_FILE_FORMATS = ("flickr", "coco_captions")
"""Retrieval sets stored as an images folder plus an annotation file."""
CLIP_BENCHMARK_ANNOTATIONS = {"flickr30k_{split}_karpathy.txt": "flickr", "flickr8k_{split}_karpathy.txt": "flickr",
                              "coco_{split}_karpathy.json": "coco_captions"}
"""The annotation file names CLIP_benchmark looks for in --dataset_root when --annotation_file is not given."""
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
        self.local: dict = {}
        """Remote location -> its local mirror (eval.remote), refreshed once per suite."""

    def get(self, key: tuple, scan) -> _Scan:
        if key not in self.scans:
            self.scans[key] = scan()
        return self.scans[key]


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def load_split(ds: EvalDatasetConfig, role: str = "test", cache: SplitCache | None = None) -> EvalSplit:
    """The images and targets of one split of ``ds``: role 'test' (path/split), 'train' or 'val' (linear probe)."""
    cache = cache or SplitCache()
    shown = storage.redact(_location(ds, role)[0])  # messages name the bucket location, not the local mirror
    if is_remote_dataset(ds):
        ds = localize(ds, cache.local)
    root, split = _location(ds, role)
    fmt = detect_format(ds, root, split)
    split = _default_split(ds, fmt, role, root, split)
    where = f"eval dataset {ds.name!r} ({role} split {fmt}:{shown}{'/' + split if split else ''})"
    if ds.task == "retrieval" and fmt in ("imagefolder", "torchvision"):
        raise UsageError(f"{where}: retrieval needs captions, which a {fmt} dataset does not have (use shards, "
                         f"clip_benchmark_wds or a CSV with a caption column)")
    if ds.task != "retrieval" and fmt in CAPTION_FILE_FORMATS:
        raise UsageError(f"{where}: a {fmt} annotation file holds captions, not labels; set task: retrieval")
    key = (fmt, str(root), split, ds.torchvision_class)
    if fmt == "csv":  # what a CSV scan holds depends on its columns and task
        key += (ds.image_field, ds.caption_field if ds.task == "retrieval" else ds.label_field or "label")
    if fmt in CAPTION_FILE_FORMATS:
        key += (ds.annotation_file,)
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


def check_dataset(ds: EvalDatasetConfig) -> str:
    """The format of ``ds``'s test split, found without reading its samples: a UsageError when its path is missing,
    empty or of no known layout (cheap enough to run before a long job starts). A dataset in a bucket is copied
    to its local mirror here (eval.remote), which the first eval then reuses."""
    if is_remote_dataset(ds):
        ds = localize(ds)
    root, split = _location(ds, "test")
    if "{" not in root and not Path(root).exists():
        raise UsageError(f"eval dataset {ds.name!r}: {root} does not exist (set path to the dataset's folder or "
                         f"file; nothing is downloaded)")
    return detect_format(ds, root, split)


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
        return "; retrieval needs captions (.txt in shards, caption_field in a CSV, or an annotation_file)"
    if fmt == "shards":
        return f"; check that label_field {ds.label_field!r} holds one of the classnames or label_values"
    return "; check that the labels match the class names"


def detect_format(ds: EvalDatasetConfig, root: str, split: str) -> str:
    if ds.format != "auto":
        return ds.format
    if ds.torchvision_class:
        return "torchvision"
    annotations = annotation_file(ds, root, split)
    if annotations is not None:
        return _annotation_format(ds, annotations)
    p = Path(root)
    if p.suffix.lower() in (".csv", ".tsv") and p.is_file():
        return "csv"
    here = p / split if split else p
    if p.is_dir() and not any(p.iterdir()) or here.is_dir() and not any(here.iterdir()):
        raise UsageError(f"eval dataset {ds.name!r}: {here if here.is_dir() else p} is empty: set path to the "
                         f"folder that holds the dataset's files")
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
                     f"clip_benchmark_wds, imagefolder, csv, torchvision, flickr, coco_captions (the last two "
                     f"with annotation_file)")


def annotation_file(ds: EvalDatasetConfig, root: str, split: str) -> Path | None:
    """annotation_file, else the one file in root named as CLIP_benchmark names it by default, else None."""
    if ds.annotation_file:
        path = Path(ds.annotation_file)
        if not path.is_file():
            raise UsageError(f"eval dataset {ds.name!r}: annotation_file {path} not found")
        return path
    if ds.format not in ("auto", *CAPTION_FILE_FORMATS) or not Path(root).is_dir():
        return None
    found = [Path(root) / name.format(split=split or "test") for name, fmt in CLIP_BENCHMARK_ANNOTATIONS.items()
             if ds.format in ("auto", fmt) and (Path(root) / name.format(split=split or "test")).is_file()]
    if len(found) > 1:
        raise UsageError(f"eval dataset {ds.name!r}: {root} holds {found[0].name} and {found[1].name}; set "
                         f"annotation_file to the one to evaluate")
    return found[0] if found else None


def _annotation_format(ds: EvalDatasetConfig, path: Path) -> str:
    if path.suffix.lower() != ".json":
        return "flickr"
    data = _read_json(path, f"eval dataset {ds.name!r}")
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return "coco_captions"
    return "flickr"


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
    path = Path(root)
    if split:
        raise UsageError(f"{where}: a CSV holds one split; point path (or train_path, val_path) at its file and "
                         f"leave the split empty")
    if not path.is_file():
        raise UsageError(f"{where}: file not found: {path}")
    columns, rows = read_table(path, where)
    target = ds.caption_field if ds.task == "retrieval" else (ds.label_field or "label")
    keys = {ds.image_field: "image_field", target: "caption_field" if ds.task == "retrieval" else "label_field"}
    for column, key in keys.items():
        if column not in columns:
            raise UsageError(f"{where}: no column {column!r}; set {key} to one of its columns {columns}")
    image_col, target_col = columns.index(ds.image_field), columns.index(target)
    scan = _Scan([], [], Counter())
    position: dict[str, int] = {}
    for image, value in ((row[image_col], row[target_col]) for row in rows):
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


def read_table(path: Path, where: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a .csv (comma) or .tsv (tab) file; quoted fields may hold the separator.

    A user's two-column `image,caption` file often leaves captions with commas unquoted: when the header has
    exactly two columns, a longer row is split at its first separator only, so the extra separators go to the
    last column. Any other row with the wrong number of fields is an error naming its line."""
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=sep)
            header = next(reader, None)
            if not header:
                raise UsageError(f"{where}: {path} is empty (the first line must name the columns)")
            rows = []
            for row in reader:
                if not row or row == [""]:
                    continue
                if len(row) > len(header) == 2:
                    row = [row[0], sep.join(row[1:])]
                if len(row) != len(header):
                    raise UsageError(
                        f"{where}: line {reader.line_num} of {path} has {len(row)} fields for the {len(header)} "
                        f"columns {header}; put double quotes around a field that contains {sep!r}, e.g. "
                        f"\"a red{sep} round thing\"")
                rows.append(row)
    except (csv.Error, UnicodeDecodeError) as e:
        raise UsageError(f"{where}: cannot read {path} as {'TSV' if sep != ',' else 'CSV'}: {e}") from None
    return header, rows


def _scan_flickr(ds: EvalDatasetConfig, root: str, split: str, where: str) -> _Scan:
    annotations = _require_annotation_file(ds, root, split, where)
    if annotations.suffix.lower() == ".json":
        pairs = _flickr_json(_read_json(annotations, where), split or "test", annotations, where)
    else:
        pairs = _flickr_text(annotations, where)
    return _caption_file_scan(Path(root), pairs, annotations, where)


def _flickr_text(path: Path, where: str) -> list[tuple[str, list[str]]]:
    """CLIP_benchmark's flickr30k/flickr8k files (a header line, then IMAGE.jpg,CAPTION with commas left unquoted
    in the caption) or a Flickr token file (IMAGE.jpg#N<TAB>CAPTION, no header)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{where}: cannot read the annotation file {path}: {e}") from None
    captions: dict[str, list[str]] = defaultdict(list)
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        if "\t" in line and "#" in line.split("\t", 1)[0]:  # token file: NAME#N<TAB>caption
            image, caption = line.split("\t", 1)
            image = image.rsplit("#", 1)[0]
        else:
            # As CLIP_benchmark splits: at '.jpg,' (captions contain commas), or the first comma otherwise.
            head, dot, caption = line.partition(".jpg,")
            image = head + ".jpg" if dot else None
            if image is None:
                image, comma, caption = line.partition(",")
                if not comma:
                    raise UsageError(f"{where}: line {number} of {path} is not IMAGE,CAPTION nor IMAGE#N<TAB>CAPTION:"
                                     f" {line[:80]!r}")
            if number == 1 and not image.lower().endswith(IMAGE_SUFFIXES):
                continue  # the header line (image,caption)
        captions[image.strip()].append(caption.strip())
    return list(captions.items())


def _flickr_json(data: Any, split: str, path: Path, where: str) -> list[tuple[str, list[str]]]:
    """A list of {"image": ..., "caption": str or [str]} (BLIP/LAVIS), or Karpathy's dataset_*.json (images with
    filename, split and sentences), of which only the split's images are kept."""
    captions: dict[str, list[str]] = defaultdict(list)
    try:
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            for im in data["images"]:
                if im.get("split", split) == split:
                    name = str(Path(im.get("filepath", "")) / im["filename"])
                    captions[name] += [s["raw"].strip() for s in im["sentences"]]
            if not captions:
                raise UsageError(f"{where}: no images of split {split!r} in {path}; set split")
        elif isinstance(data, list):
            for entry in data:
                caps = entry["caption"]
                captions[entry["image"]] += [c.strip() for c in ([caps] if isinstance(caps, str) else caps)]
        else:
            raise TypeError("neither a list nor a dict with 'images'")
    except (KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"{where}: {path} is not a flickr annotation JSON (a list of {{\"image\": ..., "
                         f"\"caption\": [...]}} or Karpathy's {{\"images\": [{{\"filename\", \"sentences\"}}]}}):"
                         f" {type(e).__name__} {e}") from None
    return list(captions.items())


def _scan_coco_captions(ds: EvalDatasetConfig, root: str, split: str, where: str) -> _Scan:
    """COCO's captions JSON read as torchvision's CocoCaptions (CLIP_benchmark's mscoco_captions) reads it: images
    in id order, each with its captions in file order."""
    annotations = _require_annotation_file(ds, root, split, where)
    data = _read_json(annotations, where)
    try:
        names = {im["id"]: im["file_name"] for im in data["images"]}
        captions: dict[Any, list[str]] = defaultdict(list)
        for a in data["annotations"]:
            captions[a["image_id"]].append(a["caption"].strip())
    except (KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"{where}: {annotations} is not a COCO captions JSON (images with id and file_name, "
                         f"annotations with image_id and caption): {type(e).__name__} {e}") from None
    unknown = [i for i in captions if i not in names]
    if unknown:
        raise UsageError(f"{where}: {annotations} has captions of image_id {unknown[0]!r}, which its images list "
                         f"lacks ({len(unknown)} such ids)")
    pairs = [(names[i], captions.get(i, [])) for i in sorted(names)]
    return _caption_file_scan(Path(root), pairs, annotations, where)


def _require_annotation_file(ds: EvalDatasetConfig, root: str, split: str, where: str) -> Path:
    path = annotation_file(ds, root, split)
    if path is None:
        defaults = [n.format(split=split or "test") for n, f in CLIP_BENCHMARK_ANNOTATIONS.items() if f == ds.format]
        raise UsageError(f"{where}: set annotation_file, the captions file (none of {defaults} is in {root})")
    return path


def _caption_file_scan(root: Path, pairs: list[tuple[str, list[str]]], annotations: Path, where: str) -> _Scan:
    """Images named in an annotation file, found under root or, as in CLIP_benchmark's COCO layout
    (ROOT/val2014/...), under one of its subfolders. A missing image is an error."""
    if not pairs:
        raise UsageError(f"{where}: {annotations} names no images")
    if not root.is_dir():
        raise UsageError(f"{where}: {root} is not a folder (path must be the images folder, CLIP_benchmark's "
                         f"--dataset_root)")
    first = pairs[0][0]
    folders = [root] + sorted(c for c in root.iterdir() if c.is_dir())
    folder = next((f for f in folders if (f / first).is_file()), root)
    refs = [str(folder / name) for name, _ in pairs]
    missing = [r for r in refs if not os.path.isfile(r)]
    if missing:
        raise UsageError(f"{where}: {len(missing)} of the {len(refs)} images named in {annotations} are missing, "
                         f"e.g. {missing[0]}; set path to the folder that holds them (CLIP_benchmark's "
                         f"--dataset_root)")
    if folder != root:
        log.info("%s: images found in %s", where, folder)
    return _Scan(refs, [[c for c in caps if c] for _, caps in pairs], Counter())


def _read_json(path: Path, where: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{where}: cannot read {path} as JSON: {e}") from None


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
             "imagefolder": _scan_imagefolder, "csv": _scan_csv, "torchvision": _scan_torchvision,
             "flickr": _scan_flickr, "coco_captions": _scan_coco_captions}


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
        beyond = [v for v in values if v is not None and v >= len(classnames)]
        if beyond:
            raise UsageError(f"{where}: {len(classnames)} class names for labels up to {max(beyond)} "
                             f"({len(beyond)} images have a label >= {len(classnames)}); give one name per class "
                             f"(classnames, classnames_file or the dataset's classnames.txt)")
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
