"""Eval datasets in every layout, from disk: the same images written as CLIP_benchmark webdataset shards, an
ImageFolder tree, a CSV and torchvision's MNIST files give the same numbers; bad input gives clear errors and
the suite goes on with the other datasets.

The builders here (a random open_clip checkpoint folder, scikit-learn's digits upsampled, the layouts) are also
used by test_eval_parity.py and test_eval_suite.py.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from clipline.config import EvalConfig, EvalDatasetConfig, load_config
from clipline.errors import UsageError
from conftest import TINY_MODEL, make_shard_folder
from eval.datasets import load_split, read_classnames, read_templates
from eval.suite import run_suite

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = ["a photo of the number {c}.", "the digit {c}.", "a handwritten {c}."]


# ----------------------------------------------------------------------------------------------------------------
# Builders


def random_checkpoint(folder: Path, seed: int = 0, model_json: Path = TINY_MODEL,
                      centre_on: tuple[list, list[str]] | None = None) -> Path:
    """A randomly initialised open_clip model saved as a checkpoint folder (open_clip's local-dir layout).

    A random network maps every input to nearly the same direction, so it predicts one class for everything and
    a comparison of two evaluators on it would check little. ``centre_on=(images, texts)`` shifts the output
    biases so that these images' and texts' mean embeddings are zero: still random weights, but scores that
    differ from image to image, with no ties.
    """
    import open_clip
    from safetensors.torch import save_file

    open_clip.add_model_config(model_json)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(model_json.stem)
    if centre_on is not None:
        _centre(model, preprocess, open_clip.get_tokenizer(model_json.stem), *centre_on)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": open_clip.get_model_config(model_json.stem),
              "preprocess_cfg": dict(model.visual.preprocess_cfg)}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    (folder / "COMPLETE").write_text("0\n")
    return folder


@torch.no_grad()
def _centre(model, preprocess, tokenizer, images, texts) -> None:
    model.eval()
    mean_image = model.encode_image(torch.stack([preprocess(im) for im in images])).mean(dim=0)
    model.visual.attnpool.c_proj.bias -= mean_image
    mean_text = model.encode_text(tokenizer(texts)).mean(dim=0)
    # The text tower ends with ln_final then a bias-free projection: shift ln_final's bias instead.
    model.ln_final.bias -= mean_text @ torch.linalg.pinv(model.text_projection)


def digits(size: int = 64, n: int | None = None) -> tuple[list[Image.Image], list[int]]:
    """scikit-learn's bundled 8x8 digits, upsampled to the model's image size."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((size, size), Image.NEAREST).convert("RGB")
              for im in d.images[:n]]
    return images, [int(t) for t in d.target[:n]]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_clip_benchmark_wds(root: Path, samples: list[tuple], *, n_shards: int = 2,
                             classnames: list[str] | None = None, templates: list[str] | None = None,
                             retrieval: bool = False, split: str = "test") -> Path:
    """CLIP_benchmark's layout: ROOT/SPLIT/{0..n-1}.tar + nshards.txt, classnames.txt, templates, dataset type.
    Each sample is (image, target extension 'cls' or 'txt', target bytes); the image is a PIL image (stored as
    PNG) or (extension, encoded bytes), stored as is."""
    per = -(-len(samples) // n_shards)
    for s in range(n_shards):
        members = []
        for i, (image, ext, target) in enumerate(samples[s * per:(s + 1) * per], start=s * per):
            image_ext, data = ("png", png_bytes(image)) if isinstance(image, Image.Image) else image
            members += [(f"s{i:06d}.{image_ext}", data), (f"s{i:06d}.{ext}", target)]
        write_tar(root / split / f"{s}.tar", members)
    (root / split / "nshards.txt").write_text(f"{n_shards}\n")
    if classnames is not None:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def write_digits_wds(root: Path, images, labels, **kwargs) -> Path:
    samples = [(im, "cls", str(y).encode()) for im, y in zip(images, labels)]
    return write_clip_benchmark_wds(root, samples, classnames=DIGIT_NAMES, templates=DIGIT_TEMPLATES, **kwargs)


def write_imagefolder(root: Path, images, labels) -> Path:
    for i, (im, y) in enumerate(zip(images, labels)):
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        im.save(root / str(y) / f"{i:05d}.png")
    return root


def write_csv(path: Path, images, labels, sep: str = ",") -> Path:
    folder = path.parent / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"path{sep}label"]
    for i, (im, y) in enumerate(zip(images, labels)):
        im.save(folder / f"{i:05d}.png")
        rows.append(f"images/{i:05d}.png{sep}{y}")
    path.write_text("\n".join(rows) + "\n")
    return path


