"""Sharded data parallelism (``train.parallel: fsdp``): FSDP2 ``fully_shard`` on every residual block of both
towers, then on the root, so each rank holds 1/N of the parameters, gradients and AdamW state.

What differs from DDP, and why:

- The logit scale and bias are 0-dim parameters, which ``fully_shard`` cannot shard: they stay replicated on every
  rank (``ignored_params``) and their gradients are averaged over ranks by the trainer, as DDP would.
- Gradient norms are computed over the sharded gradients (a DTensor norm is reduced over ranks) together with
  the replicated ones, so clipping scales every rank's shards by the same factor DDP's full gradients get.
- The options that need every rank to hold the whole model (an EMA copy, a rank-0 eval, a loss scaler whose
  overflow check would differ per shard) are refused at start: ``check_composition``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from clipline.errors import UsageError

# Where the residual blocks of each tower kind live: open_clip's Transformer (both towers of CLIP, the vision tower
# of CustomTextCLIP), open_clip's ModifiedResNet stages, Hugging Face encoders (BERT/RoBERTa `encoder.layer`,
# T5 `block`, `layers`), timm's ViT/ConvNeXt (`blocks`, `stages`).
BLOCK_LIST_NAMES = ("resblocks", "layer", "layers", "block", "blocks", "stages")


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """Every residual block of every tower: the children of each ModuleList named like a block list, outermost
    lists first (a list nested inside a block that is already wrapped is left to its block)."""
    blocks, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or name.rsplit(".", 1)[-1] not in BLOCK_LIST_NAMES:
            continue
        if any(name.startswith(prefix + ".") for prefix in seen):
            continue
        seen.add(name)
        blocks.extend(b for b in module if any(True for _ in b.parameters()))
    return blocks


def replicated_params(model: nn.Module) -> set[nn.Parameter]:
    """Parameters fully_shard cannot shard (0-dim: the logit scale and bias): kept whole on every rank."""
    return {p for p in model.parameters() if p.ndim == 0}


def mixed_precision(precision: str):
    """bf16 parameters and compute with fp32 gradient reduction under bf16; exact fp32 otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(net: nn.Module, precision: str, reshard_after_forward: bool = True, compile: bool = False,
                log=print) -> nn.Module:
    """fully_shard each block (compiled first when ``compile``), then the root; returns ``net`` itself, now sharded.
    Activation checkpointing (model.grad_checkpointing) is the towers' own per-block torch.utils.checkpoint,
    which runs the sharded block's forward again in backward, all-gather included."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(precision)
    blocks = find_blocks(net)
    if not blocks:
        log(f"train.parallel=fsdp: no residual block list ({', '.join(BLOCK_LIST_NAMES)}) found in "
            f"{type(net).__name__}; sharding the model as one unit (memory is still split, but every rank gathers "
            f"all parameters at once)")
    for block in blocks:
        if compile:
            block.compile()
        fully_shard(block, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(net, reshard_after_forward=reshard_after_forward, mp_policy=policy,
                ignored_params=replicated_params(net))
    return net


def is_sharded(t: torch.Tensor | None) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over sharded (DTensor) and replicated gradients together: the total norm of
    the whole gradient, the same on every rank, and every gradient scaled by the same factor."""
    with_grad = [p for p in params if p.grad is not None]
    sharded = [p for p in with_grad if is_sharded(p.grad)]
    whole = [p for p in with_grad if not is_sharded(p.grad)]
    squares = torch.zeros((), dtype=torch.float32)
    if sharded:
        norm = torch.nn.utils.get_total_norm([p.grad for p in sharded])
        squares = squares + norm.full_tensor().float().cpu() ** 2  # reduced over the ranks' shards
    if whole:
        squares = squares + torch.nn.utils.get_total_norm([p.grad for p in whole]).float().cpu() ** 2
    total = squares.sqrt()
    for group in (sharded, whole):
        if group:  # scales each parameter's .grad
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total.to(group[0].grad.device))
    return total


def average_replicated_grads(net: nn.Module, world_size: int) -> None:
    """Average the replicated (unsharded) parameters' gradients over ranks; FSDP reduces the sharded ones."""
    grads = [p.grad for p in net.parameters() if p.grad is not None and not is_sharded(p.grad)]
    if world_size == 1 or not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world_size
    for g, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(averaged)


def check_composition(cfg, precision: str, device_type: str) -> None:
    """Raise one UsageError line naming the first option that does not compose with train.parallel=fsdp, and why.
    Composes: the clip and siglip losses (plain and tiled), exact accumulation, LiT locks, SLIP, grad clipping,
    model.grad_checkpointing, train.compile (per block), bf16 and fp32."""
    tc, mc = cfg.train, cfg.model
    refusals = [
        (tc.queue_size or tc.distill_alpha, "train.queue_size / train.distill_alpha",
         "the momentum encoder is an unsharded copy of the whole model on every rank, which undoes FSDP's saving"),
        (mc.lora_image or mc.lora_text, "model.lora_image / model.lora_text",
         "peft's parameter adapters (in_proj_weight) are not sharded by fully_shard, and LoRA's small trainable "
         "set already fits under DDP"),
        (tc.eval_every, "train.eval_every",
         "in-loop eval runs on rank 0 alone and the sharded model needs every rank for each forward; evaluate the "
         "checkpoints' consolidated weights with clipline eval"),
        (precision == "fp16" and device_type == "cuda", "train.precision=fp16",
         "the loss scaler's overflow check would see each rank's shard alone and ranks could skip different steps; "
         "use train.precision=bf16"),
    ]
    for bad, option, why in refusals:
        if bad:
            raise UsageError(f"{option} does not compose with train.parallel=fsdp: {why}; turn it off or use "
                             f"train.parallel=ddp")


def sharded_state(net: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Model and optimizer state keyed by parameter names, as DTensor shards: what each rank writes to DCP."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(net, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def load_sharded_state(checkpoint: str | Path, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint's shards into this run's sharded model and optimizer; DCP reshards when the checkpoint
    was written at another world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from clipline.checkpoint import SHARDS

    state = sharded_state(net, optimizer)  # the layout to load into: this world size's shards
    dcp.load(state, checkpoint_id=str(Path(checkpoint) / SHARDS))
    set_state_dict(net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_weights(net: nn.Module, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights under plain open_clip names, gathered to rank 0 on the CPU (an empty dict on the
    other ranks). Collective: every rank calls it. ``net`` is ``model`` or SLIP's wrapper holding it as .model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if net is not model:
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return {k: v.detach().contiguous() for k, v in state.items()}
