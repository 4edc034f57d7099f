"""Peak memory and time of the contrastive loss, forward + backward, against the batch size.

    python benchmarks/loss_memory.py                                        # CPU, B = 1k, 4k, 16k, 64k, embed 512
    python benchmarks/loss_memory.py --device cuda --tile-sizes 1024 2048 4096        # the same on a GPU
    python benchmarks/loss_memory.py --device cuda --matmul-precision high   # TF32 matmuls, for every loss
    python benchmarks/loss_memory.py --plot-only                            # redraw the PNG from the JSON files

Compared in the same run, on the same random L2-normalised fp32 features (which require grad) and the same
scale: ``tiled-<tile>`` (clipline's tiled_contrastive_loss at each of ``--tile-sizes``), ``open_clip``
(open_clip.loss.ClipLoss, the peer) and ``plain`` (clipline's contrastive_loss, which the trainer uses today).
Times and memory cover the loss's forward and backward alone.

Peak memory, from one forward + backward per (loss, batch):
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before the
  call: the features are excluded, their gradients (allocated by the call) are included.
- CPU: each measurement runs in a fresh child process, whose peak resident set (VmHWM, reset through
  /proc/self/clear_refs once the features exist) minus its resident set before the call is the peak; a call at
  B = 64 first keeps one-off costs (BLAS initialisation) out of it. tracemalloc
  does not see torch's allocations and torch keeps no CPU allocator statistics, so the kernel's count is the
  honest one; it includes allocator slack and BLAS work buffers, for every loss alike.
Time: per batch the losses run in alternating order (A B C, C B A, ...) after one warm-up round, so load from
other processes drifts onto all of them alike; the median of each is reported with the number of timed rounds
(and the fastest beside it); fewer rounds than --rounds run where a round would pass --max-seconds. On CPU this happens in one
child process per batch. Sizes whose estimated need exceeds the free memory are skipped, and the output says so.

Writes a table to stdout, JSON (results and ratios) to ``--json`` and a plot of every loss_memory_*.json in
benchmarks/results to ``--plot``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

from clipline.io import atomic_write, atomic_write_json  # noqa: E402

IMPLS = ("tiled", "open_clip", "plain")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--tile-sizes", type=int, nargs="+", default=None,
                   help="tile sizes of the tiled loss, each measured (default: the library's default)")
    p.add_argument("--matmul-precision", default="highest", choices=["highest", "high"],
                   help="fp32 matmul precision for every loss; 'high' allows TF32 on CUDA")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); on a shared machine 1 gives stable per-core timings")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up round")
    p.add_argument("--max-seconds", type=float, default=120.0,
                   help="no further round once a batch's timing has run this long (at least one round runs)")
    p.add_argument("--json", type=Path, default=None,
                   help="default: benchmarks/results/loss_memory_<device>[_tf32].json")
    p.add_argument("--plot", type=Path, default=HERE / "loss_memory.png")
    p.add_argument("--plot-only", action="store_true", help="only redraw --plot from the JSON files")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- the measured losses --------------------------------------------------------------------------------------


def variants(impls: list[str], tile_sizes: list[int]) -> list[str]:
    """Names measured: tiled-<tile> for each tile size, then the peers."""
    return [f"tiled-{t}" for t in tile_sizes if "tiled" in impls] + [i for i in impls if i != "tiled"]


def make_loss(variant: str):
    """A callable (image, text, log_scale) -> loss for each compared implementation."""
    if variant.startswith("tiled-"):
        from training.loss import tiled_contrastive_loss

        tile = int(variant.split("-")[1])
        return lambda i, t, s: tiled_contrastive_loss(i, t, s, tile_size=tile)
    if variant == "plain":
        from training.loss import contrastive_loss

        return contrastive_loss
    from open_clip.loss import ClipLoss

    clip_loss = ClipLoss()
    return lambda i, t, s: clip_loss(i, t, s.exp())


def make_features(batch: int, dim: int, device: str):
    import torch

    g = torch.Generator(device=device).manual_seed(batch)
    feats = []
    for _ in range(2):
        x = torch.randn(batch, dim, generator=g, device=device)
        feats.append(x.div_(x.norm(dim=-1, keepdim=True)).requires_grad_())
    log_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
    return feats[0], feats[1], log_scale


def make_step(variant: str, features):
    loss_fn = make_loss(variant)

    def step():
        for t in features:
            t.grad = None
        loss_fn(*features).backward()
        for t in features:  # the gradients are the step's output: free them with it
            t.grad = None

    return step


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# --- memory: one run per (loss, batch) --------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_bytes(variant: str, batch: int, dim: int, device: str) -> int:
    """Bytes one forward + backward holds at its peak above the features, measured in this process."""
    import torch

    loss_fn = make_loss(variant)
    # One-off costs (BLAS initialisation and its buffers, lazily loaded kernels) stay outside the measurement.
    loss_fn(*make_features(64, dim, device)).backward()
    features = make_features(batch, dim, device)
    # The gradients are kept until the peak is read: they are part of what the call allocates.
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_fn(*features).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    loss_fn(*features).backward()
    return (_status_kib("VmHWM") - base) * 1024


# --- time: alternating rounds ---------------------------------------------------------------------------------


def interleaved_times(names: list[str], batch: int, dim: int, device: str, rounds: int,
                      max_seconds: float) -> dict[str, dict]:
    """{variant: {"time_s", "fastest_s", "times_s", "cold"}}: median (and fastest) of alternating rounds after a
    warm-up round; ``times_s`` holds every timed round."""
    features = make_features(batch, dim, device)
    steps = {name: make_step(name, features) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}

    def run_round(order):
        spent = 0.0
        for name in order:
            synchronize(device)
            t0 = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
            spent += times[name][-1]
        return spent

    warmup = run_round(names)
    cold = warmup > max_seconds  # too slow to repeat: the warm-up round is the measurement
    if not cold:
        for name in names:
            times[name].clear()
        spent = 0.0
        for i in range(rounds):
            if i > 0 and spent + warmup > max_seconds:
                break
            spent += run_round(names if i % 2 == 0 else names[::-1])
    return {name: {"time_s": statistics.median(t), "fastest_s": min(t), "times_s": t, "cold": cold}
            for name, t in times.items()}


# --- orchestration ----------------------------------------------------------------------------------------------


def estimated_need(variant: str, batch: int, dim: int) -> int:
    """Rough bytes a measurement needs, to skip what cannot fit (the plain losses hold ~4 B x B fp32 matrices)."""
    features = 4 * batch * dim * 4
    if variant.startswith("tiled-"):
        return features + 2 * min(int(variant.split("-")[1]), batch) ** 2 * 4
    return features + 4 * batch * batch * 4


def free_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


def in_child(task: dict) -> dict:
    """Run ``task`` in a fresh interpreter: freed memory of an earlier measurement cannot hide this one's peak."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(task)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(task_json: str) -> None:
    task = json.loads(task_json)
    configure(task["matmul_precision"], task["threads"])
    if task["kind"] == "peak":
        out = peak_bytes(task["variant"], task["batch"], task["dim"], task["device"])
    else:
        out = interleaved_times(task["names"], task["batch"], task["dim"], task["device"], task["rounds"],
                                task["max_seconds"])
    print(json.dumps(out))


