"""What CLIP_benchmark users have on disk for retrieval (Flickr and COCO annotation files beside an images folder),
CSV captions with commas, and the errors a user needs for bad input: too few class names, an empty folder, a
truncated weights file, an open_clip_train checkpoint given as train.resume.

Parity of the retrieval numbers with CLIP_benchmark itself is in test_eval_parity.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from clipline.checkpoint import resolve_checkpoint
from clipline.cli import main as cli_main
from clipline.config import EvalDatasetConfig, ModelConfig
from clipline.errors import UsageError
from clipline.models import create_model
from conftest import REPO, TINY_MODEL
from eval.checkpoints import Checkpoint, load_model
from eval.datasets import detect_format, load_split
from test_eval_datasets import digits, random_checkpoint, write_clip_benchmark_wds

CAPTIONS = {  # image -> captions, some with commas (Flickr's captions have them, unquoted)
    "1000092795.jpg": ["Two young guys, with shaggy hair, look at their hands .", "Two friends enjoy time spent."],
    "10002456.jpg": ["Several men in hard hats are operating a giant pulley system ."],
    "1000268201.jpg": ["A child in a pink dress, climbing stairs .", "A girl going into a wooden building .",
                       "A little girl climbing into a wooden playhouse ."],
}


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "flickr30k_images"
    folder.mkdir()
    for im, name in zip(digits(size=16, n=len(CAPTIONS))[0], CAPTIONS):
        im.save(folder / name)
    return folder


def _expected(refs, captions):
    return {Path(r).name: c for r, c in zip(refs, captions)}


def write_flickr_txt(path: Path, captions: dict[str, list[str]]) -> Path:
    """CLIP_benchmark's flickr30k_SPLIT_karpathy.txt / Kaggle's captions.txt: a header, commas left unquoted."""
    path.write_text("image,caption\n" + "".join(f"{im},{c}\n" for im, caps in captions.items() for c in caps))
    return path


def test_flickr_files_in_each_layout(tmp_path, images):
    cb = write_flickr_txt(tmp_path / "flickr30k_test_karpathy.txt", CAPTIONS)
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("".join(f"{im}#{i}\t{c}\n" for im, caps in CAPTIONS.items() for i, c in enumerate(caps)))
    listed = tmp_path / "flickr30k_test.json"
    listed.write_text(json.dumps([{"image": f"flickr30k_images/{im}", "caption": caps}
                                  for im, caps in CAPTIONS.items()]))
    karpathy = tmp_path / "dataset_flickr30k.json"
    karpathy.write_text(json.dumps({"images": [
        {"filename": im, "split": "test", "sentences": [{"raw": c} for c in caps]} for im, caps in CAPTIONS.items()]
        + [{"filename": "not_in_test.jpg", "split": "train", "sentences": [{"raw": "unused"}]}]}))
    for annotations, root in ((cb, images), (token, images), (listed, tmp_path), (karpathy, images)):
        ds = EvalDatasetConfig(name="f", task="retrieval", path=str(root), annotation_file=str(annotations))
        assert detect_format(ds, ds.path, "") == "flickr", annotations.name
        split = load_split(ds)
        assert _expected(split.refs, split.captions) == CAPTIONS, annotations.name
        assert list(_expected(split.refs, split.captions)) == list(CAPTIONS)  # file order, as CLIP_benchmark


def test_flickr_reads_as_clip_benchmark_does(tmp_path, images):
    from clip_benchmark.datasets.flickr import Flickr

    cb = write_flickr_txt(tmp_path / "ann.txt", CAPTIONS)
    theirs = Flickr(root=str(images), ann_file=str(cb)).data
    split = load_split(EvalDatasetConfig(name="f", task="retrieval", path=str(images), annotation_file=str(cb)))
    assert [(Path(r).name, c) for r, c in zip(split.refs, split.captions)] == [(im, c) for im, c in theirs]


def test_clip_benchmark_default_annotation_name_is_found(images):
    # CLIP_benchmark with only --dataset_root reads ROOT/flickr30k_test_karpathy.txt
    write_flickr_txt(images / "flickr30k_test_karpathy.txt", CAPTIONS)
    split = load_split(EvalDatasetConfig(name="f", task="retrieval", path=str(images)))
    assert _expected(split.refs, split.captions) == CAPTIONS


def coco_json(path: Path, captions: dict[str, list[str]], ids: list[int]) -> Path:
    """COCO's captions JSON: images (id, file_name) and annotations (image_id, caption), interleaved."""
    images = [{"id": i, "file_name": name, "height": 16, "width": 16} for i, name in zip(ids, captions)]
    anns = [{"id": 100 * n + k, "image_id": i, "caption": c}
            for k in range(5) for n, (i, caps) in enumerate(zip(ids, captions.values())) if k < len(caps)
            for c in [caps[k]]]
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
    return path


