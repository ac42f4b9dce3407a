"""The training loop, top to bottom: resume, step, log, evaluate, stop early, checkpoint."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from forge.config import TrainConfig
from forge.data.shards import IGNORE_INDEX, TokenSplit
from forge.kernels import keep_compute_copies, refresh_compute_copies
from forge.train.batches import BatchOrder, make_batch, masked_batch, sequence_length, sequence_targets
from forge.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from forge.train.distributed import SINGLE, Parallel, clip_gradients
from forge.train.loss import count_targets, evaluate, summed_loss
from forge.train.metrics import MetricsLog
from forge.train.optim import make_optimizer, make_scheduler
from forge.train.precision import Precision
from forge.train.progress import TrainProgress
from forge.train.scalars import DeviceScalars

CHECKPOINTS = "checkpoints"


@dataclass
class LoopState:
    """The loop's counters; saved in every checkpoint, returned at the end."""

    step: int = 0
    total_steps: int = 0
    tokens: int = 0  # input tokens trained on, padding excluded
    target_tokens: int = 0  # tokens that carried a loss
    train_seconds: float = 0.0  # time in optimizer steps, evaluation excluded
    train_loss: float | None = None
    eval_loss: float | None = None
    initial_eval_loss: float | None = None
    best_eval_loss: float | None = None
    evals_since_best: int = 0
    early_stopped: bool = False
    resumed_from: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0


@dataclass
class StepResult:
    """One optimizer step: its loss per target token and gradient norm (still on the device) and targets."""

    scalars: DeviceScalars
    targets: int

    def values(self) -> tuple[float, float]:
        """(loss per target token, grad norm): waits for this step's device work, not for later steps'."""
        loss, grad_norm = self.scalars.values()
        return loss, grad_norm


@dataclass
class QueuedStep:
    """A step the loop has queued and not yet reported: what its log line needs besides the device values."""

    step: int
    lr: float
    tokens: int
    result: StepResult