def measure_batch(args, names: list[str], batch: int) -> list[dict]:
    """Peak memory of each variant, then their interleaved times, at one batch size."""
    import torch

    common = {"batch": batch, "dim": args.dim, "device": args.device, "matmul_precision": args.matmul_precision,
              "threads": args.threads}
    rows, runnable = {}, []
    fits = {name: args.device == "cuda" or estimated_need(name, batch, args.dim) <= 0.9 * free_bytes(args.device)
            for name in names}  # on CUDA an attempt is cheap: out-of-memory is caught
    tiled = [name for name in names if name.startswith("tiled-")]
    alone = not any(fits[name] for name in names if name not in tiled)
    for name in names:
        row = {"impl": name, "batch": batch, "feature_grad_bytes": 2 * batch * args.dim * 4}
        rows[name] = row
        if not fits[name]:
            need, free = estimated_need(name, batch, args.dim), free_bytes(args.device)
            row.update(status="skipped", reason=f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
            continue
        if alone and name != tiled[0]:  # slow CPU sizes: no peer to compare tile sizes against
            row.update(status="skipped", reason=f"no peer fits at this size: only {tiled[0]} is measured")
            continue
        try:
            peak = (peak_bytes(name, batch, args.dim, "cuda") if args.device == "cuda"
                    else in_child({"kind": "peak", "variant": name, **common}))
        except torch.OutOfMemoryError:
            peak = None  # handled below, once the traceback (which holds the tensors) is gone
        except RuntimeError as e:
            row.update(status="failed", reason=str(e))
            continue
        if peak is None:
            torch.cuda.empty_cache()
            row.update(status="skipped", reason="out of GPU memory")
            continue
        row.update(status="ok", peak_bytes=peak)
        runnable.append(name)
    if runnable:
        task = {"kind": "time", "names": runnable, "rounds": args.rounds, "max_seconds": args.max_seconds, **common}
        timed = (interleaved_times(runnable, batch, args.dim, "cuda", args.rounds, args.max_seconds)
                 if args.device == "cuda" else in_child(task))
        load = [round(x, 2) for x in os.getloadavg()]  # beside each batch's rounds: other jobs skew the times
        for name, t in timed.items():
            rows[name]["load_average_after_timing"] = load
            rows[name].update(time_s=t["time_s"], fastest_s=t["fastest_s"], times_s=t["times_s"],
                              timed_rounds=len(t["times_s"]), timing_includes_warmup=t["cold"])
    return list(rows.values())


def configure(precision: str, threads: int | None) -> None:
    import torch

    torch.set_float32_matmul_precision(precision)
    if threads:
        torch.set_num_threads(threads)


# --- the report ---------------------------------------------------------------------------------------------


def ratios(results: list[dict]) -> list[dict]:
    """Peer / tiled memory and time at each batch where both ran (> 1: the tiled loss wins)."""
    by = {(r["impl"], r["batch"]): r for r in results if r["status"] == "ok"}
    tiled = sorted({r["impl"] for r in results if r["impl"].startswith("tiled-")}, key=lambda v: int(v[6:]))
    out = []
    for batch in sorted({r["batch"] for r in results}):
        for variant in tiled:
            ours = by.get((variant, batch))
            for peer in ("open_clip", "plain"):
                theirs = by.get((peer, batch))
                if ours and theirs:
                    # A peak under one page of resident memory reads as 0 on CPU: no ratio then.
                    memory = theirs["peak_bytes"] / ours["peak_bytes"] if ours["peak_bytes"] > 0 else None
                    out.append({"batch": batch, "tiled": variant, "vs": peer, "memory_ratio": memory,
                                "speed_ratio": theirs["time_s"] / ours["time_s"]})
    return out


def crossover(rats: list[dict], variant: str, vs: str = "plain") -> int | None:
    """Smallest measured batch from which ``variant`` is at least as fast as ``vs`` at every larger one."""
    rows = sorted((r for r in rats if r["vs"] == vs and r["tiled"] == variant), key=lambda r: r["batch"])
    best = None
    for r in reversed(rows):
        if r["speed_ratio"] < 1.0:
            break
        best = r["batch"]
    return best


def table(results: list[dict], rats: list[dict]) -> str:
    mib = 2**20
    lines = [f"{'B':>6}  {'loss':<12} {'peak MiB':>10} {'w/o feat grads':>14} {'time ms':>10}  note",
             "-" * 74]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"{r['batch']:>6}  {r['impl']:<12} {'-':>10} {'-':>14} {'-':>10}  "
                         f"{r['status']}: {r['reason']}")
            continue
        work = (r["peak_bytes"] - r["feature_grad_bytes"]) / mib
        note = ("single cold run" if r["timing_includes_warmup"]
                else f"median of {len(r['times_s'])} (fastest {r['fastest_s'] * 1e3:.1f})")
        lines.append(f"{r['batch']:>6}  {r['impl']:<12} {r['peak_bytes'] / mib:>10.1f} {work:>14.1f} "
                     f"{r['time_s'] * 1e3:>10.1f}  {note}")
    lines += ["", "ratios (theirs / tiled; > 1 means the tiled loss uses less memory / is faster):",
              f"{'B':>6}  {'tiled':<12} {'vs':<10} {'memory x':>9} {'speed x':>8}"]
    for r in rats:
        memory = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.1f}"
        lines.append(f"{r['batch']:>6}  {r['tiled']:<12} {r['vs']:<10} {memory:>9} {r['speed_ratio']:>8.2f}")
    return "\n".join(lines)


