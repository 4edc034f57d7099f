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
import sys
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from clipline import storage
from clipline.checkpoint import (fetch_checkpoint, latest_checkpoint, prune_checkpoints, resolve_checkpoint,
                                 save_checkpoint, save_sharded_checkpoint)
from clipline.config import Config, TrainConfig, WandbConfig, config_to_dict, config_to_yaml
from clipline.dist import (DistEnv, cleanup_distributed, cores_per_process, init_distributed, print0)
from clipline.errors import UsageError
from clipline import fsdp
from clipline.io import atomic_write_text
from clipline.precision import autocast, resolve_precision
from clipline.models import (ModelBundle, create_model, has_lora, load_model_weights, lora_state_dict,
                             hf_tower_writers, open_clip_folder_config, save_model_weights)
from clipline.shards import dataset_size, list_shards
from training.augment import CropSpec, Normalizer, RandomCropDecoder, SimCLRViewsDecoder, pil_decoder
from training.curves import CurveWriter
from training.data import Batch, ShardStream, StreamState, make_loader
from training.loss import contrastive_loss, siglip_loss, tiled_contrastive_loss, tiled_siglip_loss
from training.objectives import (FeatureQueue, ProjectionHead, SLIPModel, all_gather_no_grad, itc_distill_loss,
                                 make_momentum_encoder, momentum_update, nt_xent_loss)

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


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all parameters) where torch has it for the device: on the demo model's CPU step
    the for-each implementation took 59 ms of 330 and the fused one 5."""
    groups = param_groups(model, tc.weight_decay)
    kwargs = dict(lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    try:
        return torch.optim.AdamW(groups, fused=device.type in ("cpu", "cuda"), **kwargs)
    except RuntimeError as e:  # e.g. a device or dtype without a fused kernel
        log.info("fused AdamW unavailable (%s): using the for-each implementation", e)
        return torch.optim.AdamW(groups, **kwargs)


def resolve_workers(workers: int, env: DistEnv) -> int:
    """-1: on a GPU, every core of this rank's share but one (the main process feeds the GPU); on the CPU, one,
    because the model needs the cores and the uint8 pipeline needs little."""
    if workers >= 0:
        return workers
    if env.device.type != "cuda":
        return 1
    return max(1, min(16, cores_per_process(env.local_world_size) - 1))


def default_threads(env: DistEnv) -> int:
    """On the CPU, intra-op threads on every core of this rank's share (0: torch's default elsewhere).

    The training loader's worker is mostly idle (one uint8 crop per sample against a forward and backward pass per
    batch), so the model's threads rarely wait on it: on 2 quiet cores with 1 worker, 2 threads trained the demo
    model at 460 samples/s against 330 with 1, and a tiny ViT at 96 px as open_clip_train does with torch's
    default (benchmarks/train_throughput.py). Eval's decoding workers are busy, and eval keeps the model off
    their cores (clipline.dist.threads_beside)."""
    if env.device.type != "cpu":
        return 0
    return cores_per_process(env.local_world_size)



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
    run_id = run_id_file.read_text().strip() if run_id_file.is_file() else uuid.uuid4().hex[:8]
    atomic_write_text(run_id_file, run_id)
    return wandb.init(project=cfg.project, entity=cfg.entity or None, name=run_name, id=run_id, resume="allow",
                      mode=cfg.mode, dir=str(out), config=config)


class Trainer:
    """Owns the model, optimizer, data position and counters; ``train()`` is the loop."""

    def __init__(self, cfg: Config, env: DistEnv):
        storage.configure(cfg.storage)
        self.precision = resolve_precision(cfg.train.precision, env.device)
        print0(self.precision.line())
        self.eval_precision = resolve_precision(cfg.eval.precision, env.device).precision  # for in-loop evals
        # The resolved config (run folder, checkpoints, wandb) holds the precision the run uses, not 'auto'.
        cfg = replace(cfg, train=replace(cfg.train, precision=self.precision.precision))
        self.cfg, self.tc, self.env = cfg, cfg.train, env
        self.fsdp = self.tc.parallel == "fsdp"
        if self.fsdp:
            fsdp.check_composition(cfg, self.precision.precision, env.device.type)
            if storage.is_remote(self.tc.output_dir):
                raise UsageError("train.parallel=fsdp writes sharded checkpoints to a local or shared filesystem "
                                 "only: set train.output_dir to a path, not a bucket URL")
            if not dist.is_initialized():  # fully_shard needs a process group, even a 1-process one
                dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        per_rank, rem = divmod(self.tc.global_batch_size, env.world_size * self.tc.accum_steps)
        if rem or per_rank == 0:
            raise UsageError(f"train.global_batch_size={self.tc.global_batch_size} must be a multiple of world size "
                             f"({env.world_size}) x train.accum_steps ({self.tc.accum_steps})")
        self.micro_batch = per_rank
        self.synthetic = self.tc.data == "synthetic"
        self.workers = 0 if self.synthetic else resolve_workers(self.tc.workers, env)
        threads = self.tc.threads or default_threads(env)
        if threads:
            torch.set_num_threads(threads)
        # A bucket output_dir: run files live in a local mirror (storage.cache_dir/runs/...) synced up at each
        # checkpoint and at the end; checkpoints go straight to the bucket.
        self.remote_out = self.tc.output_dir if storage.is_remote(self.tc.output_dir) else None
        if self.remote_out:
            storage.check_reachable(storage.root_of(self.remote_out), "train.output_dir bucket")
        self.out = storage.local_cache("runs", self.remote_out) if self.remote_out else Path(self.tc.output_dir)
        self.ckpt_dir = storage.join(self.tc.output_dir, "checkpoints")
        self.shards = [] if self.synthetic else list_shards(self.tc.data)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        random.seed(cfg.run.seed)
        self.bundle: ModelBundle = create_model(cfg.model, device=env.device, objective=self.tc.loss)
        self.model = self.bundle.model
        self.net = self._with_simclr_head(self.model)  # what DDP and the optimizer see
        if self.fsdp:  # before the optimizer, which must hold the sharded parameters
            fsdp.shard_model(self.net, self.tc.precision, self.tc.fsdp_reshard_after_forward, self.tc.compile,
                             log=print0)
        self.optimizer = make_optimizer(self.net, self.tc, env.device)
        self.normalize = Normalizer(self.model.visual.preprocess_cfg.get("mean"),
                                    self.model.visual.preprocess_cfg.get("std"), env.device)
        use_scaler = self.tc.precision == "fp16" and env.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.momentum_model, self.queues = None, {}
        if self.tc.queue_size or self.tc.distill_alpha:
            self.momentum_model = make_momentum_encoder(self.model)
            if self.tc.queue_size:
                dim = self.bundle.model_cfg["embed_dim"]
                self.queues = {k: FeatureQueue(self.tc.queue_size, dim, env.device) for k in ("image", "text")}
        self.step, self.samples_seen = 0, 0
        self.n_streams = 1 if self.synthetic else max(1, self.workers)
        self.stream_state = StreamState(positions=[0] * self.n_streams)
        self._resume()
        self.ddp = (DistributedDataParallel(self.net, device_ids=[env.device.index] if env.device.type == "cuda"
                                            else None) if env.world_size > 1 and not self.fsdp else self.net)
        self.forward = torch.compile(self.ddp) if self.tc.compile and not self.fsdp else self.ddp

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
        source, path = path, fetch_checkpoint(path)  # a checkpoint in a bucket is read from a local copy
        state = torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)
        if (state.get("parallel", "ddp") == "fsdp") != self.fsdp:
            raise UsageError(f"{path} was written with train.parallel={state.get('parallel', 'ddp')}, this run uses "
                             f"{self.tc.parallel}: resume with the same setting, or start from its weights with "
                             f"model.pretrained={path} train.resume=never")
        if self.fsdp:  # model and optimizer from the shards, resharded to this world size
            fsdp.load_sharded_state(path, self.net, self.optimizer)
        else:
            self._load_weights(path, state)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        if self.momentum_model is not None:
            self.momentum_model.load_state_dict(state["momentum_model"])
            for name, queue in self.queues.items():
                queue.load_state_dict(state["queues"][name])
        same_layout = (state["world_size"], state["streams"], state.get("micro_batch")) == (
            self.env.world_size, self.n_streams, self.micro_batch)
        if same_layout:
            data = state["data"][self.env.rank]
            self.stream_state = StreamState(positions=list(data["positions"]), next_stream=int(data["next_stream"]))
            rng = state["rng"][self.env.rank]
            torch.set_rng_state(rng["torch"])
            random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
            if "cuda" in rng and self.env.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.env.device)
        else:
            log.warning("checkpoint was written with world_size=%s, workers=%s, micro-batch %s; now %s, %s, %s: "
                        "weights, optimizer, schedule and step are restored, the data order restarts",
                        state["world_size"], state["streams"], state.get("micro_batch"), self.env.world_size,
                        self.n_streams, self.micro_batch)
            # A fresh order, not a replay of the first samples the run already trained on.
            self.stream_seed_offset = self.step
        print0(f"resumed from {storage.redact(source)} at step {self.step}")

    def _load_weights(self, path: Path, state: dict) -> None:
        """The open_clip weights file, then what it leaves out: LoRA's adapters and unmerged weights, SLIP's head."""
        from safetensors.torch import load_file

        for key, here, option in (("lora", has_lora(self.model), "model.lora_image / model.lora_text"),
                                  ("simclr_head", self.net is not self.model, "train.simclr_weight")):
            if (key in state) != here:
                raise UsageError(f"{path} was trained {'with' if key in state else 'without'} {option}, this run "
                                 f"{'with' if here else 'without'}: resume with the same settings, or start from its "
                                 f"weights with model.pretrained={path} train.resume=never")
        load_model_weights(self.model, load_file(str(path / WEIGHTS), device=str(self.env.device)), state.get("lora"))
        if "simclr_head" in state:
            self.net.head.load_state_dict(state["simclr_head"])

    def _weights_beside_open_clip(self) -> dict:
        """Trained state the open_clip weights file does not hold (it stays loadable by plain open_clip)."""
        extra = {}
        if has_lora(self.model):
            extra["lora"] = lora_state_dict(self.model)
        if self.net is not self.model and not self.fsdp:  # under fsdp the head is in the shards
            extra["simclr_head"] = self.net.head.state_dict()
        return extra

    def _train_state(self) -> dict:
        version, state, gauss = random.getstate()
        rng = {"torch": torch.get_rng_state(), "python": [version, list(state), gauss]}
        if self.env.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.env.device)
        local = {"data": asdict(self.stream_state), "rng": rng}
        every = [local]
        if self.env.world_size > 1:
            every = [None] * self.env.world_size
            dist.all_gather_object(every, local)
        extra = {}
        if self.momentum_model is not None:  # identical on every rank: EMA of identical weights, gathered queues
            extra = {"momentum_model": self.momentum_model.state_dict(),
                     "queues": {k: q.state_dict() for k, q in self.queues.items()}}
        return {**extra, **self._weights_beside_open_clip(), "step": self.step, "samples_seen": self.samples_seen,
                **({"parallel": "fsdp"} if self.fsdp else {"optimizer": self.optimizer.state_dict()}),
                "scaler": self.scaler.state_dict(), "world_size": self.env.world_size, "streams": self.n_streams,
                "micro_batch": self.micro_batch, "precision": self.precision.record(),
                "lr_schedule": {"lr": self.tc.lr, "warmup": self.tc.warmup_steps, "steps": self.tc.steps},
                "data": [e["data"] for e in every], "rng": [e["rng"] for e in every]}

    def resolved_config_yaml(self) -> str:
        """The config as this run uses it; under train.precision=auto a header line says what auto chose and why."""
        p = self.precision
        head = f"# train.precision: auto -> {p.precision} ({p.reason})\n" if p.requested == "auto" else ""
        return head + config_to_yaml(self.cfg)

    def save(self) -> None:
        if self.fsdp:
            return self._save_sharded()
        state = self._train_state()  # collective: every rank takes part
        if self.env.is_main:
            folder_cfg = open_clip_folder_config(self.bundle)
            path = save_checkpoint(self.ckpt_dir, self.step, {
                "open_clip_config.json": lambda p: p.write_text(json.dumps(folder_cfg, indent=2)),
                WEIGHTS: lambda p: save_model_weights(self.model, p),
                TRAIN_STATE: lambda p: torch.save(state, p),
                "config.yaml": lambda p: p.write_text(self.resolved_config_yaml()),
                **hf_tower_writers(self.bundle),  # a Hugging Face text tower's config and tokenizer files
            })
            prune_checkpoints(self.ckpt_dir, self.tc.keep_last)
            self._sync_run_folder()
            print0(f"saved {path}")
        if self.env.world_size > 1:
            dist.barrier()

    def _save_sharded(self) -> None:
        """parallel=fsdp: every rank writes its shards of the model and optimizer, rank 0 the rest; with
        train.fsdp_export_consolidated also the whole weights, gathered to rank 0, as open_clip_model.safetensors."""
        from safetensors.torch import save_file

        state = self._train_state()  # collective: every rank takes part
        weights = fsdp.full_weights(self.net, self.model) if self.tc.fsdp_export_consolidated else None  # same
        writers = {}
        if self.env.is_main:
            folder_cfg = open_clip_folder_config(self.bundle)
            writers = {"open_clip_config.json": lambda p: p.write_text(json.dumps(folder_cfg, indent=2)),
                       TRAIN_STATE: lambda p: torch.save(state, p),
                       "config.yaml": lambda p: p.write_text(self.resolved_config_yaml()),
                       **hf_tower_writers(self.bundle)}
            if weights is not None:
                writers[WEIGHTS] = lambda p: save_file(weights, str(p))
        path = save_sharded_checkpoint(self.ckpt_dir, self.step, fsdp.sharded_state(self.net, self.optimizer),
                                       writers, self.env.rank)
        if self.env.is_main:
            prune_checkpoints(self.ckpt_dir, self.tc.keep_last)
            print0(f"saved {path}")
        dist.barrier()

    # -- one step ----------------------------------------------------------------------------------------------
    stream_seed_offset = 0

    def _loader(self):
        if self.synthetic:
            return self._synthetic_batches()
        stream = ShardStream(self.shards, batch_size=self.micro_batch, rank=self.env.rank,
                             world_size=self.env.world_size, seed=self.cfg.run.seed + self.stream_seed_offset,
                             shuffle_buffer=self.tc.shuffle_buffer, decode=self._decoder(),
                             tokenizer=self.bundle.tokenizer, n_streams=self.n_streams, state=self.stream_state,
                             resampled=self.tc.data_mode == "resampled",
                             # On a CPU the workers have time to spare and the model has none: normalise there.
                             batch_transform=self.normalize if self.env.device.type == "cpu" else None,
                             storage_cfg=self.cfg.storage)
        return make_loader(stream, self.workers, pin_memory=self.env.device.type == "cuda")

    def _synthetic_batches(self):
        """The same random uint8 batch every step, already on the device: the model's speed alone."""
        size = self.model.visual.preprocess_cfg["size"]
        size = size[-2:] if isinstance(size, (list, tuple)) else (size, size)
        generator = torch.Generator(device="cpu").manual_seed(self.cfg.run.seed + self.env.rank)
        views = (3,) if self.tc.simclr_weight else ()  # SLIP: the CLIP crop and SimCLR's two views
        images = torch.randint(0, 256, (self.micro_batch, *views, *size, 3), dtype=torch.uint8, generator=generator)
        texts = self.bundle.tokenizer([f"synthetic caption {i}" for i in range(self.micro_batch)])
        images, texts = images.to(self.env.device), texts.to(self.env.device)
        position = self.stream_state.positions[0]
        while True:
            position += self.micro_batch
            yield Batch(images, texts, 0, position)

    def _decoder(self):
        if self.tc.image_pipeline == "open_clip":
            return pil_decoder(self.bundle.preprocess_train)
        try:
            spec = CropSpec.from_preprocess_cfg(self.model.visual.preprocess_cfg, self.tc.crop_scale)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return SimCLRViewsDecoder(spec) if self.tc.simclr_weight else RandomCropDecoder(spec)

    def _autocast(self):
        return autocast(self.env.device, self.tc.precision)

    def _features(self, batch: Batch, images: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(image features, text features), then under SLIP the (B, 2, d) SimCLR embeddings of the two views.
        ``images``: the batch's images already normalised on the device, where the caller needs them too."""
        with self._autocast():
            out = self.forward(image=self.normalize(batch.images) if images is None else images,
                               text=batch.texts.to(self.env.device, non_blocking=True))
        views = (out["view_embeddings"],) if "view_embeddings" in out else ()
        return out["image_features"], out["text_features"], *views

    @property
    def tiled(self) -> bool:
        if self.tc.loss_impl == "auto":
            return self.env.device.type == "cpu" and self.tc.global_batch_size >= 128
        return self.tc.loss_impl == "tiled"

    def _loss(self, image_features: torch.Tensor, text_features: torch.Tensor,
              view_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        return self._image_text_loss(image_features, text_features) + self._simclr_loss(view_embeddings)

    def _image_text_loss(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        scale = self.model.logit_scale
        if self.tc.loss == "siglip":
            fn = tiled_siglip_loss if self.tiled else siglip_loss
            return fn(image_features, text_features, scale, self.model.logit_bias)
        fn = tiled_contrastive_loss if self.tiled else contrastive_loss
        return fn(image_features, text_features, scale)

    def forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Leave in ``.grad`` the gradient of the loss over all micro-batches of all ranks, averaged over ranks
        as DDP does. With one micro-batch this is a plain DDP step."""
        if self.momentum_model is not None:
            loss = self._momentum_loss(micro_batches[0])
            self.scaler.scale(loss).backward()
            return loss.detach()
        if len(micro_batches) == 1:
            loss = self._loss(*self._features(micro_batches[0]))
            self.scaler.scale(loss).backward()
            if self.fsdp:  # FSDP reduced the sharded gradients; the replicated logit scale/bias are left
                self._average_gradients()
            return loss.detach()
        return self._accumulated_forward_backward(micro_batches)

    def _momentum_loss(self, batch: Batch) -> torch.Tensor:
        """MoCo queues and/or ALBEF distillation: rows from the model, columns from the momentum encoder (all
        ranks) and the queues; the momentum features of this batch are enqueued after the step."""
        images = self.normalize(batch.images)  # once for both encoders
        image_f, text_f, *views = self._features(batch, images)
        with torch.no_grad(), self._autocast():
            out = self.momentum_model(image=self._clip_crops(images), text=batch.texts.to(self.env.device))
        image_m, text_m = out["image_features"].float(), out["text_features"].float()
        loss = itc_distill_loss(image_f, text_f, image_m, text_m, self.model.logit_scale, self.tc.distill_alpha,
                                queue_image=self.queues["image"].contents() if self.queues else None,
                                queue_text=self.queues["text"].contents() if self.queues else None)
        self._pending_keys = (image_m, text_m)
        return loss + self._simclr_loss(*views)

    def _after_update(self) -> None:
        if self.momentum_model is None:
            return
        momentum_update(self.momentum_model, self.model, self.tc.momentum)
        if self.queues:
            image_m, text_m = self._pending_keys
            self.queues["image"].enqueue(all_gather_no_grad(image_m))
            self.queues["text"].enqueue(all_gather_no_grad(text_m))

    # -- SLIP ----------------------------------------------------------------------------------------------------
    def _with_simclr_head(self, model: torch.nn.Module) -> torch.nn.Module:
        """Under train.simclr_weight, the model and SLIP's projection head as one module; the model otherwise.
        The head's default widths scale with embed_dim as SLIP's do for ViT-B/16 (512 -> 4096 -> 256)."""
        if not self.tc.simclr_weight:
            return model
        dim = self.bundle.model_cfg["embed_dim"]
        head = ProjectionHead(dim, self.tc.simclr_hidden_dim or 8 * dim, self.tc.simclr_out_dim or max(1, dim // 2))
        return SLIPModel(model, head.to(self.env.device))

    def _simclr_loss(self, view_embeddings: torch.Tensor | None = None) -> torch.Tensor | float:
        if view_embeddings is None:
            return 0.0
        return self.tc.simclr_weight * nt_xent_loss(view_embeddings[:, 0], view_embeddings[:, 1],
                                                    self.tc.simclr_temperature)

    def _clip_crops(self, images: torch.Tensor) -> torch.Tensor:
        """The CLIP crop of each sample: batches of (B, 3 views, C, H, W) under SLIP, (B, C, H, W) otherwise."""
        return images[:, 0] if images.dim() == 5 else images

    def _accumulated_forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        # Pass 1 embeds every micro-batch without a graph; the loss over the whole accumulated batch then gives
        # the gradient of each feature; pass 2 re-embeds each micro-batch with a graph and back-propagates its
        # slice of those feature gradients. Dropout masks repeat (RNG state replayed) and normalisation-layer
        # running statistics are updated once (restored after pass 1).
        # Every output of _features is cached this way: image and text features, and SLIP's view embeddings.
        rng_states, outputs = [], []
        buffers = {name: b.clone() for name, b in self.net.named_buffers()}
        with torch.no_grad():
            for batch in micro_batches:
                rng_states.append(torch.get_rng_state())
                outputs.append(self._features(batch))
        for name, b in self.net.named_buffers():
            b.copy_(buffers[name])
        cached = [torch.cat(parts).detach().requires_grad_() for parts in zip(*outputs)]
        # Under fsdp each micro-batch's backward reduce-scatters into the sharded gradients (their sum is the
        # same average), so the unsharded gradients of the whole model never exist at once.
        sync_off = self.ddp.no_sync() if isinstance(self.ddp, DistributedDataParallel) else contextlib.nullcontext()
        with sync_off:
            loss = self._loss(*cached)
            self.scaler.scale(loss).backward()  # also gives the logit scale (and bias) their whole-batch gradient
            n = self.micro_batch
            for i, batch in enumerate(micro_batches):
                torch.set_rng_state(rng_states[i])
                torch.autograd.backward(list(self._features(batch)), [c.grad[i * n:(i + 1) * n] for c in cached])
        self._average_gradients()
        return loss.detach()

    def _average_gradients(self) -> None:
        if self.env.world_size == 1:
            return
        grads = [p.grad for p in self.net.parameters() if p.grad is not None and not fsdp.is_sharded(p.grad)]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.env.world_size
        for g, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(averaged)

    def optimizer_step(self) -> None:
        if self.tc.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            clip = fsdp.clip_grad_norm if self.fsdp else torch.nn.utils.clip_grad_norm_
            clip(list(self.net.parameters()), self.tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    nonfinite_in_a_row = 0

    def train_step(self, micro_batches: list[Batch]) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.tc)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(micro_batches)
        if self._finite_everywhere(loss):
            self.optimizer_step()
            self._after_update()
            self.nonfinite_in_a_row = 0
            return loss
        # One bad batch must not poison the weights (AdamW would spread NaN to every parameter it touches).
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        log.warning("step %d: loss is %s on some rank; update skipped (%d in a row)", self.step, float(loss),
                    self.nonfinite_in_a_row)
        if self.nonfinite_in_a_row >= self.tc.max_nonfinite_steps:
            raise RuntimeError(f"the loss was NaN/Inf for {self.nonfinite_in_a_row} steps in a row (up to step "
                               f"{self.step + 1}): the run has diverged. Resume from an earlier checkpoint with a "
                               f"lower train.lr, train.grad_clip > 0 or train.precision=bf16 instead of fp16")
        return loss

    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        ok = torch.isfinite(loss.detach()).float().reshape(1).to(self.env.device)
        if self.env.world_size > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank skips the same steps
        return bool(ok.item())

    # -- the loop ----------------------------------------------------------------------------------------------
    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        value = value.float().clone()
        if self.env.world_size > 1:
            dist.all_reduce(value)
            value /= self.env.world_size
        return float(value)

    def _sync_run_folder(self) -> None:
        """Upload the local mirror of a bucket output_dir (config, metrics, curves; wandb's own folder stays)."""
        if self.remote_out and self.env.is_main:
            storage.sync_up(self.out, self.remote_out, exclude=("checkpoints", "wandb"))

    def _prepare_run_folder(self) -> None:
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.remote_out:  # the bucket's copy is the run's record: resume truncates that one
                storage.sync_down(self.remote_out, self.out, ("metrics.jsonl", "wandb_run_id"))
            atomic_write_text(self.out / "config.yaml", self.resolved_config_yaml())
            metrics = self.out / "metrics.jsonl"
            if metrics.is_file():  # drop lines logged after the checkpoint we resumed from: they are redone
                kept = [ln for ln in metrics.read_text().splitlines()
                        if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
                atomic_write_text(metrics, "".join(k + "\n" for k in kept))

    def _check_eval_datasets(self) -> None:
        """With in-loop eval on, every eval dataset must be on disk before step 1, not found missing at the first
        eval hours later."""
        if not (self.tc.eval_every and self.env.is_main):
            return
        from eval.datasets import check_dataset

        for ds in self.cfg.eval.datasets:
            try:
                check_dataset(ds)
            except UsageError as e:
                raise UsageError(f"{e} (train.eval_every={self.tc.eval_every} evaluates it during training; "
                                 f"fix the path or set train.eval_every=0)") from None

    def _evaluate(self) -> dict:
        """Zero-shot eval of the current weights on the eval section's datasets, through eval's public API."""
        from eval.suite import EvalContext, evaluate_dataset

        results = {}
        if self.env.is_main and self.cfg.eval.datasets:
            self.model.eval()
            ctx = EvalContext(self.env.device, self.cfg.eval.batch_size, self.eval_precision)
            try:
                for ds in self.cfg.eval.datasets:
                    for r in evaluate_dataset(self.bundle, ds, self.env.device, self.cfg.eval.batch_size, ctx=ctx):
                        if not r["metric"].startswith("recall["):
                            results[f"eval/{ds.name}/{r['metric']}"] = r["value"]
            finally:
                self.model.train()
        if self.env.world_size > 1:
            dist.barrier()
        return results

    def train(self) -> bool:
        """Train to train.steps; False when stopped early by a signal (after writing a checkpoint)."""
        self._prepare_run_folder()
        self._check_eval_datasets()
        if self.step >= self.tc.steps:
            print0(f"already trained: step {self.step} >= train.steps={self.tc.steps}")
            return True
        stop = StopSignal()
        size = dataset_size(self.shards) if self.shards else None
        data = "synthetic data" if self.synthetic else f"{len(self.shards)} shards"
        print0(f"training {self.bundle.arch} ({self.tc.loss} loss) for {self.tc.steps} steps, global batch "
               f"{self.tc.global_batch_size} ({self.env.world_size} x {self.tc.accum_steps} x {self.micro_batch}), "
               f"{data}" + (f", {size} samples" if size else "") + f", on {self.env.device}")
        wandb_run = start_wandb(self.cfg.wandb, self.cfg.run.name, self.out, json.loads(json.dumps(
            config_to_dict(self.cfg))), self.env)
        metrics = (self.out / "metrics.jsonl").open("a") if self.env.is_main else None
        progress = Progress(self.tc.steps, self.step, enabled=self.env.is_main)
        curves = CurveWriter(self.out, enabled=self.env.is_main and self.tc.curves_every_s > 0,
                             min_interval_s=self.tc.curves_every_s, background=True)
        window_start, window_samples, skipped = time.perf_counter(), 0, {}
        batches = iter(self._loader())
        self.net.train()
        try:
            while self.step < self.tc.steps:
                micro = [next(batches) for _ in range(self.tc.accum_steps)]
                loss = self.train_step(micro)
                for batch in micro:
                    self.stream_state.advance(batch)
                    skipped[batch.stream] = batch.skipped
                self.step += 1
                self.samples_seen += self.tc.global_batch_size
                window_samples += self.tc.global_batch_size
                progress.update(self.step)
                if self.step % self.tc.log_every == 0 or self.step == self.tc.steps:
                    elapsed = time.perf_counter() - window_start
                    record = {"step": self.step, "samples_seen": self.samples_seen,
                              "loss": self._mean_over_ranks(loss), "lr": self.optimizer.param_groups[0]["lr"],
                              "logit_scale": self.model.logit_scale.detach().exp().item(),
                              "samples_per_s": window_samples / elapsed,
                              "skipped_samples": sum(sum(s.values()) for s in skipped.values())}
                    if self.tc.eval_every and (self.step % self.tc.eval_every == 0 or self.step == self.tc.steps):
                        record.update(self._evaluate())
                    if metrics is not None:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                        curves.update()  # at most once per train.curves_every_s
                    wandb_run.log(record, step=self.step)
                    progress.show(record)
                    progress.write(f"step {self.step}/{self.tc.steps} loss {record['loss']:.4f} "
                                   f"lr {record['lr']:.2e} scale {record['logit_scale']:.1f} "
                                   f"{record['samples_per_s']:.0f} samples/s")
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
            # Stop the loader's workers now. They ignore SIGTERM (training.data._ignore_stop_signals), so if the
            # iterator outlived this call, multiprocessing's exit handler would terminate() them to no effect and
            # join them forever: the process hung after its last checkpoint.
            getattr(batches, "_shutdown_workers", lambda: None)()
            progress.close()
            if metrics is not None:
                metrics.close()
                curves.update(final=True)
            self._sync_run_folder()  # after the final curves, so a bucket's copy of the run has them too
            wandb_run.finish()
        return True


class Progress:
    """A tqdm bar on an interactive terminal (rank 0); plain log lines otherwise, so batch logs stay readable."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        self._redirects = contextlib.ExitStack()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib import DummyTqdmFile
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
            # print0 (checkpoint saved, ...) and log records go above the bar, not glued to its line: through the
            # bar's own stream, the one tqdm clears before writing (both are the terminal)
            self._redirects.enter_context(contextlib.redirect_stdout(DummyTqdmFile(sys.stderr)))
            self._redirects.enter_context(logging_redirect_tqdm())

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def show(self, record: dict) -> None:
        """The last logged loss and throughput beside the bar."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {record['loss']:.4f}, {record['samples_per_s']:.0f} samples/s",
                                     refresh=False)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        elif self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        self._redirects.close()
        if self.bar is not None:
            self.bar.close()
