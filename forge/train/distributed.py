"""Data-parallel training on one host: the process group, each rank's share of a step, DDP / FSDP2, sums.

torchrun starts one process per GPU (or per CPU slot without CUDA); every rank runs the same loop. The
step's sequences are the ones a single process would train on (`BatchOrder` is global); `rank_share`
deals them out, the loss is normalized by the target tokens of the whole step, and every rank scales its
loss by the world size so that DDP's and FSDP's gradient averaging yields the sum over all ranks: the
optimizer sees the 1-process gradient. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

FSDP_SHARE = 0.5  # auto: shard (FSDP) when the base's weights take more than this share of one GPU
RANK_SEED_STRIDE = 7_919  # ranks > 0 draw dropout from seed + rank * stride (+ step after a resume)


class _DDP(DistributedDataParallel):
    """DDP that still answers the one model question `causal_lm_loss` asks before calling it."""

    def get_input_embeddings(self) -> nn.Module:
        return self.module.get_input_embeddings()


@dataclass
class Parallel:
    """Where this process stands: its rank among `world`, the mode (single | ddp | fsdp), its device, and
    the module the training forward calls (the DDP wrapper; for FSDP and single, the model itself)."""

    rank: int = 0
    world: int = 1
    mode: str = "single"
    device: torch.device | None = None
    wrapper: nn.Module | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def forward_module(self, model: nn.Module) -> nn.Module:
        return self.wrapper if self.wrapper is not None else model

    def share(self, step: list[list[int]]) -> list[list[int]]:
        return rank_share(step, self.rank, self.world)

    def sync(self, last: bool) -> AbstractContextManager:
        """DDP reduces gradients only after the step's last micro-batch; FSDP reduce-scatters every one."""
        if self.mode == "ddp" and not last:
            return self.wrapper.no_sync()
        return contextlib.nullcontext()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all ranks (float64)."""
        if self.world == 1:
            return values
        return self.sum_(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over all ranks in place, without a host sync; returned for chaining."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def seed_rank(self, seed: int, step: int) -> None:
        """Give ranks > 0 their own dropout stream (rank 0 keeps the 1-process one, restored on resume)."""
        if self.rank > 0:
            torch.manual_seed(seed + self.rank * RANK_SEED_STRIDE + step)


SINGLE = Parallel()


def rank_share(step: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches of one step (lists of sequence indices); every rank gets as many.

    When the step's micro-batches divide evenly, rank r takes whole micro-batches r, r+world, ...
    (the per-GPU batch stays batch_size); otherwise every micro-batch is split, rank r taking its
    sequences r, r+world, ... A share can be empty: the rank then runs a masked batch (no gradient) so that
    all ranks make the same collective calls.
    """
    if world == 1:
        return step
    if len(step) % world == 0:
        return step[rank::world]
    return [micro[rank::world] for micro in step]


def choose_mode(setting: str, method: str, base_dir: Path, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(ddp | fsdp, why) for train.distributed: an explicit choice is checked, auto decides by method and size."""
    if setting == "fsdp" and method == "qlora":
        raise ValueError("train.distributed=fsdp: QLoRA's 4-bit base cannot be sharded by FSDP2; use ddp")
    if setting != "auto":
        return setting, f"train.distributed={setting}"
    if method == "full":
        return "fsdp", "full fine-tune: weights, gradients and optimizer states are sharded"
    if method == "qlora":
        return "ddp", "QLoRA's 4-bit base is replicated"
    if device.type != "cuda":
        return "ddp", "LoRA on CPU processes"
    weights = base_weight_bytes(base_dir, dtype)
    memory = torch.cuda.get_device_properties(device).total_memory
    mode = "fsdp" if weights > FSDP_SHARE * memory else "ddp"
    return mode, f"base weights {weights / 2**30:.1f} GiB, {memory / 2**30:.1f} GiB per GPU"


def base_weight_bytes(base_dir: Path, dtype: torch.dtype) -> int:
    """Bytes the base's weights take in `dtype`: the safetensors sizes rescaled from the stored dtype."""
    stored = json.loads((base_dir / "config.json").read_text())
    name = stored.get("dtype") or stored.get("torch_dtype") or "float32"
    stored_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(name), 4)
    size = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))
    return size * (torch.finfo(dtype).bits // 8) // stored_bytes


def start() -> Parallel:
    """Join the process group torchrun prepared (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on GPUs, gloo on CPU."""
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise ValueError(f"train.nproc={world}: only {torch.cuda.device_count()} CUDA devices are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Parallel(rank=rank, world=world, mode="single", device=device)  # wrap() sets the mode


def agree(value: Any) -> Any:
    """Rank 0's value, on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: nn.Module, parallel: Parallel, mode: str) -> Parallel:
    """Wrap the (already patched) model for `mode`; returns the Parallel the loop uses.

    ddp: a DDP wrapper over the trainable parameters (frozen weights are identical on every rank by
    construction and are not broadcast). fsdp: FSDP2 `fully_shard` on every decoder layer, then the root;
    parameters stay in their own dtypes (autocast does the casting, as on one GPU).
    """
    if mode == "ddp":
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        ids = [parallel.device] if parallel.device.type == "cuda" else None
        wrapper = _DDP(model, device_ids=ids)
        return Parallel(parallel.rank, parallel.world, "ddp", parallel.device, wrapper)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    mesh = init_device_mesh(parallel.device.type, (parallel.world,))
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"train.distributed=fsdp: no decoder layers found in {type(model).__name__}")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return Parallel(parallel.rank, parallel.world, "fsdp", parallel.device, None)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an FSDP shard is gathered: a collective), detached."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.full_tensor().detach()
    return tensor.detach()


def full_state(obj: Any) -> Any:
    """`obj` (nested dicts / lists / tuples) with every sharded tensor gathered onto the CPU (a collective)."""
    if isinstance(obj, torch.Tensor):
        return full(obj).cpu()
    if isinstance(obj, dict):
        return {k: full_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_state(v) for v in obj)
    return obj


def load_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, or into this rank's shard of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        value = distribute_tensor(
            value.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
    param.copy_(value)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict` of a whole (unsharded) state: turn each state tensor of a sharded
    parameter into the matching shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == p.shape:
                    state[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clip to max_norm (None: only measure) and return the total gradient norm over all ranks' shards, as a
    device tensor (reading it is left to the caller: no host sync here)."""
    from torch.distributed.tensor import DTensor

    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if _one_plain_group(grads):
        return _clip_one_group(grads, max_norm)
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def _one_plain_group(grads: list[torch.Tensor]) -> bool:
    """Whether every gradient is a plain (not sharded) tensor on one device in one dtype."""
    from torch.distributed.tensor import DTensor

    one_kind = len({(g.device, g.dtype) for g in grads}) == 1
    return one_kind and not any(isinstance(g, DTensor) for g in grads)


def _clip_one_group(grads: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """torch's foreach norm and clip for one device and dtype, without its per-tensor grouping and `.to()`
    calls (hundreds of small LoRA gradients make those milliseconds of host time): the same values."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    if max_norm is not None:
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coefficient)
    return norm


def quiet(_line: str) -> None:
    """The log of ranks > 0: rank 0 speaks for all."""


def rank_log(parallel: Parallel, log: Callable[[str], None]) -> Callable[[str], None]:
    return log if parallel.is_main else quiet
