"""fp32 against bf16 autocast for the demo's training step on the CPU, with the CPU's bf16 support named.

    .venv/bin/python benchmarks/bf16_speed.py [--rounds 5] [--steps 5] [--emulate-avx2]

The step is the trainer's: the demo model (configs/models/clipline-tiny-rn.json) at 64 px, batch 128, forward under
torch.autocast("cpu", bfloat16) or none, clipline's contrastive loss in fp32, backward, fused AdamW. Rounds
alternate the order (fp32 bf16, bf16 fp32, ...), --steps timed steps per precision per round after a warm-up
step each; the figure is the median step time and fp32 / bf16 the speed-up (> 1: bf16 is faster).

bf16 is fast only where the CPU computes it natively (avx512_bf16 or amx_bf16, recorded in the JSON). Elsewhere
oneDNN and ATen emulate it, and it can be many times slower than fp32. --emulate-avx2 repeats the measurement in a
child process with ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2, which caps torch's kernels to what an AVX2-only
CPU has, so one machine shows both cases. Writes benchmarks/results/bf16_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _bench import machine, write_result  # noqa: E402

AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"}


def measure(rounds: int, steps: int, batch: int, threads: int) -> dict:
    from clipline.config import ModelConfig
    from clipline.models import create_model
    from training.loss import contrastive_loss

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=str(REPO / "configs/models/clipline-tiny-rn.json")), device="cpu").model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images = torch.randn(batch, 3, 64, 64)
    texts = torch.randint(1, 49407, (batch, model.context_length))

    def step(precision: str) -> float:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(image=images, text=texts)
        contrastive_loss(out["image_features"].float(), out["text_features"].float(), model.logit_scale).backward()
        optimizer.step()
        return time.perf_counter() - t0

    names = ["fp32", "bf16"]
    for name in names:
        step(name)  # warm-up: oneDNN primitive creation
    times = {name: [] for name in names}
    loads = []
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name] += [step(name) * 1e3 for _ in range(steps)]
        loads.append(round(os.getloadavg()[0], 2))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"step_ms_median": med, "step_ms": times, "speedup_fp32_over_bf16": med["fp32"] / med["bf16"],
            "load_average_1min_per_round": loads, "threads": torch.get_num_threads(),
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per precision per round")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--emulate-avx2", action="store_true", help="also measure with kernels capped at AVX2")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/bf16_speed.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.rounds, args.steps, args.batch, args.threads)))
        return 0
    result = {"benchmark": "bf16_speed", "machine": machine(), "batch": args.batch, "rounds": args.rounds,
              "steps_per_round": args.steps, "runs": {}}
    variants = {"native": {}} | ({"avx2_caps": AVX2_CAPS} if args.emulate_avx2 else {})
    for name, caps in variants.items():  # each in a fresh process: the caps are read when torch loads
        cmd = [sys.executable, __file__, "--child", "--rounds", str(args.rounds), "--steps", str(args.steps),
               "--batch", str(args.batch), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, env={**os.environ, **caps}, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"{name} run failed:\n{proc.stderr[-3000:]}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        result["runs"][name] = {"environment": caps, **run}
        med = run["step_ms_median"]
        print(f"{name:10s} (ATen {run['aten_cpu_capability']}, {run['threads']} threads): fp32 {med['fp32']:.0f} ms, "
              f"bf16 {med['bf16']:.0f} ms per step -> bf16 is {run['speedup_fp32_over_bf16']:.2f}x fp32's speed",
              flush=True)
    flags = result["machine"]["cpu_flags"]
    print(f"CPU: {result['machine']['cpu_model']}; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()))
    write_result(args.out, result)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