def train_step(
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    max_grad_norm: float | None,
    precision: Precision,
    device: torch.device,
    parallel: Parallel = SINGLE,
    targets: int | None = None,
) -> StepResult:
    """One optimizer step over the micro-batches, queued without a host sync (the fp16 GradScaler aside).

    Each micro-batch's summed loss is divided by the target tokens of the whole accumulated batch, so the
    gradient is that of one big batch whatever the split into micro-batches. With several processes the
    micro-batches are this rank's share and `targets` counts the whole step on all ranks; the loss is
    scaled by the world size because DDP and FSDP average the ranks' gradients (the sum is wanted).
    """
    if targets is None:
        targets = sum(count_targets(b) for b in micro_batches)
    forward = parallel.forward_module(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    with keep_compute_copies():  # the adapters' compute-dtype copies: one for all the step's forwards at least
        for i, batch in enumerate(micro_batches):
            with parallel.sync(last=i == len(micro_batches) - 1):
                loss_sum = summed_loss(forward, batch, precision, device)
                scaled = loss_sum * parallel.world / max(targets, 1)
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total += loss_sum.detach()
    parallel.sum_(total)
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = clip_gradients(params, max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    refresh_compute_copies()  # copies kept across steps (`step_copies`) take the updated values
    optimizer.zero_grad(set_to_none=True)
    return StepResult(DeviceScalars(total / max(targets, 1), grad_norm), targets)


def step_copies(parallel: Parallel = SINGLE) -> AbstractContextManager:
    """The block to run training steps in: the adapters' compute-dtype copies are kept from step to step
    (`train_step` rewrites them after each update) instead of made in every forward. Not under FSDP, whose
    gathered parameters exist only during a forward or backward."""
    return nullcontext() if parallel.mode == "fsdp" else keep_compute_copies()


def train_loop(
    model: torch.nn.Module,
    train_split: TokenSplit,
    eval_split: TokenSplit,
    cfg: TrainConfig,
    *,
    precision: Precision,
    device: torch.device,
    pad_id: int,
    work: Path,
    log: Callable[[str], None],
    run_id: str = "",
    show_progress: bool = True,
    parallel: Parallel = SINGLE,
) -> LoopState:
    """Train `model` on the split until cfg's steps are done or early stopping triggers.

    Resumes from the newest checkpoint in `work/checkpoints` when there is one; writes metrics.jsonl and
    TensorBoard events into `work`. With several processes (`parallel`) every rank runs this loop on its
    share of each step; only rank 0 writes metrics and checkpoints.
    """
    order = BatchOrder(len(train_split), cfg.batch_size, cfg.grad_accum, cfg.seed)
    total = order.total_steps(cfg.epochs, cfg.max_steps)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_grad_scaler else None

    state = LoopState(total_steps=total)
    latest = latest_checkpoint(work / CHECKPOINTS)
    if latest is not None:
        state = LoopState(**load_checkpoint(latest, model, optimizer, scheduler, scaler))
        state.resumed_from = state.step
        log(f"resuming from checkpoint {latest.name} (step {state.step} of {total})")
    parallel.seed_rank(cfg.seed, state.step)

    metrics = None
    if parallel.is_main:
        metrics = MetricsLog(work, state.resumed_from, cfg.wandb_project, run_id, cfg.model_dump(mode="json"), log)
    has_eval = bool((eval_split.labels != IGNORE_INDEX).any())

    def run_eval() -> None:
        state.eval_loss = evaluate(model, eval_split, cfg.batch_size, pad_id, precision, device, parallel)
        if metrics is not None:
            metrics.write({"step": state.step, "eval_loss": state.eval_loss})
        log(f"step {state.step}/{total}: eval loss {state.eval_loss:.4f}")
        if state.best_eval_loss is None or state.eval_loss < state.best_eval_loss:
            state.best_eval_loss, state.evals_since_best = state.eval_loss, 0
            return
        state.evals_since_best += 1
        patience = cfg.early_stopping_patience
        if patience is not None and state.evals_since_best >= patience:
            state.early_stopped = True
            log(f"early stopping at step {state.step}: eval loss did not improve for {patience} evals")

    if not has_eval:
        log("eval split has no target tokens: no eval loss, no early stopping")
    elif state.step == 0:
        run_eval()
        state.initial_eval_loss = state.eval_loss

    model.train()
    try:
        with TrainProgress(total, state.step, show_progress and parallel.is_main) as bar, step_copies(parallel):

            def report(done: QueuedStep) -> None:
                """Log a finished step (reading its loss waits for that step only)."""
                loss, grad_norm = done.result.values()
                state.train_loss = loss
                if metrics is not None and (done.step % cfg.log_every == 0 or done.step == total):
                    metrics.write(
                        {
                            "step": done.step,
                            "epoch": round(order.epoch_at(done.step), 4),
                            "loss": loss,
                            "lr": done.lr,
                            "grad_norm": grad_norm,
                            "tokens": done.tokens,
                            "tokens_per_s": round(state.tokens_per_s, 1),
                        }
                    )
                bar.update(done.step, loss, done.lr, state.tokens_per_s, state.eval_loss)

            # Step N is reported once step N+1 is queued, so the GPU never waits for the host to read a loss;
            # before an eval, a checkpoint and at the end the queued step is reported (and so finished) first.
            queued: QueuedStep | None = None
            clock = time.perf_counter()
            while state.step < total and not state.early_stopped:
                indices = order.step(state.step)
                micro_batches = [  # an empty share runs a masked batch: every rank makes the same collectives
                    make_batch(train_split, idx, pad_id) if idx else masked_batch(train_split, indices[0][0], pad_id)
                    for idx in parallel.share(indices)
                ]
                step_targets = None
                if parallel.world > 1:  # the whole step's, counted from the split (every rank knows the order)
                    step_targets = sum(sequence_targets(train_split, i) for idx in indices for i in idx)
                lr = scheduler.get_last_lr()[0]
                result = train_step(
                    model, micro_batches, optimizer, scaler, cfg.max_grad_norm, precision, device,
                    parallel, step_targets,
                )
                scheduler.step()
                state.step += 1
                state.target_tokens += result.targets
                state.tokens += sum(sequence_length(train_split, i) for idx in indices for i in idx)
                if queued is not None:
                    report(queued)
                queued = QueuedStep(state.step, lr, state.tokens, result)

                evaluating = has_eval and (state.step % cfg.eval_every == 0 or state.step == total)
                saving = state.step % cfg.save_every == 0 and state.step < total
                if evaluating or saving or state.step == total:
                    report(queued)
                    queued = None
                now = time.perf_counter()
                state.train_seconds += now - clock
                if evaluating:
                    run_eval()
                    bar.update(state.step, state.train_loss, lr, state.tokens_per_s, state.eval_loss)
                if saving and not state.early_stopped and (parallel.is_main or parallel.mode == "fsdp"):
                    save_checkpoint(  # FSDP: every rank gathers shards
                        work / CHECKPOINTS, state.step, model, optimizer, scheduler, scaler, asdict(state),
                        write=parallel.is_main,
                    )
                clock = time.perf_counter() if evaluating or saving else now
    except KeyboardInterrupt:
        if parallel.is_main:
            latest = latest_checkpoint(work / CHECKPOINTS)
            where = f"checkpoint {latest.name}" if latest else "the start (no checkpoint yet)"
            log(f"interrupted at step {state.step}; running the same command again resumes from {where}")
        raise
    finally:
        if metrics is not None:
            metrics.close()
    return state
