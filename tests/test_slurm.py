"""The slurm/ scripts on a real Slurm: Debian's slurm-wlm + munge, one node on 127.0.0.1 (.ci/slurm_setup.sh).

- slurm/pipeline.sh chains prep (an array over two URL-list parts, downloading from a loopback server), train
  (slurm/train_srun.sbatch: one srun task per rank) and eval with afterok, and every stage leaves its results.
- slurm/train.sbatch (torchrun inside), sent the preemption warning mid-run, checkpoints, requeues itself and
  finishes with the same steps, samples and weights as the uninterrupted training of the pipeline.

The packages are installed when missing (root and apt-get needed, else the Slurm tests skip, and fail under
CI=true); the daemons are stopped after the module, whatever happened.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, make_shard_folder, require_or_skip
from data_prep.demo_scenes import write_demo_split
from data_prep.serve import LocalImageServer, write_url_list
from training.trainer import EXIT_PREEMPTED

SETUP = REPO / ".ci" / "slurm_setup.sh"
SLURM = REPO / "slurm"
DAEMONS = ("sbatch", "slurmctld", "slurmd", "munged")
STEPS = 24  # long enough (a few seconds) for the warning to land mid-run
PARTS, PER_PART = 2, 128
# The one-node cluster has 2 partitions but no GPUs, so GPU requests are overridden; everything else is the
# scripts' own settings. Each training run is a world of 2 CPU processes.
NO_GPU = "--gpus-per-node=0"
SRUN_TRAIN_OPTIONS = f"--nodes=1 --ntasks-per-node=2 {NO_GPU} --cpus-per-task=1"
TORCHRUN_TRAIN_OPTIONS = ["--nodes=1", NO_GPU, "--cpus-per-task=2"]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


# -- the cluster ---------------------------------------------------------------------------------------------

def _install_or_skip() -> None:
    if all(shutil.which(d) for d in DAEMONS):
        return
    if os.geteuid() != 0:
        require_or_skip(False, "slurm-wlm and munge are not installed, and installing them needs root")
    if not shutil.which("apt-get"):
        require_or_skip(False, "slurm-wlm and munge are not installed, and there is no apt-get to install them")
    result = subprocess.run([SETUP, "install"], capture_output=True, text=True, timeout=900)
    require_or_skip(result.returncode == 0 and all(shutil.which(d) for d in DAEMONS),
                    f"apt-get could not install slurm-wlm munge: {(result.stderr or result.stdout)[-500:]}")


@dataclass
class Cluster:
    home: Path
    env: dict

    def run(self, *cmd, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(c) for c in cmd], cwd=REPO, env={**self.env, **(env or {})},
                                capture_output=True, text=True, timeout=120)
        if check:
            assert result.returncode == 0, f"{cmd}: {result.stdout}\n{result.stderr}"
        return result

    def submit(self, script: Path, *args, options: list[str], env: dict | None = None) -> str:
        return self.run("sbatch", "--parsable", *options, script, *args, env=env).stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict]:
        """Slurm's record of a job, one dict per array task."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.splitlines() if line]

    def wait(self, job_ids, timeout: float) -> dict[str, list[dict]]:
        deadline = time.monotonic() + timeout
        while True:
            records = {j: self.jobs(j) for j in job_ids}
            if all(r["JobState"] in FINISHED for rs in records.values() for r in rs):
                return records
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs still queued after {timeout} s: "
                                     + "; ".join(f"{r['JobId']} {r['JobState']} {r.get('Reason')}"
                                                 for rs in records.values() for r in rs) + self.daemon_logs())
            time.sleep(1)

    def daemon_logs(self) -> str:
        return "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.home / "log").glob("*.log")))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    _install_or_skip()
    require_or_skip(os.geteuid() == 0, "the one-node cluster runs munged and slurmd as root")
    home = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_CONF": str(home / "etc" / "slurm.conf"), "CLIPLINE_DIR": str(REPO),
           "PYTHON": sys.executable, "WANDB_MODE": "disabled"}
    cluster = Cluster(home, env)
    try:
        up = subprocess.run([SETUP, "up", home], capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr + cluster.daemon_logs()
        yield cluster
    finally:
        subprocess.run([SETUP, "down", home], capture_output=True, text=True, timeout=120)


# -- the runs ------------------------------------------------------------------------------------------------

def clipline_args(out: Path, shards: str, eval_shards: Path) -> list[str]:
    """The same training for every run here: the tiny config, 24 steps, logged every step."""
    return ["configs/demo.yaml", "configs/test-tiny.yaml", f"run.output_dir={out}", f"train.data={shards}",
            f"demo.eval_output_dir={eval_shards}", f"train.steps={STEPS}", "train.log_every=1", "train.precision=fp32"]


def log_of(logs: Path, name: str, job_id: str) -> str:
    path = logs / f"clipline-{name}-{job_id}.out"
    return path.read_text() if path.is_file() else f"(no log {path})"


@dataclass
class PipelineRun:
    out: Path
    shards: str
    eval_shards: Path
    logs: Path
    ids: dict[str, str]
    records: dict[str, list[dict]]


@pytest.fixture(scope="module")
def pipeline(slurm, tmp_path_factory):
    work = tmp_path_factory.mktemp("pipeline")
    split = write_demo_split(work / "source", n=PARTS * PER_PART, seed=0, image_size=32)
    eval_shards = make_shard_folder(work / "eval", n_shards=1, per_shard=60, seed=2, captions_per_image=2)
    out, logs = work / "run", work / "logs"
    # prep.samples_per_shard is 128 in the tiny config: one shard per part.
    shards = f"{out}/shards/part-{{0..{PARTS - 1}}}/00000.tar"
    with LocalImageServer(split.parent) as server:
        urls = pd.read_parquet(write_url_list(split, server, work / "urls.parquet"))
        for part in range(PARTS):
            urls.iloc[part * PER_PART:(part + 1) * PER_PART].to_parquet(work / f"part-{part}.parquet")
        submitted = slurm.run(
            SLURM / "pipeline.sh", *clipline_args(out, shards, eval_shards),
            f"prep.url_list={work}/part-%a.parquet", f"prep.output_dir={out}/shards/part-%a",
            "prep.allow_private_networks=true",
            env={"PREP_ARRAY": f"0-{PARTS - 1}", "PREP_SBATCH_ARGS": "--cpus-per-task=1",
                 "TRAIN_SCRIPT": "slurm/train_srun.sbatch", "TRAIN_SBATCH_ARGS": SRUN_TRAIN_OPTIONS,
                 "EVAL_SBATCH_ARGS": f"{NO_GPU} --cpus-per-task=2", "LOG_DIR": str(logs)})
        ids = dict(line.split() for line in submitted.stdout.splitlines())
        by_id = slurm.wait(ids.values(), timeout=300)  # the server must outlive the prep tasks
    return PipelineRun(out, shards, eval_shards, logs, ids, {stage: by_id[i] for stage, i in ids.items()})


@pytest.mark.slow
def test_pipeline_chain_completes_in_order_with_results(pipeline):
    run = pipeline
    assert list(run.ids) == ["prep", "train", "eval"]
    for stage, records in run.records.items():
        for r in records:
            assert (r["JobState"], r["ExitCode"]) == ("COMPLETED", "0:0"), \
                f"{stage} job {r['JobId']}: {r['JobState']} {r['ExitCode']}\n" + "".join(
                    log_of(run.logs, stage, r["JobId"])[-3000:] for r in records)
    prep, (train,), (ev,) = run.records["prep"], run.records["train"], run.records["eval"]
    assert len(prep) == PARTS  # one array task per URL-list part
    # afterok: each stage started only once the one before it had ended (ISO times compare as text)
    assert train["StartTime"] >= max(p["EndTime"] for p in prep)
    assert ev["StartTime"] >= train["EndTime"]
    assert train["Dependency"] == "(null)" and ev["Dependency"] == "(null)"  # met, not dropped

    for part in range(PARTS):
        sizes = json.loads((run.out / "shards" / f"part-{part}" / "sizes.json").read_text())
        assert sizes == {"00000.tar": PER_PART}
    state = torch.load(run.out / "train" / "checkpoints" / f"step_{STEPS:08d}" / "train_state.pt",
                       weights_only=True)
    assert (state["step"], state["world_size"]) == (STEPS, 2)  # 2 srun tasks made one world
    results = json.loads((run.out / "eval" / "results.json").read_text())
    assert {r["dataset"] for r in results} >= {"demo-colour", "demo-shape", "demo-retrieval"}
    assert all(r["step"] == STEPS and 0.0 <= r["value"] <= 1.0 for r in results if "value" in r)
    assert not [r for r in results if r.get("error")]


@pytest.mark.slow
@pytest.mark.fault
def test_preempted_train_job_requeues_and_finishes_like_an_uninterrupted_one(slurm, pipeline, tmp_path, fault_row):
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    job = slurm.submit(SLURM / "train.sbatch", *clipline_args(out, pipeline.shards, pipeline.eval_shards),
                       options=[*TORCHRUN_TRAIN_OPTIONS, f"--output={logs}/%x-%j.out"],
                       env={"NPROC_PER_NODE": "2"})
    metrics = out / "train" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        state = slurm.jobs(job)[0]["JobState"]
        assert state in ("PENDING", "RUNNING") and time.monotonic() < deadline, \
            f"job {job} {state} before 2 steps were logged\n{log_of(logs, 'train', job)[-3000:]}"
        time.sleep(0.2)
    # What --signal=B:USR1@300 does before the time limit: USR1 to the batch script only.
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    (record,) = slurm.wait([job], timeout=240)[job]
    log = log_of(logs, "train", job)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-4000:]

    stopped = int(re.search(r"stopped by signal at step (\d+)", log).group(1))
    assert 2 <= stopped < STEPS
    assert f"requeueing job {job}" in log
    assert f"step_{stopped:08d} at step {stopped}" in log  # the requeued run resumed from that checkpoint
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # every step once: none lost, none redone twice in the record

    final = f"step_{STEPS:08d}"
    ours = torch.load(out / "train" / "checkpoints" / final / "train_state.pt", weights_only=True)
    theirs = torch.load(pipeline.out / "train" / "checkpoints" / final / "train_state.pt", weights_only=True)
    assert (ours["step"], ours["samples_seen"]) == (theirs["step"], theirs["samples_seen"])
    a, b = (load_file(str(o / "train" / "checkpoints" / final / "open_clip_model.safetensors"))
            for o in (out, pipeline.out))
    assert all(torch.equal(a[k], b[k]) for k in a)  # exact resume: as if never stopped
    fault_row(area="training", fault="Slurm's time-limit warning (USR1 to the batch script, torchrun x 2 ranks)",
              happened=f"stopped with a checkpoint at step {stopped}, the job requeued itself (Restarts "
                       f"{record['Restarts']}), resumed from step {stopped} and ended {record['JobState']} "
                       f"{record['ExitCode']}",
              lost=f"0: steps 1-{steps[-1]} each logged once, {sum(torch.equal(a[k], b[k]) for k in a)}/{len(a)} "
                   f"weight tensors bitwise equal to the uninterrupted pipeline run")


