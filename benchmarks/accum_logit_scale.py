"""Gradient accumulation against one big batch: OpenCLIP's `--accum-freq k` and clipline's `train.accum_steps: k`.

    .venv/bin/python benchmarks/accum_logit_scale.py [--batch 64] [--accum 2 4 8]

The same model weights (a tiny open_clip ViT, seeded) and the same B samples (random normalised images and token
ids, seeded) go through three paths, fp32, on the CPU, and the gradients are compared:
  reference  one forward + backward of the whole batch: open_clip's model and open_clip.loss.ClipLoss.
  open_clip  open_clip_train.train.train_one_epoch itself with args.accum_freq = k (k micro-batches of B / k);
             the gradients are read where it calls optimizer.step() (a recording stand-in, nothing is updated).
  clipline   training.trainer.Trainer.forward_backward with train.accum_steps = k (synthetic data mode, so no
             shards are needed), the same k micro-batches.
For each k: the logit scale's gradient divided by the reference's (1.0 = correct), and the largest relative
error over the encoder parameters' gradients. OpenCLIP back-propagates the whole loss once per micro-batch, so
the logit scale collects k copies of its full gradient; the encoders' gradients are right because each backward
reaches only its own micro-batch's features.

Writes benchmarks/results/accum_logit_scale.json (with the machine, benchmarks/_bench.py) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _bench import machine, write_result  # noqa: E402

MODEL = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(got: dict, ref: dict) -> dict:
    """The logit scale's gradient over the reference's, and the largest relative error of the other gradients."""
    worst = max(((got[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in ref.items()
                if n != "logit_scale" and n in got)
    missing = sorted(set(ref) - set(got))
    return {"logit_scale_grad_ratio": (got["logit_scale"] / ref["logit_scale"]).item(),
            "max_relative_error_other_params": worst, "missing_grads": missing}


def reference(model, images, texts) -> dict:
    from open_clip.loss import ClipLoss

    model = copy.deepcopy(model)
    out = model(images, texts)
    ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    return grads(model)


class _Recorder:
    """Stands in for the optimizer inside train_one_epoch: keeps the gradients at step(), changes nothing."""

    def __init__(self, model):
        self.model, self.param_groups, self.seen = model, [{"lr": 0.0}], []

    def zero_grad(self, set_to_none: bool = True):
        self.model.zero_grad(set_to_none=set_to_none)

    def step(self):
        self.seen.append(grads(self.model))


class _Loader:
    def __init__(self, batches, batch_size):
        self.batches, self.num_batches, self.num_samples = batches, len(batches), len(batches) * batch_size

    def __iter__(self):
        return iter(self.batches)


def open_clip_accum(model, images, texts, k: int) -> dict:
    from open_clip.loss import ClipLoss
    from open_clip_train.data import DataInfo
    from open_clip_train.params import parse_args
    from open_clip_train.train import train_one_epoch

    model = copy.deepcopy(model)
    micro = images.shape[0] // k
    args = parse_args(["--accum-freq", str(k), "--batch-size", str(micro), "--precision", "fp32",
                       "--log-every-n-steps", "1000000"])
    args.device, args.world_size, args.rank, args.local_rank, args.distributed = "cpu", 1, 0, 0, False
    args.distill, args.skip_scheduler, args.horovod, args.wandb, args.save_logs = False, True, False, False, False
    batches = [(images[i * micro:(i + 1) * micro], texts[i * micro:(i + 1) * micro]) for i in range(k)]
    loader = _Loader(batches, micro)
    optimizer = _Recorder(model)
    train_one_epoch(model, {"train": DataInfo(dataloader=loader)}, ClipLoss(), 0, optimizer, None, None, None, args)
    if len(optimizer.seen) != 1:
        raise RuntimeError(f"expected one optimizer step over {k} micro-batches, saw {len(optimizer.seen)}")
    return optimizer.seen[0]


def clipline_accum(model, images, texts, k: int, model_json: Path, work: Path) -> dict:
    from clipline.config import load_config
    from clipline.dist import DistEnv
    from training.data import Batch
    from training.trainer import Trainer

    cfg = load_config([str(REPO / "configs/demo.yaml")], [
        f"run.output_dir={work}", "train.data=synthetic", f"model.name={model_json}", "train.precision=fp32",
        "train.resume=never", "train.loss=clip", "train.loss_impl=plain", f"train.accum_steps={k}",
        f"train.global_batch_size={images.shape[0]}", "eval.datasets=[]"])
    trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    trainer.model.load_state_dict(model.state_dict())
    trainer.net.train()
    micro = images.shape[0] // k
    batches = [Batch(images=images[i * micro:(i + 1) * micro], texts=texts[i * micro:(i + 1) * micro], stream=0,
                     position=0) for i in range(k)]
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.forward_backward(batches)
    return grads(trainer.model)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--accum", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/accum_logit_scale.json"))
    args = parser.parse_args()
    bad = [k for k in args.accum if k < 2 or args.batch % k]
    if bad:
        parser.error(f"--accum values must be >= 2 and divide --batch {args.batch}; not {bad}")
    import json
    import tempfile

    import open_clip

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_json = Path(tmp) / "accum-tiny-vit.json"
        model_json.write_text(json.dumps(MODEL))
        open_clip.add_model_config(model_json)
        model = open_clip.create_model(model_json.stem, output_dict=True)  # as open_clip_train creates it
        model.train()
        images = torch.randn(args.batch, 3, 32, 32)
        texts = torch.randint(1, 49407, (args.batch, 16))
        ref = reference(model, images, texts)
        rows = []
        for k in args.accum:
            rows.append({"k": k, "micro_batch": args.batch // k, "open_clip": compare(open_clip_accum(
                model, images, texts, k), ref), "clipline": compare(clipline_accum(
                    model, images, texts, k, model_json, Path(tmp) / f"run{k}"), ref)})
    result = {"benchmark": "accum_logit_scale", "machine": machine(), "batch": args.batch, "model": MODEL,
              "reference_logit_scale_grad": ref["logit_scale"].item(), "rows": rows}
    write_result(args.out, result)
    print(f"batch {args.batch}; logit-scale gradient / one big batch's (1.00 = right), largest relative error of "
          "the other gradients\n\n| k | open_clip_train --accum-freq k | clipline accum_steps k |\n|---:|---|---|")
    for r in rows:
        o, c = r["open_clip"], r["clipline"]
        print(f"| {r['k']} | {o['logit_scale_grad_ratio']:.3f}x (others {o['max_relative_error_other_params']:.1e}) "
              f"| {c['logit_scale_grad_ratio']:.3f}x (others {c['max_relative_error_other_params']:.1e}) |")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