def test_coco_captions_as_torchvision_reads_them(tmp_path):
    from torchvision.datasets import CocoCaptions

    root = tmp_path / "coco"
    names = {f"COCO_val2014_{i:012d}.jpg": caps for i, caps in zip((42, 7, 19), CAPTIONS.values())}
    (root / "val2014").mkdir(parents=True)
    for im, name in zip(digits(size=16, n=3)[0], names):
        im.save(root / "val2014" / name)
    ann = coco_json(root / "coco_test_karpathy.json", names, [42, 7, 19])
    theirs = CocoCaptions(root=str(root / "val2014"), annFile=str(ann))
    expected = [(theirs.coco.loadImgs(i)[0]["file_name"], theirs._load_target(i)) for i in theirs.ids]
    # CLIP_benchmark's mscoco_captions layout: --dataset_root holding val2014/ and coco_test_karpathy.json
    for ds in (EvalDatasetConfig(name="c", task="retrieval", path=str(root)),
               EvalDatasetConfig(name="c", task="retrieval", path=str(root / "val2014"), annotation_file=str(ann),
                                 format="coco_captions")):
        assert detect_format(ds, ds.path, "") == "coco_captions"
        split = load_split(ds)
        assert [(Path(r).name, c) for r, c in zip(split.refs, split.captions)] == expected
        assert [Path(r).name for r in split.refs][0] == "COCO_val2014_000000000007.jpg"  # id order


def test_annotation_file_errors(tmp_path, images):
    cb = write_flickr_txt(tmp_path / "ann.txt", {**CAPTIONS, "99.jpg": ["gone"]})
    with pytest.raises(UsageError, match=r"1 of the 4 images named in .*ann.txt are missing, e\.g\. .*99\.jpg; "
                                         r"set path"):
        load_split(EvalDatasetConfig(name="f", task="retrieval", path=str(images), annotation_file=str(cb)))
    with pytest.raises(UsageError, match="annotation_file .*nope.txt not found"):
        load_split(EvalDatasetConfig(name="f", task="retrieval", path=str(images),
                                     annotation_file=str(tmp_path / "nope.txt")))
    with pytest.raises(UsageError, match="holds captions, not labels; set task: retrieval"):
        load_split(EvalDatasetConfig(name="f", path=str(images), annotation_file=str(cb), classnames=["a", "b"]))
    with pytest.raises(UsageError, match=r"set annotation_file.*flickr30k_test_karpathy\.txt"):
        load_split(EvalDatasetConfig(name="f", task="retrieval", path=str(images), format="flickr"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [{"image_id": 2,
                                                                                             "caption": "c"}]}))
    with pytest.raises(UsageError, match="captions of image_id 2, which its images list lacks"):
        load_split(EvalDatasetConfig(name="c", task="retrieval", path=str(images), annotation_file=str(bad)))


def test_config_rejects_annotation_file_with_other_formats():
    with pytest.raises(UsageError, match="holds captions only; set task: retrieval"):
        EvalDatasetConfig(name="x", path="y", format="flickr").validate()
    with pytest.raises(UsageError, match="annotation_file is read only by the flickr and coco_captions formats"):
        EvalDatasetConfig(name="x", path="y", format="csv", annotation_file="a.txt").validate()


# -- CSV with commas in captions -----------------------------------------------------------------------------------


@pytest.fixture
def csv_images(tmp_path):
    for i, im in enumerate(digits(size=16, n=3)[0]):
        im.save(tmp_path / f"{i}.png")
    return tmp_path


def _csv_captions(path: Path) -> list[list[str]]:
    return load_split(EvalDatasetConfig(name="c", task="retrieval", path=str(path), image_field="image")).captions


def test_csv_captions_with_commas(csv_images):
    unquoted = csv_images / "unquoted.csv"
    unquoted.write_text("image,caption\n0.png,a red, round thing\n1.png,plain\n0.png,two, three, four\n")
    assert _csv_captions(unquoted) == [["a red, round thing", "two, three, four"], ["plain"]]
    quoted = csv_images / "quoted.csv"
    quoted.write_text('image,caption\n0.png,"a red, round thing"\n1.png,"say ""hi"", then"\n')
    assert _csv_captions(quoted) == [["a red, round thing"], ['say "hi", then']]
    tsv = csv_images / "tabs.tsv"
    tsv.write_text("image\tcaption\n0.png\ta red\tround thing\n")
    assert _csv_captions(tsv) == [["a red\tround thing"]]


def test_csv_with_extra_commas_and_more_columns_names_the_line(csv_images):
    path = csv_images / "three.csv"
    path.write_text("image,caption,source\n0.png,fine,web\n1.png,a red, round thing,web\n")
    with pytest.raises(UsageError, match=r"line 3 of .*three.csv has 4 fields for the 3 columns "
                                         r"\['image', 'caption', 'source'\]; put double quotes around a field"):
        _csv_captions(path)
    short = csv_images / "short.csv"
    short.write_text("image,caption,source\n0.png,fine\n")
    with pytest.raises(UsageError, match="line 2 of .*short.csv has 2 fields for the 3 columns"):
        _csv_captions(short)


