"""`clipline train`: a dual-encoder contrastive trainer, step-based, auto-resuming, the same at any world size.

Launch it alone (``clipline train cfg.yaml``), under torchrun (``torchrun --nproc_per_node N -m clipline train
cfg.yaml``), ``accelerate launch -m clipline train cfg.yaml`` or SLURM ``srun``; the rank comes from the
launcher's environment. ``train.global_batch_size`` is the contrastive batch over all ranks, so one config
trains the same model at any world size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from clipline.checkpoint import latest_checkpoint, prune_checkpoints, resolve_checkpoint, save_checkpoint
from clipline.config import Config, TrainConfig, WandbConfig, config_to_yaml
from clipline.dist import DistEnv, cleanup_distributed, init_distributed, print0
from clipline.errors import UsageError
from clipline.io import atomic_write_text
from clipline.models import ModelBundle, create_model, open_clip_folder_config, save_model_weights
from clipline.shards import dataset_size, list_shards
from training.data import ShardStream, StreamState, make_loader
from training.loss import contrastive_loss

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100)
EXIT_PREEMPTED = 75
"""Exit code after checkpointing on SIGTERM/SIGUSR1 before the last step (EX_TEMPFAIL): the job should be
requeued, and a dependency chain must not treat it as finished."""
TRAIN_STATE = "train_state.pt"
WEIGHTS = "open_clip_model.safetensors"


def main(cfg: Config) -> int:
    env = init_distributed(cfg.train.device)
    try:
        finished = Trainer(cfg, env).train()
    finally:
        cleanup_distributed()
    return 0 if finished else EXIT_PREEMPTED


class StopSignal:
    """Remembers SIGTERM / SIGUSR1 (Slurm's warning before the time limit, or preemption) so the loop can stop at
    a step boundary with a checkpoint instead of dying mid-step."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, env: DistEnv, device: torch.device) -> bool:
        """True on every rank when any rank got a signal: all ranks must stop at the same step."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if env.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to 0 at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: gains, biases, the logit scale and embeddings are left undecayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or any(k in name for k in ("bias", "logit_scale", "embedding", ".ln", "ln_", "bn"))
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _NoWandb:
    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self) -> None:
        pass


def start_wandb(cfg: WandbConfig, run_name: str, out: Path, config: dict, env: DistEnv):
    """A wandb run on rank 0 when enabled; a do-nothing stand-in otherwise, so callers need no rank checks."""
    if cfg.mode == "disabled" or not env.is_main:
        return _NoWandb()
    import wandb

    run_id_file = out / "wandb_run_id"
    run_id = run_id_file.read_text().strip() if run_id_file.is_file() else wandb.util.generate_id()
    atomic_write_text(run_id_file, run_id)
    return wandb.init(project=cfg.project, entity=cfg.entity or None, name=run_name, id=run_id, resume="allow",
                      mode=cfg.mode, dir=str(out), config=config)


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.tc, self.env = cfg, cfg.train, env
        if self.tc.global_batch_size % env.world_size:
            raise UsageError(f"train.global_batch_size={self.tc.global_batch_size} is not divisible by the world "
                             f"size {env.world_size}; pick a multiple of it")
        self.local_batch = self.tc.global_batch_size // env.world_size
        if self.tc.threads:
            torch.set_num_threads(self.tc.threads)
        self.out = Path(self.tc.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.shards = list_shards(self.tc.data)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        random.seed(cfg.run.seed)
        self.bundle: ModelBundle = create_model(cfg.model, device=env.device)
        self.model = self.bundle.model
        self.optimizer = torch.optim.AdamW(param_groups(self.model, self.tc.weight_decay), lr=self.tc.lr,
                                           betas=(self.tc.beta1, self.tc.beta2), eps=self.tc.eps)
        use_scaler = self.tc.precision == "fp16" and env.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.step, self.samples_seen = 0, 0
        self.n_streams = max(1, self.tc.workers)
        self.stream_state = StreamState(positions=[0] * self.n_streams)
        self._resume()
        self.ddp = (DistributedDataParallel(self.model, device_ids=[env.device.index] if env.device.type == "cuda"
                                            else None) if env.world_size > 1 else self.model)

    # -- state -------------------------------------------------------------------------------------------------
    def _resume_path(self) -> Path | None:
        if self.tc.resume == "never":
            return None
        if self.tc.resume == "auto":
            return latest_checkpoint(self.ckpt_dir)
        return resolve_checkpoint(self.tc.resume)

    def _resume(self) -> None:
        path = self._resume_path()
        if path is None:
            return
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(path / WEIGHTS), device=str(self.env.device)))
        state = torch.load(path / TRAIN_STATE, map_location=self.env.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        same_layout = state["world_size"] == self.env.world_size and state["streams"] == self.n_streams
        if same_layout:
            data = state["data"][self.env.rank]
            self.stream_state = StreamState(positions=list(data["positions"]), next_stream=int(data["next_stream"]))
            torch.set_rng_state(state["rng"][self.env.rank]["torch"].cpu())
        else:
            log.warning("checkpoint was written with world_size=%s, workers=%s; now %s, %s: weights, optimizer and "
                        "step are restored, the data order restarts", state["world_size"], state["streams"],
                        self.env.world_size, self.n_streams)
        print0(f"resumed from {path} at step {self.step}")

    def _train_state(self) -> dict:
        local = {"data": asdict(self.stream_state), "rng": {"torch": torch.get_rng_state()}}
        every = [local]
        if self.env.world_size > 1:
            every = [None] * self.env.world_size
            dist.all_gather_object(every, local)
        return {"step": self.step, "samples_seen": self.samples_seen, "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "world_size": self.env.world_size, "streams": self.n_streams,
                "data": [e["data"] for e in every], "rng": [e["rng"] for e in every]}

    def save(self) -> None:
        state = self._train_state()  # collective: every rank takes part
        if self.env.is_main:
            folder_cfg = open_clip_folder_config(self.bundle)
            path = save_checkpoint(self.ckpt_dir, self.step, {
                "open_clip_config.json": lambda p: p.write_text(json.dumps(folder_cfg, indent=2)),
                WEIGHTS: lambda p: save_model_weights(self.model, p),
                TRAIN_STATE: lambda p: torch.save(state, p),
                "config.yaml": lambda p: p.write_text(config_to_yaml(self.cfg)),
            })
            prune_checkpoints(self.ckpt_dir, self.tc.keep_last)
            print0(f"saved {path}")
        if self.env.world_size > 1:
            dist.barrier()

    # -- the loop ----------------------------------------------------------------------------------------------
    def _loader(self):
        stream = ShardStream(self.shards, batch_size=self.local_batch, rank=self.env.rank,
                             world_size=self.env.world_size, seed=self.cfg.run.seed,
                             shuffle_buffer=self.tc.shuffle_buffer, image_transform=self.bundle.preprocess_train,
                             tokenizer=self.bundle.tokenizer, n_streams=self.n_streams, state=self.stream_state)
        return make_loader(stream, self.tc.workers, pin_memory=self.env.device.type == "cuda")

    def _autocast(self):
        if self.tc.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.tc.precision == "bf16" else torch.float16
        return torch.autocast(self.env.device.type, dtype=dtype)

    def train_step(self, batch) -> float:
        images = batch.images.to(self.env.device, non_blocking=True)
        texts = batch.texts.to(self.env.device, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.tc)
        with self._autocast():
            out = self.ddp(image=images, text=texts)
        loss = contrastive_loss(out["image_features"], out["text_features"], self.model.logit_scale)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return loss.detach()

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        value = value.float().clone()
        if self.env.world_size > 1:
            dist.all_reduce(value)
            value /= self.env.world_size
        return float(value)

    def _prepare_run_folder(self) -> None:
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", config_to_yaml(self.cfg))
            metrics = self.out / "metrics.jsonl"
            if metrics.is_file():  # drop lines logged after the checkpoint we resumed from: they are redone
                kept = [ln for ln in metrics.read_text().splitlines()
                        if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
                atomic_write_text(metrics, "".join(k + "\n" for k in kept))

    def train(self) -> bool:
        """Train to train.steps; False when stopped early by a signal (after writing a checkpoint)."""
        self._prepare_run_folder()
        if self.step >= self.tc.steps:
            print0(f"already trained: step {self.step} >= train.steps={self.tc.steps}")
            return True
        stop = StopSignal()
        size = dataset_size(self.shards)
        print0(f"training {self.bundle.arch} for {self.tc.steps} steps, global batch {self.tc.global_batch_size} "
               f"({self.env.world_size} x {self.local_batch}), {len(self.shards)} shards"
               + (f", {size} samples" if size else "") + f", on {self.env.device}")
        wandb_run = start_wandb(self.cfg.wandb, self.cfg.run.name, self.out, json.loads(json.dumps(
            asdict(self.cfg))), self.env)
        metrics = (self.out / "metrics.jsonl").open("a") if self.env.is_main else None
        window_start, window_samples, skipped = time.perf_counter(), 0, {}
        batches = iter(self._loader())
        self.model.train()
        try:
            while self.step < self.tc.steps:
                batch = next(batches)
                loss = self.train_step(batch)
                self.stream_state.advance(batch)
                skipped[batch.stream] = batch.skipped
                self.step += 1
                self.samples_seen += self.tc.global_batch_size
                window_samples += self.tc.global_batch_size
                if self.step % self.tc.log_every == 0 or self.step == self.tc.steps:
                    elapsed = time.perf_counter() - window_start
                    record = {"step": self.step, "samples_seen": self.samples_seen,
                              "loss": self._mean_over_ranks(loss), "lr": self.optimizer.param_groups[0]["lr"],
                              "logit_scale": self.model.logit_scale.detach().exp().item(),
                              "samples_per_s": window_samples / elapsed,
                              "skipped_samples": sum(sum(s.values()) for s in skipped.values())}
                    if metrics is not None:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                    wandb_run.log(record, step=self.step)
                    print0(f"step {self.step}/{self.tc.steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                           f"scale {record['logit_scale']:.1f} {record['samples_per_s']:.0f} samples/s")
                    window_start, window_samples = time.perf_counter(), 0
                due = self.step % self.tc.save_every == 0 or self.step == self.tc.steps
                if due:
                    self.save()
                if self.step < self.tc.steps and stop.agreed(self.env, self.env.device):
                    if not due:
                        self.save()
                    print0(f"stopped by signal at step {self.step}; checkpoint written, resume continues from it")
                    return False
        finally:
            if metrics is not None:
                metrics.close()
            wandb_run.finish()
        return True
