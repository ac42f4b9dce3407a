"""Activation recomputation by memory: which decoder layers keep their activations, which recompute them in
the backward, and whether the recomputed layers' inputs wait in pinned CPU memory; with ``auto``, what the
memory left over keeps instead of computing it again (dequantized 4-bit weights, GLU outputs).

`plan_recompute` estimates, from the model's config, what one decoder layer keeps for the backward per
micro-batch and what the step needs besides (optimizer state, backward temporaries, the loss chunks). With
``auto`` it keeps as many layers as fit in the free memory and recomputes the rest; when even recomputing
every layer does not fit, the layer inputs go to pinned CPU memory (``offload``). ``full`` recomputes every
layer, ``none`` none, ``offload`` recomputes every layer and offloads its input. Recomputing a layer costs
one more forward of it; the embedding, the final norm and the loss are never recomputed.

`apply_recompute` sets it on transformers' decoder layers (``GradientCheckpointingLayer``), per layer:
non-reentrant `torch.utils.checkpoint` for recomputed layers, `OffloadedRecompute` for offloaded ones.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from forge.models.fused_forwards import keep_glu_output, recomputation, up_outputs
from forge.models.projections import dequantized_bytes, keep_dequantized
from forge.train.link import LinkSpeed, measure_link
from forge.train.memory import free_memory_bytes

HEADROOM = 0.9  # share of the free memory the plan may fill (the rest absorbs allocator fragmentation)
# The up-projection outputs' copies to pinned memory may take this much longer than the forward's GEMMs
# (they run on into the loss and the first layers' backward, which need the copies of the last layers only).
COPY_SLACK = 1.2
MODES = ("auto", "none", "full", "offload")


@dataclass(frozen=True)
class RecomputePlan:
    """The decision: `recompute` holds the decoder-layer indices recomputed in the backward; `offload` says
    their inputs live in pinned CPU memory. With ``auto`` and memory to spare once every layer keeps its
    activations: `dequantized` layers keep their 4-bit weights dequantized across steps and `glu_kept`
    layers keep their MLP's GLU output for the backward (both instead of computing them again). Offloaded
    `up_offloaded` layers send their MLP's up-projection output to pinned memory too (their recomputation
    reads it instead of running that GEMM again)."""

    layers: int
    recompute: tuple[int, ...]
    offload: bool
    reason: str
    dequantized: tuple[int, ...] = ()
    glu_kept: tuple[int, ...] = ()
    up_offloaded: tuple[int, ...] = ()

    @property
    def mode(self) -> str:
        """none, partial, full or offload."""
        if self.offload:
            return "offload"
        if not self.recompute:
            return "none"
        return "full" if len(self.recompute) == self.layers else "partial"

    def line(self) -> str:
        """e.g. 'activation checkpointing: partial (recompute 12 of 32 layers; needs ~61.2 GiB, ...)'."""
        what = f"recompute {len(self.recompute)} of {self.layers} layers"
        if self.offload:
            what += ", their inputs offloaded to pinned CPU memory"
            if self.up_offloaded:
                what += f" (and the MLP's up-projection output of {len(self.up_offloaded)})"
        spare = []
        if self.dequantized:
            spare.append(f"dequantized 4-bit weights of {len(self.dequantized)} layers")
        if self.glu_kept:
            spare.append(f"GLU outputs of {len(self.glu_kept)} layers")
        if spare:
            what += "; spare memory keeps the " + " and the ".join(spare)
        return f"activation checkpointing: {self.mode} ({what}; {self.reason})"


def _dims(config) -> tuple[int, int, int, int, int]:
    """(hidden, q width, kv width, intermediate, layers) of a decoder-only config."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    return hidden, heads * head_dim, kv_heads * head_dim, inter, config.num_hidden_layers


