"""The millisecond figures quoted in README: per-image decode cost of the training pipeline and the AdamW step.

    .venv/bin/python benchmarks/micro_timings.py [--repeats 200] [--rounds 5] [--threads 2]

Decode (one torch thread, the way a DataLoader worker runs), ms per image:
  crop 224, 320 x 256   training.augment.RandomCropDecoder(CropSpec(224)) on a photo-like 320 x 256 JPEG
  crop + views 224      training.augment.SimCLRViewsDecoder (SLIP: CLIP's crop and two SimCLR views) on the same
  crop 64, demo scene   RandomCropDecoder(CropSpec(64)) on a demo scene (data_prep.demo_scenes) stored at 64 px
  crop + views 64       SimCLRViewsDecoder on the same demo scene
  Each figure: --repeats decodes, timed together, per image; --rounds such rounds, median and every round.
AdamW on the demo model (configs/models/clipline-tiny-rn.json, batch 128, fp32, --threads torch threads), ms:
  step             forward + loss + backward + optimizer step with the fused AdamW (the trainer's)
  foreach / fused  optimizer.step() alone with torch's for-each AdamW (open_clip_train's) and the fused one
  Rounds alternate the two optimizers (A B, B A, ...) on the same gradients; median over --rounds x 5 steps.
Writes benchmarks/results/micro_timings.json with the machine and the load average per round.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _bench import machine, write_result  # noqa: E402


def _jpeg_320x256() -> bytes:
    from input_pipeline import picture

    return picture(np.random.default_rng(0), 320, 256)


def _demo_scene_64() -> bytes:
    from data_prep.demo_scenes import render_scene, sample_scene

    rng = random.Random(0)
    buf = io.BytesIO()
    render_scene(sample_scene(rng), rng, 64).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def decode_timings(repeats: int, rounds: int) -> dict:
    from training.augment import CropSpec, RandomCropDecoder, SimCLRViewsDecoder

    cases = {"crop 224, 320 x 256 JPEG": (RandomCropDecoder(CropSpec(224)), _jpeg_320x256()),
             "crop + 2 SimCLR views 224, 320 x 256 JPEG": (SimCLRViewsDecoder(CropSpec(224)), _jpeg_320x256()),
             "crop 64, demo scene 64 px": (RandomCropDecoder(CropSpec(64)), _demo_scene_64()),
             "crop + 2 SimCLR views 64, demo scene 64 px": (SimCLRViewsDecoder(CropSpec(64)), _demo_scene_64())}
    out = {}
    for name, (decode, data) in cases.items():
        rng = random.Random(0)
        decode(data, rng)  # warm-up
        per_round, loads = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(repeats):
                decode(data, rng)
            per_round.append((time.perf_counter() - t0) / repeats * 1e3)
            loads.append(round(os.getloadavg()[0], 2))
        out[name] = {"ms_median": statistics.median(per_round), "ms_rounds": per_round, "load_average_1min": loads,
                     "jpeg_bytes": len(data)}
        print(f"{name:44s} {statistics.median(per_round):6.2f} ms (rounds {', '.join(f'{x:.2f}' for x in per_round)})",
              flush=True)
    return out


def adamw_timings(rounds: int, batch: int) -> dict:
    from clipline.config import ModelConfig
    from clipline.models import create_model
    from training.loss import contrastive_loss

    torch.manual_seed(0)
    model = create_model(ModelConfig(name=str(REPO / "configs/models/clipline-tiny-rn.json")), device="cpu").model
    images = torch.randn(batch, 3, 64, 64)
    texts = torch.randint(1, 49407, (batch, model.context_length))
    optimizers = {"foreach": torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True),
                  "fused": torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)}

    def step(opt) -> tuple[float, float]:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(image=images, text=texts)
        contrastive_loss(out["image_features"], out["text_features"], model.logit_scale).backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    for opt in optimizers.values():  # warm-up, creates the optimizer states
        step(opt)
    times = {name: {"step": [], "optimizer": []} for name in optimizers}
    loads = []
    for r in range(rounds):
        for name in (list(optimizers) if r % 2 == 0 else list(optimizers)[::-1]):
            for _ in range(5):
                whole, opt_only = step(optimizers[name])
                times[name]["step"].append(whole * 1e3)
                times[name]["optimizer"].append(opt_only * 1e3)
        loads.append(round(os.getloadavg()[0], 2))
    out = {name: {"step_ms_median": statistics.median(t["step"]), "optimizer_ms_median": statistics.median(t["optimizer"]),
                  "step_ms": t["step"], "optimizer_ms": t["optimizer"]} for name, t in times.items()}
    out["load_average_1min_per_round"] = loads
    out["params"] = sum(p.numel() for p in model.parameters())
    for name in optimizers:
        print(f"AdamW {name:8s}: optimizer.step {out[name]['optimizer_ms_median']:6.1f} ms of a "
              f"{out[name]['step_ms_median']:6.1f} ms training step (median of {len(times[name]['step'])})", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200, help="decodes per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128, help="batch of the AdamW training step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for the step (0: torch's default)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/micro_timings.json"))
    args = parser.parse_args()
    result = {"benchmark": "micro_timings", "machine": machine(), "repeats": args.repeats, "rounds": args.rounds}
    torch.set_num_threads(1)
    result["decode_threads"] = 1
    result["decode"] = decode_timings(args.repeats, args.rounds)
    torch.set_num_threads(args.threads or result["machine"]["torch_threads_default"])
    result["step_threads"] = torch.get_num_threads()
    result["adamw"] = adamw_timings(args.rounds, args.batch)
    write_result(args.out, result)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