def environment(args) -> dict:
    import torch

    from _bench import cpu_info

    env = {**cpu_info(), "torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "matmul_precision": args.matmul_precision,
           "load_average_1_5_15_min_at_end": os.getloadavg()}  # other processes on the machine skew CPU times
    if args.device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["memory_method"] = "torch.cuda.max_memory_allocated minus memory_allocated before the call"
    else:
        env["device_name"] = _cpu_model()
        env["memory_method"] = "child process per measurement: VmHWM (reset via /proc/self/clear_refs) minus VmRSS"
    try:
        import open_clip

        env["open_clip"] = open_clip.__version__
    except ImportError:
        pass
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _series(json_paths: list[Path]) -> dict[tuple[str, str], list[dict]]:
    """{(loss, where): measured rows by batch}, files of the same device and precision merged."""
    series: dict[tuple[str, str], dict[int, dict]] = {}
    for path in json_paths:
        run = json.loads(path.read_text())
        where = run["device"] + ("" if run["env"]["matmul_precision"] == "highest" else " tf32")
        for r in run["results"]:
            if r["status"] == "ok":
                series.setdefault((r["impl"], where), {}).setdefault(r["batch"], r)
    return {key: [rows[b] for b in sorted(rows)] for key, rows in series.items()}


def plot(json_paths: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    panels = (
        ("peak memory above the features (MiB)", lambda r: r["peak_bytes"] / 2**20),
        ("the same less the feature gradients (MiB)", lambda r: (r["peak_bytes"] - r["feature_grad_bytes"]) / 2**20),
        ("forward + backward (ms)", lambda r: r["time_s"] * 1e3),
    )
    for (impl, where), rows in _series(json_paths).items():
        style = "-o" if impl.startswith("tiled") else ("--s" if impl == "open_clip" else ":^")
        for ax, (_, value) in zip(axes, panels):
            points = [(r["batch"], value(r)) for r in rows if value(r) > 0]  # log axes: a 0 MiB reading is dropped
            ax.plot(*zip(*points), style, label=f"{impl} ({where})")
    for ax, (what, _) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B (embed 512, fp32)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("Contrastive loss: peak memory vs batch")
    axes[1].set_title("Working memory: flat for the tiled loss")
    axes[2].set_title("Time vs batch")
    fig.tight_layout()
    atomic_write(out, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    if args.plot_only:
        plot(sorted(RESULTS.glob("loss_memory_*.json")), args.plot)
        print(f"wrote {args.plot}")
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU; run with --device cpu", file=sys.stderr)
        return 2
    configure(args.matmul_precision, args.threads)
    from training.loss import default_tile_size

    tiles = args.tile_sizes or [default_tile_size(args.device)]
    names = variants(args.impls, tiles)
    if args.device == "cuda":  # one-off allocations (cuBLAS workspace, kernels) outside every measurement
        interleaved_times(names, 256, args.dim, "cuda", 1, 1.0)
    results = []
    for batch in args.sizes:
        rows = measure_batch(args, names, batch)
        results += rows
        for r in rows:
            shown = (f"{r['peak_bytes'] / 2**20:.1f} MiB, {r['time_s'] * 1e3:.1f} ms" if r["status"] == "ok"
                     else f"{r['status']}: {r['reason']}")
            print(f"B={batch:>6} {r['impl']:<12} {shown}", flush=True)
    rats = ratios(results)
    print()
    print(table(results, rats))
    cross = {v: crossover(rats, v) for v in names if v.startswith("tiled-")}
    print()
    for variant, batch in cross.items():
        print(f"{variant}: at least as fast as the plain loss from B = {batch} on, among the sizes measured"
              if batch else f"{variant}: slower than the plain loss at the largest size where both ran")
    suffix = args.device + ("_tf32" if args.matmul_precision == "high" else "")
    json_path = (args.json or RESULTS / f"loss_memory_{suffix}.json").resolve()
    atomic_write_json(json_path, {
        "benchmark": "loss_memory", "device": args.device, "command": " ".join(["python", *sys.argv]),
        "dim": args.dim, "tile_sizes": tiles, "env": environment(args), "results": results, "ratios": rats,
        "crossover_vs_plain": cross})
    print(f"wrote {json_path}")
    plot(sorted(set(RESULTS.glob("loss_memory_*.json")) | {json_path}), args.plot)
    print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
