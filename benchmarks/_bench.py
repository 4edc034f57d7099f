"""What every benchmark script records beside its numbers, and how it runs one measured command.

- `machine()`: the CPU model, the flags that decide bf16 speed (avx512_bf16, amx_bf16, avx2), the cores this
  process may use, torch's version and default threads, and the caps a user can set to emulate an AVX2-only CPU
  (ATEN_CPU_CAPABILITY, DNNL_MAX_CPU_ISA) when they are set.
- `measured(cmd)`: runs one command in a fresh process and returns its wall-clock seconds with the load around
  it: os.getloadavg() before and after, and the CPU the *rest* of the machine used meanwhile (busy time of all
  cores from /proc/stat minus the CPU time of the command's own process tree). A round is flagged `loaded` when
  other processes used more than LOADED_CORES cores on average during it; medians are taken over the unflagged
  rounds (all rounds when every one is flagged, and the output says so). The 1-minute load average is recorded
  beside each round but is not the rule: it trails by about a minute and includes the benchmark's own
  processes, so right after a run it reads high on a quiet machine.
"""

from __future__ import annotations

import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clipline.io import atomic_write_json  # noqa: E402

LOADED_CORES = 0.25
"""A round is `loaded` when processes other than the measured one kept more than this many cores busy on average."""

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx512f", "avx2")


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"cpu_model": model, "cpu_flags": {f: f in flags for f in BF16_FLAGS},
            "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags}


def machine() -> dict:
    import torch

    from clipline.dist import available_cores

    out = {**cpu_info(), "cores": available_cores(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "python": platform.python_version(), "torch": torch.__version__,
           "torch_threads_default": torch.get_num_threads(), "load_average_at_start": list(os.getloadavg()),
           "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])}
    caps = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS") if k in os.environ}
    if caps:
        out["environment_caps"] = caps
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _busy_seconds() -> float:
    """CPU-seconds all cores spent not idle since boot (/proc/stat), or 0.0 where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal; guest is inside user
    return busy / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measured(cmd: list[str], *, env: dict | None = None, cwd: str | Path | None = None,
             check: bool = True) -> dict:
    """Run ``cmd`` in a fresh process; its wall seconds, CPU seconds and the machine's load around it."""
    load_before = os.getloadavg()
    busy0, own0, self0, t0 = _busy_seconds(), _children_cpu(), time.process_time(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    own = _children_cpu() - own0
    # "Other" is other processes: the benchmark's own process is left out too, since what it does meanwhile is part
    # of the setup both tools share (prep_throughput's image server runs in it and kept ~0.25 of a core busy).
    setup = time.process_time() - self0
    other = max(0.0, _busy_seconds() - busy0 - own - setup)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd[:4])} ... exited {proc.returncode}:\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}")
    other_cores = other / seconds if seconds > 0 else 0.0
    return {"seconds": seconds, "cpu_seconds": own, "other_cores": round(other_cores, 3),
            "benchmark_process_cores": round(setup / seconds if seconds > 0 else 0.0, 3),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "loaded": other_cores > LOADED_CORES,
            "stdout": proc.stdout, "stderr": proc.stderr, "returncode": proc.returncode}


def round_record(run: dict, **values) -> dict:
    """The JSON row of one measured run: its values beside its load (stdout and stderr left out)."""
    return {**values, "seconds": round(run["seconds"], 3), "cpu_seconds": round(run["cpu_seconds"], 2),
            "other_cores": run["other_cores"], "benchmark_process_cores": run.get("benchmark_process_cores"),
            "loaded": run["loaded"], "load_average_before": run["load_average_before"], "load_average_after": run["load_average_after"]}


def quiet_median(rows: list[dict], key: str) -> tuple[float | None, int, bool]:
    """(median of ``key`` over the rounds not flagged loaded, rounds used, whether loaded rounds had to be used)."""
    quiet = [r[key] for r in rows if not r.get("loaded") and r.get(key) is not None]
    if quiet:
        return statistics.median(quiet), len(quiet), False
    values = [r[key] for r in rows if r.get(key) is not None]
    return (statistics.median(values) if values else None), len(values), bool(values)


def alternating(names: list[str], round_index: int) -> list[str]:
    """A B, B A, A B, ...: load drift within a round falls on each side alike over the rounds."""
    return list(names) if round_index % 2 == 0 else list(names)[::-1]


def write_result(path: str | Path, result: dict) -> Path:
    path = Path(path)
    atomic_write_json(path, result)
    return path


def loaded_note(rows: list[dict]) -> str:
    n = sum(1 for r in rows if r.get("loaded"))
    return f" ({n} loaded round{'s' if n != 1 else ''} left out)" if n and n < len(rows) else (
        " (every round was loaded: the median uses them all)" if n else "")


PEER_WDS = REPO / "benchmarks" / ".cache" / "peer-webdataset"


def peer_env(base: dict | None = None) -> dict:
    """The environment in which this python runs open_clip_train. open_clip_train 3.3.0 crashes with webdataset
    > 0.2.86 (`KeyError: 'fname'`, its issue #935): when the installed webdataset is newer, webdataset 0.2.86 is
    installed once into benchmarks/.cache/peer-webdataset and put first on PYTHONPATH; otherwise nothing changes."""
    from importlib.metadata import version

    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    installed = tuple(int(x) for x in version("webdataset").split(".")[:3] if x.isdigit())
    if installed <= (0, 2, 86):
        return env
    if not (PEER_WDS / "webdataset").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--target", str(PEER_WDS), "webdataset==0.2.86"], check=True)
    env["PYTHONPATH"] = os.pathsep.join([str(PEER_WDS), env["PYTHONPATH"]])
    return env