# -- bad input -----------------------------------------------------------------------------------------------------


def test_clip_benchmark_wds_with_fewer_class_names_than_labels(tmp_path):
    images, labels = digits(size=16, n=20)
    root = write_clip_benchmark_wds(tmp_path / "w", [(im, "cls", str(y).encode()) for im, y in zip(images, labels)],
                                    n_shards=1, classnames=["zero", "one", "two", "three"])
    n_beyond = sum(1 for y in labels if y >= 4)
    with pytest.raises(UsageError, match=rf"4 class names for labels up to 9 \({n_beyond} images have a label >= 4\)"):
        load_split(EvalDatasetConfig(name="w", path=str(root)))


def test_empty_folder_says_it_is_empty(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"empty is empty: set path to the folder"):
        load_split(EvalDatasetConfig(name="x", path=str(tmp_path / "empty")))
    (tmp_path / "data" / "test").mkdir(parents=True)
    (tmp_path / "data" / "README").write_text("x")
    with pytest.raises(UsageError, match=r"data/test is empty"):
        load_split(EvalDatasetConfig(name="x", path=str(tmp_path / "data"), split="test"))


def _truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("m") / "ckpt")


def test_truncated_weights_are_named(tmp_path, model_folder):
    import shutil

    from safetensors.torch import load_file

    folder = Path(shutil.copytree(model_folder, tmp_path / "cut"))
    weights = _truncate(folder / "open_clip_model.safetensors")
    with pytest.raises(UsageError, match=rf"{weights} is truncated or corrupt"):
        load_model(Checkpoint("open_clip_dir", str(folder)), "cpu")
    # an open_clip architecture with a weights file in torch.save's format, cut short
    pt = tmp_path / "w.pt"
    torch.save(load_file(str(model_folder / "open_clip_model.safetensors")), pt)
    load_model(Checkpoint("open_clip_weights", str(pt), str(TINY_MODEL)), "cpu")  # whole: loads
    _truncate(pt)
    with pytest.raises(UsageError, match=rf"weights file {pt} is truncated or corrupt"):
        load_model(Checkpoint("open_clip_weights", str(pt), str(TINY_MODEL)), "cpu")
    # torch's legacy (pickle) format has no header to check: the load's own error is recognised
    legacy = tmp_path / "legacy.pt"
    torch.save(load_file(str(model_folder / "open_clip_model.safetensors")), legacy,
               _use_new_zipfile_serialization=False)
    _truncate(legacy)
    with pytest.raises(UsageError, match=rf"checkpoint .*{legacy}: a weights file is truncated or corrupt"):
        load_model(Checkpoint("open_clip_weights", str(legacy), str(TINY_MODEL)), "cpu")
    # model.pretrained in training
    with pytest.raises(UsageError, match=rf"model.pretrained weights file {weights} is truncated or corrupt"):
        create_model(ModelConfig(name=str(TINY_MODEL), pretrained=str(folder)))
    # through the eval CLI: it fails, and the checkpoint's error record names the file
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"eval": {"checkpoint": str(folder), "output_dir": str(tmp_path / "out"),
                                              "datasets": [{"name": "d", "path": str(tmp_path)}]}}))
    assert cli_main(["eval", str(suite)]) == 1
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert f"{weights} is truncated or corrupt" in json.dumps(record)


def test_resume_from_an_open_clip_train_checkpoint_points_to_pretrained(tmp_path, model_folder, capsys):
    from safetensors.torch import load_file

    state = {f"module.{k}": v for k, v in load_file(str(model_folder / "open_clip_model.safetensors")).items()}
    epoch = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "ViT-B-32-run", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}}, epoch)
    with pytest.raises(UsageError, match=rf"open_clip_train checkpoint \(epoch 3, ViT-B-32-run\).*no data position"
                                         rf".*model.pretrained={epoch}"):
        resolve_checkpoint(epoch)
    code = cli_main(["train", str(REPO / "configs" / "demo.yaml"), "train.data=synthetic", "train.steps=1",
                     f"train.output_dir={tmp_path / 'run'}", f"train.resume={epoch}"])
    err = capsys.readouterr().err
    assert code == 2 and f"model.pretrained={epoch}" in err, err
    # and model.pretrained does start from those weights (open_clip strips the DDP 'module.' prefix)
    bundle = create_model(ModelConfig(name=str(TINY_MODEL), pretrained=str(epoch)))
    first = next(iter(bundle.model.state_dict()))
    assert torch.equal(bundle.model.state_dict()[first], state[f"module.{first}"])
    # a truncated one says so
    _truncate(epoch)
    with pytest.raises(UsageError, match="truncated or corrupt"):
        resolve_checkpoint(epoch)