def layer_activation_bytes(config, tokens: int, act_bytes: int, fused: bool) -> int:
    """Bytes one decoder layer keeps for its backward over `tokens` tokens, without recomputation.

    Forge's fused path keeps: the two norm inputs and outputs, q/k/v after RoPE, the attention output twice
    (attention's own copy and the O projection's input) and the MLP's gate and up outputs: 4h + 3q + 2kv + 2i
    values a token. transformers + PEFT keep more (the LoRA inputs, the activation's input and output, the
    product before the down projection): about 10h + 4i.
    """
    hidden, q, kv, inter, _ = _dims(config)
    per_token = 4 * hidden + 3 * q + 2 * kv + 2 * inter if fused else 10 * hidden + 4 * inter
    return tokens * per_token * act_bytes


def glu_output_bytes(config, tokens: int, act_bytes: int) -> int:
    """Bytes one fused MLP keeps more when it keeps its GLU output act(gate) * up for the backward."""
    return tokens * _dims(config)[3] * act_bytes


def layer_input_bytes(config, tokens: int, act_bytes: int) -> int:
    """Bytes of one decoder layer's input (what a recomputed layer keeps)."""
    return tokens * config.hidden_size * act_bytes


def step_workspace_bytes(config, tokens: int, act_bytes: int, trainable: int) -> int:
    """Bytes the step needs besides the kept activations: fp32 master, gradient and two AdamW moments per
    trainable parameter, the backward's temporaries of one layer (about 4 intermediate + 4 hidden values a
    token), and the loss: the hidden states' gradient plus one logits chunk about as large (fp32)."""
    hidden, _, _, inter, _ = _dims(config)
    backward = tokens * (4 * inter + 4 * hidden) * act_bytes
    loss = tokens * hidden * (act_bytes + 4) * 2
    return 16 * trainable + backward + loss


