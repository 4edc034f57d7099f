"""The contrastive family's newer members: SLIP (SimCLR views, projection head, NT-Xent gathered across ranks)
and LoRA through peft (adapters only train, merged weights load in plain open_clip, exact resume)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from clipline.config import load_config
from clipline.dist import DistEnv
from clipline.errors import UsageError
from training.augment import CropSpec, Normalizer, SimCLRViewsDecoder, decode_random_crop
from training.data import Batch
from training.objectives import nt_xent_loss
from training.trainer import Trainer

from conftest import REPO, TINY_VIT, batches_for, make_samples

DEMO = str(REPO / "configs" / "demo.yaml")
TINY = str(REPO / "configs" / "test-tiny.yaml")
LORA = ("model.lora_image=true", "model.lora_text=true", "model.lora_rank=4")


@pytest.fixture(scope="module")
def vit_json(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny-vit-family.json"
    path.write_text(json.dumps(TINY_VIT))
    return str(path)


def make_trainer(out, shards, vit_json, *overrides, env=None, resume="never") -> Trainer:
    cfg = load_config([DEMO, TINY], [f"run.output_dir={out}", f"train.data={shards}", f"model.name={vit_json}",
                                     "train.precision=fp32", f"train.resume={resume}", "train.workers=0",
                                     "train.log_every=100", *overrides])
    return Trainer(cfg, env or DistEnv(0, 1, 0, torch.device("cpu")))


def view_batches(trainer: Trainer, samples: list[dict], size: int) -> list[Batch]:
    """uint8 (B, 3, S, S, 3) batches as the SLIP decoder makes them, with fixed per-sample randomness."""
    decode = SimCLRViewsDecoder(CropSpec(TINY_VIT["vision_cfg"]["image_size"]))
    out = []
    for i in range(0, len(samples), size):
        chunk = samples[i:i + size]
        images = torch.stack([decode(s["jpg"], random.Random(f"view-{i + j}")) for j, s in enumerate(chunk)])
        out.append(Batch(images, trainer.bundle.tokenizer([s["txt"] for s in chunk]), 0, 0))
    return out


def parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# --- NT-Xent across ranks ------------------------------------------------------------------------------------

N_IMAGES, D_IN, D_OUT, TAU = 12, 6, 5, 0.1


class ViewEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.encoder = torch.nn.Linear(D_IN, D_OUT)

    def forward(self, a, b):
        return self.encoder(a), self.encoder(b)


def view_inputs():
    g = torch.Generator().manual_seed(4)
    return torch.randn(N_IMAGES, D_IN, generator=g), torch.randn(N_IMAGES, D_IN, generator=g)


def _nt_xent_worker(rank, world, init_file, gather, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = DistributedDataParallel(ViewEncoder())
        a, b = view_inputs()
        local = slice(rank * N_IMAGES // world, (rank + 1) * N_IMAGES // world)
        loss = nt_xent_loss(*model(a[local], b[local]), TAU, gather=gather)
        loss.backward()  # DDP averages the gradients over ranks
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        results[rank] = (float(mean) / world, {n: p.grad.clone() for n, p in model.module.named_parameters()})
    finally:
        dist.destroy_process_group()


def _run_nt_xent(init_file, gather: bool) -> dict:
    results = mp.Manager().dict()
    mp.spawn(_nt_xent_worker, args=(2, str(init_file), gather, results), nprocs=2, join=True)
    return dict(results)


def test_nt_xent_across_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    model = ViewEncoder()
    ref = nt_xent_loss(*model(*view_inputs()), TAU)
    ref.backward()
    ref = ref.item()
    results = _run_nt_xent(tmp_path / "init-gathered", gather=True)
    for rank in (0, 1):
        loss, grads = results[rank]
        assert loss == pytest.approx(ref, rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")
    # Guard: each rank's views only against its own (no gather) is a different loss with different gradients.
    local_loss, local_grads = _run_nt_xent(tmp_path / "init-local", gather=False)[0]
    assert local_loss != pytest.approx(ref, rel=1e-3)
    assert not torch.allclose(local_grads["encoder.weight"], model.encoder.weight.grad, rtol=1e-3)


# --- The SimCLR views ----------------------------------------------------------------------------------------

def test_views_decoder_gives_the_clip_crop_and_two_distorted_views():
    data, spec = make_samples(1, seed=5, image_size=64)[0]["jpg"], CropSpec(48)
    decode = SimCLRViewsDecoder(spec)
    out = decode(data, random.Random("s"))
    assert out.shape == (3, 48, 48, 3) and out.dtype == torch.uint8
    assert torch.equal(out, decode(data, random.Random("s")))  # a function of the per-sample rng alone
    assert not torch.equal(out, decode(data, random.Random("t")))
    # The CLIP crop is drawn first and left undistorted: the plain decoder's crop for the same rng.
    assert torch.equal(out[0], decode_random_crop(data, spec, random.Random("s")))
    assert not torch.equal(out[1], out[2])


def colourful_jpeg(size: int = 64) -> bytes:
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size
    pixels = np.stack([xx, yy, 1 - (xx + yy) / 2], -1) * 255
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_view_distortions_come_at_simclrs_rates():
    """Grey-scale with p = 0.2 and a horizontal flip with p = 0.5, counted over many views of an image whose
    red channel grows left to right."""
    decode = SimCLRViewsDecoder(CropSpec(64))
    views = [v.float() for i in range(200) for v in decode(colourful_jpeg(), random.Random(i))[1:]]
    grey = [bool((v[..., 0] == v[..., 1]).all() and (v[..., 1] == v[..., 2]).all()) for v in views]
    assert 0.13 < np.mean(grey) < 0.27, np.mean(grey)
    # In colour views the red channel still rises left to right unless flipped (colour jitter keeps the order
    # of one channel's values, up to the hue shift's wrap-around, which the margin absorbs).
    flipped = [float(v[:, -8:, 0].mean() - v[:, :8, 0].mean()) < 0 for v, g in zip(views, grey) if not g]
    assert 0.38 < np.mean(flipped) < 0.62, np.mean(flipped)


def test_normalizer_keeps_the_view_axis():
    images = torch.randint(0, 256, (4, 3, 8, 8, 3), dtype=torch.uint8)
    norm = Normalizer(None, None, torch.device("cpu"))
    out = norm(images)
    assert out.shape == (4, 3, 3, 8, 8)
    for v in range(3):
        torch.testing.assert_close(out[:, v], norm(images[:, v].contiguous()))


# --- SLIP in the trainer -------------------------------------------------------------------------------------

def test_slip_trains_the_head_and_keeps_it_out_of_the_open_clip_folder(tmp_path, tiny_shards, vit_json):
    import open_clip

    trainer = make_trainer(tmp_path, tiny_shards, vit_json, "train.simclr_weight=1.0")
    head = trainer.net.head
    assert [m.out_features for m in head if isinstance(m, torch.nn.Linear)] == [8 * 32, 8 * 32, 16]
    assert {id(p) for p in head.parameters()} <= {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    before = parameters(head)
    loss = trainer.train_step(view_batches(trainer, make_samples(16, seed=8), 16))
    assert torch.isfinite(loss)
    assert all(not torch.equal(before[n], p) for n, p in head.named_parameters())
    trainer.save()
    folder = tmp_path / "train" / "checkpoints" / "step_00000000"
    saved = load_file(str(folder / "open_clip_model.safetensors"))
    assert saved.keys() == trainer.model.state_dict().keys()  # plain open_clip names only, no head
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    assert set(model.state_dict()) == set(saved)
    state = torch.load(folder / "train_state.pt", weights_only=True)
    assert all(torch.equal(state["simclr_head"][k], v) for k, v in head.state_dict().items())


def test_slip_loss_is_clip_plus_weighted_nt_xent(tmp_path, tiny_shards, vit_json):
    trainer = make_trainer(tmp_path, tiny_shards, vit_json, "train.simclr_weight=0.5", "train.simclr_temperature=0.2")
    batch = view_batches(trainer, make_samples(8, seed=9), 8)[0]
    image_f, text_f, views = trainer._features(batch)
    assert views.shape == (8, 2, 16)
    expected = trainer._image_text_loss(image_f, text_f) + 0.5 * nt_xent_loss(views[:, 0], views[:, 1], 0.2)
    assert trainer._loss(image_f, text_f, views).item() == pytest.approx(expected.item(), rel=1e-6)


def test_slip_with_accumulation_equals_one_big_batch(tmp_path, tiny_shards, vit_json):
    samples = make_samples(32, seed=11)
    whole = make_trainer(tmp_path / "a", tiny_shards, vit_json, "train.simclr_weight=1.0")
    accum = make_trainer(tmp_path / "b", tiny_shards, vit_json, "train.simclr_weight=1.0", "train.accum_steps=4")
    loss_whole = whole.forward_backward(view_batches(whole, samples, 32))
    loss_accum = accum.forward_backward(view_batches(accum, samples, 8))
    assert float(loss_accum) == pytest.approx(float(loss_whole), rel=1e-5)
    g_whole = {n: p.grad for n, p in whole.net.named_parameters() if p.grad is not None}
    g_accum = {n: p.grad for n, p in accum.net.named_parameters() if p.grad is not None}
    assert g_whole.keys() == g_accum.keys() and "head.0.weight" in g_whole
    for name in g_whole:
        torch.testing.assert_close(g_accum[name], g_whole[name], rtol=1e-4, atol=1e-6, msg=name)


def _train_in_process(out, shards, vit_json, steps, *opts):
    trainer = make_trainer(out, shards, vit_json, f"train.steps={steps}", "train.save_every=3", "train.keep_last=5",
                           "train.global_batch_size=16",
                           *opts, resume="auto")
    assert trainer.train()
    return out / "train" / "checkpoints" / f"step_{steps:08d}"


def _same_checkpoint(a, b) -> None:
    wa, wb = load_file(str(a / "open_clip_model.safetensors")), load_file(str(b / "open_clip_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(p / "train_state.pt", weights_only=True) for p in (a, b))
    for key in ("simclr_head", "lora", "momentum_model"):
        assert (key in sa) == (key in sb)
        if key in sa:
            assert all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key]), key


@pytest.mark.parametrize("opts", [("train.simclr_weight=1.0",),
                                  ("train.simclr_weight=1.0", "train.queue_size=48", "train.distill_alpha=0.4",
                                   "train.momentum=0.9")], ids=["slip", "slip+queue+distill"])
def test_slip_resume_is_exact(tmp_path, tiny_shards, vit_json, opts):
    straight = _train_in_process(tmp_path / "a", tiny_shards, vit_json, 6, *opts)
    _train_in_process(tmp_path / "b", tiny_shards, vit_json, 3, *opts)
    resumed = _train_in_process(tmp_path / "b", tiny_shards, vit_json, 6, *opts)
    _same_checkpoint(straight, resumed)


def test_slip_synthetic_data_has_views(tmp_path, vit_json):
    trainer = make_trainer(tmp_path, "synthetic", vit_json, "train.simclr_weight=1.0")
    batch = next(iter(trainer._loader()))
    assert batch.images.shape == (32, 3, 32, 32, 3)


# --- LoRA --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("towers", [("image", "text"), ("text",)])
def test_lora_trains_only_the_adapters(tmp_path, tiny_shards, vit_json, towers):
    trainer = make_trainer(tmp_path, tiny_shards, vit_json, *(f"model.lora_{t}=true" for t in towers),
                           "model.lora_rank=4")
    model = trainer.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    is_image = lambda n: n.startswith("visual.")
    for name in trainable - {"logit_scale"}:  # the logit scale follows the lock options: it trains
        in_lora_tower = "image" in towers if is_image(name) else "text" in towers
        assert "lora_" in name or not in_lora_tower, name
    before = parameters(model)
    for batch in batches_for(trainer, make_samples(32, seed=12), 16):
        trainer.train_step([batch])
    after = parameters(model)
    for name in before:
        lora_tower = ("image" in towers) if is_image(name) else ("text" in towers)
        changed = not torch.equal(before[name], after[name])
        if "lora_B" in name or name == "logit_scale" or not lora_tower:
            assert changed, f"{name} did not train"
        elif "lora_A" not in name:
            assert not changed, f"frozen base weight {name} changed"
    assert any("attn.lora_A" in n for n in trainable)  # attention q/k/v are adapted


RN_JSON = str(REPO / "configs" / "models" / "clipline-tiny-rn.json")


@pytest.mark.parametrize("model, targets", [("vit", None), ("rn", "[mlp.c_fc,in_proj_weight,conv2]")])
def test_lora_checkpoint_holds_merged_open_clip_weights(tmp_path, tiny_shards, vit_json, model, targets):
    import open_clip

    from clipline.models import create_model

    model_json = vit_json if model == "vit" else RN_JSON
    trainer = make_trainer(tmp_path, tiny_shards, vit_json, *LORA, f"model.name={model_json}",
                           *([f"model.lora_targets={targets}"] if targets else []))
    for batch in batches_for(trainer, make_samples(32, seed=13), 16):
        trainer.train_step([batch])
    trainer.step = 2
    trainer.save()
    folder = tmp_path / "train" / "checkpoints" / "step_00000002"
    saved = load_file(str(folder / "open_clip_model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in saved)

    batch = batches_for(trainer, make_samples(4, seed=14), 4, normalized=True)[0]  # fed to the models directly
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.model(image=batch.images, text=batch.texts)
    open_clip.add_model_config(model_json)
    by_file, _, _ = open_clip.create_model_and_transforms(Path(model_json).stem,
                                                          pretrained=str(folder / "open_clip_model.safetensors"))
    by_folder, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    cfg = load_config([DEMO], [f"model.name={model_json}", f"model.pretrained={folder}"]).model
    fine_tune = create_model(cfg).model  # model.pretrained=<checkpoint folder>, no peft involved
    for plain in (by_file, by_folder, fine_tune):
        plain.eval()
        with torch.no_grad():
            image, text = plain.encode_image(batch.images, normalize=True), plain.encode_text(batch.texts,
                                                                                                normalize=True)
        torch.testing.assert_close(image, ours["image_features"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(text, ours["text_features"], rtol=1e-5, atol=1e-5)
    # The adapters moved the weights of both towers: the merged file is not the base model.
    base = {k.replace(".base_layer", ""): v for k, v in trainer.model.state_dict().items() if "lora_" not in k}
    moved = [k for k in saved if not torch.equal(base[k], saved[k])]
    assert any(k.startswith("visual.") for k in moved) and any(k.startswith("transformer.") for k in moved)


def test_lora_resume_is_exact(tmp_path, tiny_shards, vit_json):
    straight = _train_in_process(tmp_path / "a", tiny_shards, vit_json, 6, *LORA)
    _train_in_process(tmp_path / "b", tiny_shards, vit_json, 3, *LORA)
    resumed = _train_in_process(tmp_path / "b", tiny_shards, vit_json, 6, *LORA)
    _same_checkpoint(straight, resumed)
    state = torch.load(resumed / "train_state.pt", weights_only=True)
    assert any("lora_B" in k for k in state["lora"]) and any(".base_layer." in k for k in state["lora"])


@pytest.mark.fault
def test_resume_with_other_family_settings_is_refused(tmp_path, tiny_shards, vit_json, fault_row):
    _train_in_process(tmp_path, tiny_shards, vit_json, 3)
    with pytest.raises(UsageError, match="trained without model.lora_image / model.lora_text") as lora:
        make_trainer(tmp_path, tiny_shards, vit_json, *LORA, resume="auto")
    with pytest.raises(UsageError, match="trained without train.simclr_weight"):
        make_trainer(tmp_path, tiny_shards, vit_json, "train.simclr_weight=1", resume="auto")
    fault_row(area="training", fault="resume of a plain checkpoint with LoRA or SLIP turned on",
              happened=f"UsageError before any step: {str(lora.value)[:110]}...",
              lost="nothing: the checkpoint is untouched")


@pytest.mark.parametrize("model, targets, message", [
    ("vit", "[out_proj]", "no adapter that trains .* never called"),  # nn.MultiheadAttention reads its weight
    ("vit", "[attn]", "an nn.MultiheadAttention"),  # peft's merge/unmerge adapter moves the frozen weights
    ("vit", "[nothing_here]", "no adapter that trains"),
    ("vit", "[ln_1]", "is not supported"),
    ("rn", "[c_fc,c_proj,in_proj_weight]", r"attnpool.c_proj'\] are never called.*layer1.0.conv1"),
])
def test_lora_targets_that_cannot_train_are_refused(tmp_path, tiny_shards, vit_json, model, targets, message):
    tower = "text" if model == "vit" else "image"
    with pytest.raises(UsageError, match=message):
        make_trainer(tmp_path, tiny_shards, vit_json, f"model.lora_{tower}=true", f"model.lora_targets={targets}",
                     *([f"model.name={RN_JSON}"] if model == "rn" else []))


def test_lora_skips_layers_whose_forward_never_runs(tmp_path, tiny_shards, vit_json, caplog):
    trainer = make_trainer(tmp_path, tiny_shards, vit_json, "model.lora_text=true", "model.lora_targets=[c_fc,out_proj]")
    assert "resblocks.0.attn.out_proj" in caplog.text and "never calls them" in caplog.text
    adapted = {n.rpartition(".lora_")[0] for n, _ in trainer.model.named_parameters() if "lora_A" in n}
    assert adapted == {"transformer.resblocks.0.mlp.c_fc"}


def test_lora_dropout_with_parameter_targets_is_refused(tmp_path, tiny_shards, vit_json):
    with pytest.raises(UsageError, match="lora_dropout"):
        make_trainer(tmp_path, tiny_shards, vit_json, "model.lora_text=true", "model.lora_dropout=0.1")
    trainer = make_trainer(tmp_path, tiny_shards, vit_json, "model.lora_text=true", "model.lora_dropout=0.1",
                           "model.lora_targets=[c_fc,c_proj]")
    assert any("lora_A" in n for n, _ in trainer.model.named_parameters())
