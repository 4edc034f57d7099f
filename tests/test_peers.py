"""clipline beside its peers in one venv: open_clip_train's training loader (open_clip_torch[training], which caps
webdataset at 0.2.86) and CLIP_benchmark's wds reader both run on shards written the way clipline writes them, and
clipline's own training stream and eval reader give the same shapes and counts on the same files."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pytest
import torch

from clipline.config import EvalDatasetConfig, ModelConfig
from clipline.models import create_model
from conftest import TINY_MODEL, make_samples
from eval.datasets import load_split
from test_eval_datasets import write_clip_benchmark_wds
from training.augment import pil_decoder
from training.data import ShardStream, make_loader

webdataset = pytest.importorskip("webdataset", reason="webdataset comes with img2dataset, a clipline dependency")
OPEN_CLIP_TRAIN_CAP = (0, 2, 86)
"""open_clip_train 3.3.0 raises KeyError: 'fname' on later webdataset versions (its issue #935)."""

BATCH = 16


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:3])


@pytest.fixture(scope="module")
def bundle():
    return create_model(ModelConfig(name=str(TINY_MODEL)), device=torch.device("cpu"))


def _image_shape(bundle) -> tuple[int, int, int]:
    size = bundle.model.visual.image_size
    return (3, *size) if isinstance(size, (tuple, list)) else (3, size, size)


def test_the_venv_has_a_webdataset_every_peer_accepts():
    # pyproject's range (>=0.2.86,<=0.2.111) and the test extra's open_clip_torch[training] leave exactly 0.2.86
    assert (0, 2, 86) <= _version(webdataset.__version__) <= (0, 2, 111)


def test_clipline_training_stream_on_our_shards(tiny_shards, bundle):
    shards = sorted(str(p) for p in tiny_shards.glob("*.tar"))
    stream = ShardStream(shards, batch_size=BATCH, rank=0, world_size=1, seed=0, shuffle_buffer=32,
                         decode=pil_decoder(bundle.preprocess_train), tokenizer=bundle.tokenizer, n_streams=1)
    batches = iter(make_loader(stream, workers=0))
    context = bundle.model_cfg["text_cfg"]["context_length"]
    for _ in range(4 * 48 // BATCH):  # one pass over the 4 x 48 samples
        batch = next(batches)
        assert batch.images.shape == (BATCH, *_image_shape(bundle)) and batch.texts.shape == (BATCH, context)


def test_open_clip_train_loader_on_our_shards(tiny_shards, bundle):
    if _version(webdataset.__version__) > OPEN_CLIP_TRAIN_CAP:
        pytest.skip(f"webdataset {webdataset.__version__} is installed; open_clip_train 3.3.0 needs <= 0.2.86 "
                    f"(pip install 'open_clip_torch[training]==3.3.0', in the test extra)")
    from open_clip_train.data import get_wds_dataset

    n = len(list(tiny_shards.glob("*.tar")))
    # The args open_clip_train's main() would pass; no --train-num-samples: it reads the sizes.json beside the shards
    args = argparse.Namespace(train_data=str(tiny_shards / f"{{00000..{n - 1:05d}}}.tar"), val_data=None,
                              train_num_samples=None, val_num_samples=None, dataset_resampled=False,
                              train_data_upsampling_factors=None, seed=0, batch_size=BATCH, workers=1, world_size=1)
    random.seed(0)
    info = get_wds_dataset(args, bundle.preprocess_train, is_train=True, epoch=0, tokenizer=bundle.tokenizer)
    assert info.dataloader.num_samples == 4 * 48 and info.dataloader.num_batches == 4 * 48 // BATCH
    batches = list(info.dataloader)
    assert len(batches) == 4 * 48 // BATCH
    context = bundle.model_cfg["text_cfg"]["context_length"]
    for images, texts in batches:
        assert images.shape == (BATCH, *_image_shape(bundle)) and texts.shape == (BATCH, context)


@pytest.fixture(scope="module")
def benchmark_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("peer_wds")
    samples = make_samples(30, seed=9, captions_per_image=2)
    colours = sorted({s["json"]["colour"] for s in samples})
    write_clip_benchmark_wds(root / "colour", [(("jpg", s["jpg"]), "cls", str(colours.index(s["json"]["colour"]))
                                                .encode()) for s in samples],
                             classnames=colours, templates=["a {c} shape."])
    write_clip_benchmark_wds(root / "captions", [(("jpg", s["jpg"]), "txt", s["txt"].encode()) for s in samples],
                             retrieval=True)
    return root, samples, colours


def test_clip_benchmark_reads_the_wds_sets_clipline_reads(benchmark_sets, bundle):
    pytest.importorskip("clip_benchmark", reason="clip-benchmark==1.6.2 is in the test extra")
    from clip_benchmark.datasets.builder import build_wds_dataset

    root, samples, colours = benchmark_sets
    classification = build_wds_dataset("wds/colour", bundle.preprocess_val, split="test", data_dir=str(root / "colour"))
    assert classification.classes == colours and classification.templates == ["a {c} shape."]
    theirs = list(classification)
    assert len(theirs) == len(samples)
    assert all(img.shape == _image_shape(bundle) for img, _ in theirs)
    ours = load_split(EvalDatasetConfig(name="colour", task="zeroshot_classification", path=str(root / "colour")))
    assert sorted(int(y) for _, y in theirs) == sorted(ours.labels)
    assert ours.classnames == colours

    retrieval = build_wds_dataset("wds/captions", bundle.preprocess_val, split="test", data_dir=str(root / "captions"))
    theirs = list(retrieval)
    assert len(theirs) == len(samples) and all(len(caps) == 2 for _, caps in theirs)
    ours = load_split(EvalDatasetConfig(name="captions", task="retrieval", path=str(root / "captions")))
    assert sorted(map(tuple, ours.captions)) == sorted(tuple(caps) for _, caps in theirs)