# -- the scripts themselves (no cluster needed) --------------------------------------------------------------

def test_job_scripts_parse_and_ask_for_the_warning():
    for script in [*SLURM.glob("*.sbatch"), SLURM / "pipeline.sh", SLURM / "lib.sh", SETUP]:
        assert subprocess.run(["bash", "-n", script]).returncode == 0, script
    for script in SLURM.glob("*.sbatch"):
        assert script.read_text().startswith("#!"), f"{script.name}: sbatch needs a #! line"
    for script in ("train.sbatch", "train_srun.sbatch"):
        text = (SLURM / script).read_text()
        assert re.search(r"^#SBATCH --signal=B:USR1@\d+", text, re.M) and "#SBATCH --requeue" in text, script
    lib = (SLURM / "lib.sh").read_text()
    assert int(re.search(r"^EXIT_PREEMPTED=(\d+)", lib, re.M).group(1)) == EXIT_PREEMPTED


def test_pipeline_refuses_a_bad_config_before_submitting(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "LOG_DIR": str(tmp_path / "logs")}
    env.pop("SLURM_CONF", None)
    result = subprocess.run([SLURM / "pipeline.sh", "configs/demo.yaml", "train.stpes=10"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "stpes" in result.stderr and "sbatch" not in result.stderr, result.stderr
    assert not (tmp_path / "logs").exists()  # made just before the first sbatch