def write_mnist(root: Path, images, labels, train_images=None, train_labels=None) -> Path:
    """torchvision's MNIST raw files (idx format; torchvision wants both splits), holding the given images."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    splits = {"t10k": (images, labels), "train": (train_images or images, train_labels or labels)}
    for prefix, (ims, ys) in splits.items():
        grey = np.stack([np.asarray(im.convert("L")) for im in ims])
        n, h, w = grey.shape
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + grey.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + bytes(ys))
    return root


def suite_config(tmp_path: Path, checkpoint, datasets: list[dict], **eval_keys) -> EvalConfig:
    ckpts = checkpoint if isinstance(checkpoint, list) else [checkpoint]
    # fp32 unless a test asks otherwise: eval.precision=auto would make the numbers depend on the CPU.
    data = {"eval": {"checkpoints": [str(c) for c in ckpts], "output_dir": str(tmp_path / "out"),
                     "batch_size": 64, "workers": 0, "progress": False, "precision": "fp32", "datasets": datasets,
                     **eval_keys}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config([str(path)]).eval


def by_key(records: list[dict]) -> dict:
    return {(r["dataset"], r["metric"]): r for r in records}


# ----------------------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "random")


@pytest.fixture(scope="module")
def digit_layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    images, labels = digits(n=300)
    return {"wds": write_digits_wds(root / "wds", images, labels),
            "imagefolder": write_imagefolder(root / "folder", images, labels),
            "csv": write_csv(root / "csv" / "digits.csv", images, labels),
            "tsv": write_csv(root / "tsv" / "digits.tsv", images, labels, sep="\t"),
            "torchvision": write_mnist(root / "mnist", images, labels)}


def test_every_layout_gives_the_same_numbers(tmp_path, checkpoint, digit_layouts):
    common = {"task": "zeroshot_classification", "templates": DIGIT_TEMPLATES}
    named = {**common, "classnames": DIGIT_NAMES}
    datasets = [
        {"name": "wds", "path": str(digit_layouts["wds"]), **common},  # class names and templates from its files
        {"name": "folder", "path": str(digit_layouts["imagefolder"]), **named},
        {"name": "csv", "path": str(digit_layouts["csv"]), **named},
        {"name": "tsv", "path": str(digit_layouts["tsv"]), "format": "csv", **named},
        {"name": "mnist", "path": str(digit_layouts["torchvision"]), "format": "torchvision",
         "torchvision_class": "MNIST", **named},
    ]
    records = run_suite(suite_config(tmp_path, checkpoint, datasets))
    assert not [r for r in records if r.get("error")]
    got = by_key(records)
    for name in ("folder", "csv", "tsv", "mnist"):
        for metric in ("top1", "top5", "mean_per_class_recall", "recall[seven]"):
            assert got[(name, metric)]["value"] == pytest.approx(got[("wds", metric)]["value"], abs=1e-9), name
        assert got[(name, "top1")]["n_samples"] == 300
    assert got[("wds", "top1")]["chance"] == pytest.approx(0.1)
    assert got[("wds", "top1")]["n_templates"] == 3


def test_wds_templates_file_is_used_when_none_are_given(digit_layouts):
    ds = EvalDatasetConfig(name="d", path=str(digit_layouts["wds"]))
    split = load_split(ds)
    assert split.templates == DIGIT_TEMPLATES and split.classnames == DIGIT_NAMES
    assert len(split.refs) == 300 and split.labels[:5] == [0, 1, 2, 3, 4]


def test_imagefolder_names_come_from_folders(tmp_path):
    images, labels = digits(size=16, n=20)
    root = tmp_path / "tree"
    for i, (im, y) in enumerate(zip(images, labels)):
        name = "even_number" if y % 2 == 0 else "odd_number"
        (root / "val" / name).mkdir(parents=True, exist_ok=True)
        im.save(root / "val" / name / f"{i}.png")
    split = load_split(EvalDatasetConfig(name="t", path=str(root), split="val", format="imagefolder"))
    assert split.classnames == ["even number", "odd number"]
    expected = {f"{i}.png": 0 if y % 2 == 0 else 1 for i, y in enumerate(labels)}
    assert split.labels == [expected[Path(ref).name] for ref in split.refs] and len(split.refs) == 20


def test_csv_text_labels_become_class_names(tmp_path):
    images, labels = digits(size=16, n=12)
    path = write_csv(tmp_path / "l.csv", images, [DIGIT_NAMES[y] for y in labels])
    split = load_split(EvalDatasetConfig(name="c", path=str(path)))
    assert split.classnames == sorted({DIGIT_NAMES[y] for y in labels})
    assert [split.classnames[i] for i in split.labels] == [DIGIT_NAMES[y] for y in labels]


def test_csv_captions_group_by_image(tmp_path):
    images, _ = digits(size=16, n=2)
    for i, im in enumerate(images):
        im.save(tmp_path / f"{i}.png")
    (tmp_path / "caps.tsv").write_text("path\tcaption\n0.png\ta zero\n1.png\ta one\n0.png\tnought\n1.png\t \n")
    split = load_split(EvalDatasetConfig(name="r", task="retrieval", path=str(tmp_path / "caps.tsv")))
    assert split.captions == [["a zero", "nought"], ["a one"]]


def test_shards_labels_and_captions(tmp_path):
    folder = make_shard_folder(tmp_path / "shards", n_shards=2, per_shard=5, seed=3, captions_per_image=2)
    ds = EvalDatasetConfig(name="s", path=str(folder), label_field="count", classnames=["one", "two", "three"],
                           label_values=["1", "2", "3"])
    split = load_split(ds)
    counts = [json.loads(m["json"])["count"] for m in _metas(folder)]
    assert split.labels == [c - 1 for c in counts]
    retrieval = load_split(EvalDatasetConfig(name="r", task="retrieval", path=str(folder)))
    assert all(len(c) == 2 for c in retrieval.captions) and len(retrieval.captions) == 10


def _metas(folder: Path) -> list[dict]:
    out = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [{"json": tar.extractfile(m).read()} for m in tar if m.name.endswith(".json")]
    return out


# -- bad input ---------------------------------------------------------------------------------------------------


def test_blank_lines_are_ignored_with_a_warning(tmp_path, caplog):
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n\n  \nthe {c}.\n\n")
    with caplog.at_level(logging.WARNING):
        assert read_templates(tmp_path / "t.txt") == ["a photo of a {c}.", "the {c}."]
    assert "blank line" in caplog.text
    # A blank class line keeps its position, so .cls indices after it still point at the right class.
    images, _ = digits(size=16, n=4)
    root = write_clip_benchmark_wds(tmp_path / "wds", [(im, "cls", str(y).encode()) for im, y in
                                                      zip(images, [0, 1, 2, 3])], n_shards=1)
    (root / "classnames.txt").write_text("cat\n\ndog\nbird\n\n")
    assert read_classnames(root / "classnames.txt") == ["cat", "", "dog", "bird"]
    with caplog.at_level(logging.WARNING):
        split = load_split(EvalDatasetConfig(name="b", path=str(root)))
    assert split.classnames == ["cat", "dog", "bird"] and split.labels == [0, -1, 1, 2]
    assert split.skipped["label_of_blank_class"] == 1 and "blank class name" in caplog.text


def test_missing_class_names(tmp_path, digit_layouts):
    images, labels = digits(size=16, n=6)
    root = write_clip_benchmark_wds(tmp_path / "w", [(im, "cls", str(y).encode()) for im, y in zip(images, labels)],
                                    n_shards=1)
    with pytest.raises(UsageError, match="no class names: set classnames or classnames_file.*classnames.txt"):
        load_split(EvalDatasetConfig(name="w", path=str(root)))
    with pytest.raises(UsageError, match="classnames file 'nope' not found.*imagenet"):
        load_split(EvalDatasetConfig(name="w", path=str(root), classnames_file="nope"))
    # a shipped list by bare name
    split = load_split(EvalDatasetConfig(name="w", path=str(root), classnames_file="mnist"))
    assert split.classnames == [str(i) for i in range(10)]
    csv = write_csv(tmp_path / "c.csv", images, labels)
    with pytest.raises(UsageError, match="no class names"):
        load_split(EvalDatasetConfig(name="c", path=str(csv)))


def test_template_file_without_placeholder(tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a {c}.\na photo of a dog.\n")
    with pytest.raises(UsageError, match=r"1 template\(s\) lack '\{c\}'.*'a photo of a dog.'"):
        read_templates(tmp_path / "t.txt")


def test_format_errors_name_the_fix(tmp_path):
    with pytest.raises(UsageError, match="does not exist.*nothing is downloaded"):
        load_split(EvalDatasetConfig(name="x", path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="empty is empty"):
        load_split(EvalDatasetConfig(name="x", path=str(tmp_path / "empty")))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.md").write_text("x")
    with pytest.raises(UsageError, match="cannot tell the format.*set format.*flickr, coco_captions"):
        load_split(EvalDatasetConfig(name="x", path=str(tmp_path / "odd")))
    with pytest.raises(UsageError, match="could not open it.*nothing is downloaded"):
        load_split(EvalDatasetConfig(name="x", path=str(tmp_path / "empty"), format="torchvision",
                                     torchvision_class="MNIST", classnames=["a", "b"]))
    (tmp_path / "a.csv").write_text("file,y\nx.png,1\n")
    with pytest.raises(UsageError, match=r"no column 'path'; set image_field to one of its columns \['file', 'y'\]"):
        load_split(EvalDatasetConfig(name="x", path=str(tmp_path / "a.csv"), classnames=["a", "b"]))
    with pytest.raises(UsageError, match="no column 'label'; set label_field"):
        load_split(EvalDatasetConfig(name="x", path=str(tmp_path / "a.csv"), image_field="file",
                                     classnames=["a", "b"]))
    with pytest.raises(UsageError, match="retrieval needs captions"):
        load_split(EvalDatasetConfig(name="x", task="retrieval", path=str(tmp_path / "empty"),
                                     format="imagefolder"))


@pytest.mark.fault
def test_bad_datasets_get_error_records_and_the_suite_goes_on(tmp_path, checkpoint, digit_layouts, fault_row):
    images, labels = digits(n=8)
    broken = tmp_path / "broken"
    write_csv(broken / "d.csv", images, labels)
    (broken / "images" / "00003.png").write_bytes(b"not a png")  # one unreadable image
    (tmp_path / "bad_templates.txt").write_text("{c}\nno placeholder\n")
    nocls = write_clip_benchmark_wds(tmp_path / "nocls", [(im, "cls", str(y).encode()) for im, y in
                                                          zip(images, labels)], n_shards=1)
    datasets = [
        {"name": "unreadable-one", "path": str(broken / "d.csv"), "classnames": DIGIT_NAMES,
         "templates": DIGIT_TEMPLATES},
        {"name": "no-classnames", "path": str(nocls)},
        {"name": "bad-templates", "path": str(digit_layouts["wds"]), "templates_file": str(tmp_path /
                                                                                          "bad_templates.txt")},
        {"name": "good", "path": str(digit_layouts["wds"])},
    ]
    records = run_suite(suite_config(tmp_path, checkpoint, datasets))
    got = by_key(records)
    assert got[("unreadable-one", "top1")]["n_samples"] == 7 and got[("unreadable-one", "top1")]["skipped"] == 1
    assert "no class names" in got[("no-classnames", "error")]["error"]
    assert "lack '{c}'" in got[("bad-templates", "error")]["error"]
    assert 0 <= got[("good", "top1")]["value"] <= 1
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| no-classnames | zeroshot_classification | error |" in md
    no_classes = got[("no-classnames", "error")]["error"]
    fault_row(area="eval", fault="one suite: an unreadable image, a dataset without class names, a template "
                                 "without {c}, and a good dataset",
              happened=f"unreadable-one scored {got[('unreadable-one', 'top1')]['n_samples']} images with "
                       f"{got[('unreadable-one', 'top1')]['skipped']} skipped; error records for no-classnames "
                       f"(\"{no_classes[no_classes.index('no class names'):][:80]}...\") and bad-templates; good: "
                       f"top1 {got[('good', 'top1')]['value']:.3f}",
              lost="only the unusable datasets' scores; the others finished")