def plan_recompute(
    setting: str,
    config,
    tokens: int,
    act_bytes: int,
    trainable: int,
    free_bytes: int | None,
    fused: bool,
    can_offload: bool,
    dequantized_layer_bytes: int = 0,
) -> RecomputePlan:
    """The plan for `setting` (auto | none | full | offload) for micro-batches of `tokens` tokens.

    auto keeps layers 0..k-1 and recomputes the last ones (any choice costs the same; the earliest layers'
    backward comes last, when the memory of the others is already freed) with k as large as the free
    memory allows; offload when even full recomputation does not fit and the device can offload (CUDA).
    When every layer keeps its activations, auto spends what is left of the budget, in this order (most
    time saved per byte first): keeping the 4-bit weights of a layer dequantized (`dequantized_layer_bytes`
    a layer, 0 without 4-bit weights; saves two dequantizations a step), then the fused MLP's GLU output
    (saves recomputing it and its down-adapter product in the backward).
    """
    layers = config.num_hidden_layers
    every = tuple(range(layers))
    if setting not in MODES:
        raise ValueError(f"train.gradient_checkpointing: {setting!r} is not one of {', '.join(MODES)}")
    if setting == "none":
        return RecomputePlan(layers, (), False, "train.gradient_checkpointing=none")
    if setting == "full":
        return RecomputePlan(layers, every, False, "train.gradient_checkpointing=full")
    if setting == "offload":
        if not can_offload:
            return RecomputePlan(layers, every, False, "offload needs a CUDA device; recomputing instead")
        return RecomputePlan(layers, every, True, "train.gradient_checkpointing=offload", up_offloaded=every)
    kept = layer_activation_bytes(config, tokens, act_bytes, fused)
    small = layer_input_bytes(config, tokens, act_bytes)
    fixed = step_workspace_bytes(config, tokens, act_bytes, trainable)
    need = fixed + layers * kept
    if free_bytes is None:
        return RecomputePlan(layers, (), False, "free memory unknown")
    budget = HEADROOM * free_bytes - fixed
    gib = 2**30
    why = f"needs ~{need / gib:.1f} GiB without recomputation, {free_bytes / gib:.1f} GiB free"
    if layers * kept <= budget:  # auto (the other settings returned above)
        spare = budget - layers * kept
        per_layer = dequantized_layer_bytes
        dequantized = min(layers, int(spare // per_layer)) if per_layer > 0 else 0
        spare -= dequantized * per_layer
        glu = min(layers, int(spare // glu_output_bytes(config, tokens, act_bytes))) if fused else 0
        return RecomputePlan(layers, (), False, why, tuple(range(dequantized)), tuple(range(glu)))
    # k kept layers + (layers - k) inputs + one layer's activations while it is recomputed
    keep = int((budget - layers * small - kept) // max(kept - small, 1))
    if keep > 0:
        return RecomputePlan(layers, tuple(range(keep, layers)), False, why)
    if layers * small + kept <= budget or not can_offload:
        return RecomputePlan(layers, every, False, why)
    return RecomputePlan(layers, every, True, why, up_offloaded=every)


def up_offload_layers(config, tokens: int, act_bytes: int, link: LinkSpeed) -> tuple[int, ...]:
    """The offloaded layers that also send their MLP's up-projection output to pinned memory: as many layers
    as the link carries during the forward (a layer's GEMM time at the measured matmul rate, times
    COPY_SLACK, less its input's copy), spread evenly over the layers so that the copies never fall behind
    by more than about one of them (the forward waits for copies HELD_LAYERS layers old), and the last
    layer, which keeps the output on the device."""
    hidden, q, kv, inter, layers = _dims(config)
    forward_s = 2 * tokens * (hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter) / link.matmul_flops_per_s
    input_s = layer_input_bytes(config, tokens, act_bytes) / link.copy_bytes_per_s
    up_s = glu_output_bytes(config, tokens, act_bytes) / link.copy_bytes_per_s
    count = min(layers - 1, max(0, int(layers * (COPY_SLACK * forward_s - input_s) // up_s)))
    return (*(k * (layers - 1) // count for k in range(count)), layers - 1)


def plan_for_model(
    model: torch.nn.Module, setting: str, tokens: int, device: torch.device, act_bytes: int
) -> RecomputePlan:
    """`plan_recompute` for a loaded (PEFT-wrapped, maybe patched) model on `device`, with the memory free now;
    an offloading plan's up-projection outputs by this GPU's link (`measure_link`, `up_offload_layers`)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    fused = any(getattr(m, "_forge_family", None) is not None for m in hf.modules())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    free = free_memory_bytes(device)
    layers = decoder_layers(model)
    dense = max((dequantized_bytes(layer, act_bytes) for layer in layers), default=0) if fused else 0
    plan = plan_recompute(setting, hf.config, tokens, act_bytes, trainable, free, fused, device.type == "cuda", dense)
    if not (plan.offload and fused):
        return dataclasses.replace(plan, up_offloaded=())
    link = measure_link(device)
    ups = up_offload_layers(hf.config, tokens, act_bytes, link)
    return dataclasses.replace(plan, up_offloaded=ups, reason=f"{plan.reason}; {link.line()}")


def decoder_layers(model: torch.nn.Module) -> list[GradientCheckpointingLayer]:
    """The model's decoder layers in order (PEFT-wrapped or not)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [m for m in hf.modules() if isinstance(m, GradientCheckpointingLayer)]


def apply_recompute(model: torch.nn.Module, plan: RecomputePlan) -> None:
    """Set each decoder layer to keep, recompute, or recompute with an offloaded input, as planned, and to
    keep its dequantized 4-bit weights and its GLU output where the plan says so."""
    layers = decoder_layers(model)
    if len(layers) != plan.layers:
        raise ValueError(f"the plan is for {plan.layers} decoder layers, the model has {len(layers)}")
    chosen = set(plan.recompute)
    if chosen:
        model.config.use_cache = False
    for index in plan.dequantized:
        keep_dequantized(layers[index])
    for index in plan.glu_kept:
        keep_glu_output(layers[index])
    up_kept, last = set(plan.up_offloaded), max(plan.recompute, default=-1)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index in chosen
        if index in chosen and plan.offload:
            layer._gradient_checkpointing_func = functools.partial(
                offloaded_recompute, keep_up=index in up_kept, first_back=index == last
            )
        elif index in chosen:
            layer._gradient_checkpointing_func = functools.partial(
                torch.utils.checkpoint.checkpoint, use_reentrant=False, context_fn=_contexts
            )


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """torch.utils.checkpoint's context_fn: nothing around the forward, `recomputation` around its rerun."""
    return contextlib.nullcontext(), recomputation()


class OffloadedRecompute(torch.autograd.Function):
    """Run a layer without keeping its activations; keep only its input, copied to pinned CPU memory on a
    side stream (the copy overlaps the next layers' compute), and recompute the layer in the backward.
    With `keep_up`, its MLP's up-projection output goes to pinned memory too, and the recomputation reads
    it instead of running the up GEMM again. The `first_back` layer (the last offloaded one: its backward
    comes first) keeps both on the device instead.

    The copies back are prefetched: a layer whose input is the previous offloaded layer's output links to it,
    and its backward starts that layer's host-to-device copies on the side stream before recomputing itself,
    so they overlap this layer's recomputation and backward instead of stalling the compute stream.
    No host sync anywhere: the streams wait for each other on the device (`HostCopy`). Gradients reach the
    layer's trainable parameters through the recomputed graph, as in any checkpointing; the RNG state is
    restored for the recomputation (dropout gives the same mask).
    """

    @staticmethod
    def forward(ctx, run, hidden: torch.Tensor, previous, keep_up: bool, first_back: bool):
        ctx.run, ctx.device, ctx.previous = run, hidden.device, previous
        ctx.rng = torch.cuda.get_rng_state(hidden.device)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        ctx.up = UpOutputs(on_device=first_back) if keep_up else None
        _copies_in_flight(hidden.device).next_layer()
        with torch.no_grad(), up_outputs(ctx.up):
            out = run(hidden)
        ctx.input = hidden.detach() if first_back else HostCopy(hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        _copies_in_flight(ctx.device).release_all()  # the forward's copies out are done before any copy back
        hidden = _take(ctx.input).requires_grad_(True)
        ctx.input = None
        if ctx.previous is not None:  # the layer before runs its backward next: bring its tensors now
            _prefetch(ctx.previous)
            ctx.previous = None
        rng_now, cpu_now = torch.cuda.get_rng_state(ctx.device), torch.get_rng_state()
        torch.cuda.set_rng_state(ctx.rng, ctx.device)
        torch.set_rng_state(ctx.cpu_rng)
        enabled, dtype = ctx.autocast
        with (
            torch.enable_grad(),
            torch.autocast("cuda", dtype=dtype, enabled=enabled),
            recomputation(),
            up_outputs(ctx.up),
        ):
            out = ctx.run(hidden)
        ctx.up = None
        torch.cuda.set_rng_state(rng_now, ctx.device)
        torch.set_rng_state(cpu_now)
        torch.autograd.backward(out, grad_out)
        return None, hidden.grad, None, None, None


def _prefetch(ctx) -> None:
    """Start copying an offloaded layer's input (and up-projection output) back to the GPU."""
    if isinstance(ctx.input, HostCopy):
        ctx.input.prefetch()
    if ctx.up is not None:
        ctx.up.prefetch()


def _take(kept: torch.Tensor | HostCopy) -> torch.Tensor:
    return kept.take() if isinstance(kept, HostCopy) else kept


# Layers whose forward copies to pinned memory may still run while a layer's forward starts. Each copy's
# source stays referenced until then (`CopiesInFlight`); 3 is more than the copies lag behind the forward
# on an H100 (55 GB/s), so the compute stream does not wait for them.
HELD_LAYERS = 3


class CopiesInFlight:
    """The device tensors of one GPU being copied to pinned memory in the forward, by layer.

    A source is freed only after the compute stream waits for the end of its copy: `HELD_LAYERS` layers
    later, or when the backward starts. Its memory is then reusable at once, and counts in the peak
    allocation while it is held. (`record_stream` instead would free it on the host at once but keep its
    block from reuse until the GPU passed the copy; the host runs tens of ms ahead of the GPU, so the
    allocator would map new memory meanwhile: reserved memory that no peak-allocation figure shows.)
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.layers: collections.deque[list[tuple[torch.Tensor, torch.cuda.Event]]] = collections.deque([[]])

    def next_layer(self) -> None:
        """A layer's forward starts: release the copies of the layer HELD_LAYERS before it."""
        self.layers.append([])
        while len(self.layers) > HELD_LAYERS:
            self._release(self.layers.popleft())

    def hold(self, source: torch.Tensor, copied: torch.cuda.Event) -> None:
        self.layers[-1].append((source, copied))

    def release_all(self) -> None:
        while self.layers:
            self._release(self.layers.popleft())
        self.layers.append([])

    def _release(self, layer: list[tuple[torch.Tensor, torch.cuda.Event]]) -> None:
        if layer:  # the copy stream runs in order: the layer's last copy ends after the others
            torch.cuda.current_stream(self.device).wait_event(layer[-1][1])
        layer.clear()


class HostCopy:
    """A device tensor copied to pinned CPU memory on the side stream, and back on demand, with no host sync.

    Every device tensor involved belongs to the compute stream: the copy out keeps its source alive until the
    compute stream waited for the copy (`CopiesInFlight`); the copy back writes into memory allocated on the
    compute stream, after the copy stream waited for the compute stream's work so far (the block's earlier
    users), and the compute stream waits for the copy before it reads. No `record_stream`, no side-stream
    memory pool."""

    def __init__(self, tensor: torch.Tensor):
        stream = _copy_stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        self.device = tensor.device
        self.host: torch.Tensor | None = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            self.host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        _copies_in_flight(tensor.device).hold(tensor, copied)
        self.gpu: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None

    def prefetch(self) -> None:
        """Start the copy back to the GPU on the side stream (once); it starts when the compute stream gets here."""
        if self.gpu is not None or self.host is None:
            return
        compute, stream = torch.cuda.current_stream(self.device), _copy_stream(self.device)
        self.gpu = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        stream.wait_stream(compute)
        with torch.cuda.stream(stream):
            self.gpu.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def take(self) -> torch.Tensor:
        """The tensor back on the GPU, ready for the compute stream (once)."""
        self.prefetch()
        torch.cuda.current_stream(self.device).wait_event(self.ready)
        tensor, self.gpu, self.ready, self.host = self.gpu, None, None, None
        return tensor


class UpOutputs:
    """An offloaded layer's `UpOutputStore`: the MLP's up-projection output in pinned CPU memory (a
    `HostCopy`), or kept on the device as it is (`on_device`, for the layer whose backward comes first)."""

    def __init__(self, on_device: bool):
        self.on_device = on_device
        self.kept: torch.Tensor | HostCopy | None = None

    def put(self, up: torch.Tensor) -> None:
        self.kept = up if self.on_device else HostCopy(up)

    def prefetch(self) -> None:
        if isinstance(self.kept, HostCopy):
            self.kept.prefetch()

    def take(self) -> torch.Tensor:
        kept, self.kept = self.kept, None
        if kept is None:
            raise RuntimeError("the recomputed MLP found no up-projection output from its forward")
        return _take(kept)


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream every offload copy of `device` runs on."""
    return torch.cuda.Stream(device)


@functools.cache
def _copies_in_flight(device: torch.device) -> CopiesInFlight:
    """`device`'s forward copies whose sources are still held."""
    return CopiesInFlight(device)


def offloaded_recompute(run, hidden: torch.Tensor, *args, keep_up: bool = False, first_back: bool = False):
    """transformers' `_gradient_checkpointing_func` signature: run(hidden, *args) -> the layer's output.
    keep_up: keep the MLP's up-projection output aside for the recomputation; first_back: the layer whose
    backward runs first, which keeps its input (and up output) on the device."""
    if args:
        run = functools.partial(_with_args, run, args)
    previous = hidden.grad_fn if type(hidden.grad_fn) is OffloadedRecompute._backward_cls else None
    if not hidden.requires_grad:  # the first layer's input (frozen embeddings): its adapters still need grads
        hidden = hidden.detach().requires_grad_(True)
    return OffloadedRecompute.apply(run, hidden, previous, keep_up, first_back)


def _with_args(run, args, hidden):
    return run(hidden, *args)
