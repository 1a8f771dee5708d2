"""K worker processes, one stage each, joined by a real ``torch.distributed`` group.

Per mini-batch of a *parallel* epoch every worker, at the same time:

1. runs its stage on its input -- the data (stage 0) or its auxiliary variable;
2. exchanges boundary tensors with its neighbours (``batch_isend_irecv``): it sends
   its (downsampled) output forward and its (downsampled) auxiliary variable backward;
3. takes one SGD step on its stage's weights and one RMSprop step on the rows of its
   auxiliary variable, on the penalty / AL objective (:mod:`.objectives`); the last
   stage's objective starts with the task loss (cross-entropy, or KL to teacher logits);
4. AL: updates its copy of the multipliers at its boundaries (both neighbours hold the
   same copy: they see the same residual).

A *serial* correction epoch (the hybrid schedule) gathers every stage's weights on
rank 0, trains the whole network there with ordinary forward-backward passes and data
augmentation (all the workers' threads), re-estimates the BatchNorm statistics of the
stitched network on un-augmented training inputs, and broadcasts the weights back; the
auxiliary variables are then re-initialised by a forward pass and the multipliers
reset. gloo on CPU; NCCL when there is one GPU per stage.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fl_ec.distill import augmented_views, kd_loss, recalibrate_batchnorm
from fl_ec.layer_parallel.collective import (
    TorchThreads,
    barrier,
    bn_buffers,
    broadcast_stages,
    from_last,
    restore_bn,
    save_stage_state,
    sum_over_ranks,
)
from fl_ec.layer_parallel.objectives import (
    BoundaryFilter,
    LPSettings,
    boundary_objective,
    update_multipliers,
)
from fl_ec.layer_parallel.stages import split_resnet, stage_keys
from fl_ec.models.spec import ArchSpec, build_from_state_dict

logger = logging.getLogger("fl_ec.layer_parallel")
RECALIBRATION_SAMPLES = 2048  # enough for BatchNorm statistics, a fraction of an epoch


@dataclass
class LPResult:
    state_dict: dict[str, torch.Tensor]
    stages: int
    epoch_seconds: list[float]
    epoch_kinds: list[str]  # "parallel" / "serial"
    boundary_bytes: list[int]  # bytes sent across stage boundaries, per epoch
    train_loss: list[float]  # last stage's task loss, per epoch
    checkpoints: list[dict[str, torch.Tensor]] = field(default_factory=list)


def usable_stages(requested: int, settings: LPSettings, num_blocks: int) -> tuple[int, str]:
    """How many stages this machine can run in parallel, and the backend."""
    use_nccl = settings.backend in ("auto", "nccl") and torch.cuda.device_count() >= requested
    if settings.backend == "nccl" and not use_nccl:
        logger.warning("lp: backend nccl needs %d GPUs; using gloo on CPU", requested)
    if use_nccl and requested > 1:
        return min(requested, num_blocks), "nccl"
    cores = os.cpu_count() or 1
    fit = max(1, min(requested, cores // max(1, settings.threads_per_worker), num_blocks))
    if fit < requested:
        logger.warning(
            "lp: %d stages requested but this machine fits %d (%d cores, %d thread(s) per "
            "worker, %d blocks); training with %d",
            requested,
            fit,
            cores,
            settings.threads_per_worker,
            num_blocks,
            fit,
        )
    return fit, "gloo"


def task_loss(logits: torch.Tensor, targets: torch.Tensor, settings: LPSettings) -> torch.Tensor:
    if settings.loss == "kl":
        return kd_loss(logits, targets, settings.temperature)
    return nn.functional.cross_entropy(logits, targets)


def serial_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    settings: LPSettings,
    epoch: int,
    device: torch.device | str = "cpu",
) -> float:
    """One ordinary forward-backward epoch over the whole network, with augmentation."""
    model.train()
    order = torch.randperm(
        len(inputs), generator=torch.Generator().manual_seed(settings.seed + epoch)
    )
    total, seen = 0.0, 0
    for step, index in enumerate(order.split(settings.batch_size)):
        x = inputs[index]
        if settings.augment:
            x = augmented_views(
                x, 1, settings.seed * 7919 + epoch * 100_003 + step, flip=settings.flip
            )
        x, y = x.to(device), targets[index].to(device)
        loss = task_loss(model(x), y, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(index)
        seen += len(index)
    return total / max(seen, 1)


def train_layer_parallel(
    model: nn.Module,
    spec: ArchSpec,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    settings: LPSettings,
    keep_checkpoints: bool = False,
) -> LPResult:
    """Train ``model`` (a CIFAR ResNet built from ``spec``) layer-parallel, in place."""
    stages, backend = usable_stages(settings.stages, settings, len(model.blocks))
    if settings.method == "al" and not settings.multipliers_act and stages > 1:
        logger.warning(
            "lp: method=al with %d parallel epoch(s) between serial corrections resets every "
            "multiplier before it is used, so it takes the penalty method's steps; set "
            "lp-parallel-epochs >= 2 for AL to act, or lp-method=penalty",
            settings.parallel_epochs,
        )
    init_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="fl-ec-lp-") as tmp:
        out = Path(tmp)
        args = (
            stages,
            backend,
            settings,
            spec.to_json(),
            init_state,
            inputs,
            targets,
            _free_port(),
            str(out),
            keep_checkpoints,
        )
        if stages == 1:
            _worker(0, *args)
        else:
            mp.spawn(_worker, args=args, nprocs=stages, join=True)
        stats = json.loads((out / "stats.json").read_text())
        final = _merge(out, stages, "final")
        checkpoints = (
            [_merge(out, stages, f"epoch{e}") for e in range(settings.epochs)]
            if keep_checkpoints
            else []
        )
    model.load_state_dict(final)
    return LPResult(
        final,
        stages,
        stats["epoch-seconds"],
        stats["epoch-kinds"],
        stats["boundary-bytes"],
        stats["train-loss"],
        checkpoints,
    )


def _merge(out: Path, stages: int, tag: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for rank in range(stages):
        state.update(torch.load(out / f"{tag}-rank{rank}.pt", weights_only=True))
    return state


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    rank,
    world,
    backend,
    settings,
    spec_json,
    init_state,
    inputs,
    targets,
    port,
    out_dir,
    keep_checkpoints,
):  # noqa: ANN001, PLR0913
    torch.set_num_threads(settings.threads_per_worker)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    torch.manual_seed(settings.seed)
    model = build_from_state_dict(ArchSpec.from_json(spec_json), init_state).to(device)
    stages = split_resnet(model, world)
    keys = stage_keys(model, stages)
    mine = stages[rank]
    sgd = dict(lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    optimizer = torch.optim.SGD(mine.parameters(), **sgd)
    serial_optimizer = torch.optim.SGD(model.parameters(), **sgd) if rank == 0 else None
    boundary = BoundaryFilter(settings.downsample, settings.boundary_bits)
    state = _BoundaryState(rank, world, stages, inputs, settings, boundary, device)
    epoch_seconds, kinds, sent_bytes, losses = [], [], [], []
    parallel_done = 0
    for epoch in range(settings.epochs):
        barrier(world)
        start = time.perf_counter()
        settings.apply_lr(optimizer, epoch)
        if serial_optimizer is not None:
            settings.apply_lr(serial_optimizer, epoch)
        if settings.is_serial(epoch):
            loss = _serial_correction(
                rank, world, model, keys, serial_optimizer, inputs, targets, settings, epoch, device
            )
            # Rank 0 is idle now: the ranks that hold auxiliary variables share its
            # threads for the re-initialising forward pass (a 1-thread stage-0 pass over
            # 10k images took 7 s, a third of a serial epoch).
            with TorchThreads(max(1, settings.threads_per_worker * world // max(1, world - 1))):
                state.reinitialise(inputs)
            kinds.append("serial")
            sent = 0
        else:
            loss, sent = _parallel_epoch(
                rank,
                world,
                mine,
                optimizer,
                state,
                inputs,
                targets,
                settings,
                epoch,
                settings.beta(parallel_done),
                device,
            )
            parallel_done += 1
            kinds.append("parallel")
            if epoch == settings.epochs - 1:
                _finalise(rank, world, model, keys, inputs, settings, device)
        barrier(world)
        epoch_seconds.append(time.perf_counter() - start)
        sent_bytes.append(sum_over_ranks(sent, world))
        losses.append(from_last(loss, rank, world))
        if keep_checkpoints:
            save_stage_state(model, keys[rank], Path(out_dir) / f"epoch{epoch}-rank{rank}.pt")
    save_stage_state(model, keys[rank], Path(out_dir) / f"final-rank{rank}.pt")
    if rank == 0:
        stats = {
            "epoch-seconds": epoch_seconds,
            "epoch-kinds": kinds,
            "boundary-bytes": sent_bytes,
            "train-loss": losses,
        }
        (Path(out_dir) / "stats.json").write_text(json.dumps(stats))
    if world > 1:
        # No rank leaves while another still works: a peer closing its gloo connections
        # under a rank that is still writing can abort that rank ("terminate called
        # without an active exception", SIGABRT).
        barrier(world)
        dist.destroy_process_group()


class _BoundaryState:
    """Auxiliary variables (at this rank's input) and multiplier copies (both sides)."""

    def __init__(self, rank, world, stages, inputs, settings, boundary, device) -> None:  # noqa: ANN001
        self.rank, self.world, self.stages = rank, world, stages
        self.settings, self.boundary, self.device = settings, boundary, device
        self.aux = self.aux_sq = self.lam_in = self.lam_out = None
        self.reinitialise(inputs)

    def on_wire(self, aux: torch.Tensor) -> torch.Tensor:
        """The view of the auxiliary variable that is sent and enters the residual:
        the same resolution as the previous stage's pooled output."""
        return self.boundary.down(aux)

    @torch.no_grad()
    def reinitialise(self, inputs: torch.Tensor) -> None:
        """Aux = the forward activations at this rank's input; lambda = 0."""
        if self.rank > 0:
            prefix = self.stages[: self.rank]
            saved = bn_buffers(prefix)
            chunks = []
            for x in inputs.split(512):
                h = x.to(self.device)
                for stage in prefix:
                    stage.train()  # batch statistics, as the parallel steps will see
                    h = stage(h)
                chunks.append(h.cpu())
            restore_bn(saved)
            self.aux = torch.cat(chunks)
            self.aux_sq = torch.zeros_like(self.aux)
            if self.settings.method == "al":
                self.lam_in = torch.zeros((len(self.aux), *self.on_wire(self.aux[:1]).shape[1:]))
        if self.rank < self.world - 1 and self.settings.method == "al":
            with torch.no_grad():
                h = inputs[:2].to(self.device)
                for stage in self.stages[: self.rank + 1]:
                    h = stage.eval()(h)
            self.lam_out = torch.zeros((len(inputs), *self.boundary.down(h).shape[1:]))


def _parallel_epoch(
    rank, world, stage, optimizer, state, inputs, targets, settings, epoch, beta, device
):  # noqa: ANN001, PLR0913
    stage.train()
    order = torch.randperm(
        len(inputs), generator=torch.Generator().manual_seed(settings.seed + epoch)
    )
    total, seen, sent = 0.0, 0, 0
    for index in order.split(settings.batch_size):
        if rank == 0:
            x_in = inputs[index].to(device)
        else:
            # The auxiliary variable lives at full resolution: the stage trains on sharp
            # inputs, and only the pooled view crosses the wire and enters the residual.
            x_in = state.aux[index].to(device).requires_grad_(True)
            aux_sent = state.on_wire(x_in)
        out = stage(x_in)
        produced = state.boundary.down(out) if rank < world - 1 else None
        # Above: my output goes up, the next stage's auxiliary variable comes back.
        # Below: my auxiliary variable goes down, the previous stage's output comes up.
        above_in = state.boundary.buffers_like(produced) if produced is not None else []
        below_in = state.boundary.buffers_like(aux_sent) if rank > 0 else []
        ops = []
        if rank < world - 1:
            payload = state.boundary.encode(produced)
            ops += [dist.P2POp(dist.isend, t, rank + 1) for t in payload]
            ops += [dist.P2POp(dist.irecv, t, rank + 1) for t in above_in]
            sent += sum(t.numel() * t.element_size() for t in payload)
        if rank > 0:
            payload = state.boundary.encode(aux_sent)
            ops += [dist.P2POp(dist.irecv, t, rank - 1) for t in below_in]
            ops += [dist.P2POp(dist.isend, t, rank - 1) for t in payload]
            sent += sum(t.numel() * t.element_size() for t in payload)
        for request in dist.batch_isend_irecv(ops) if ops else []:
            request.wait()
        target_aux = state.boundary.decode(above_in, produced.shape) if above_in else None
        from_below = state.boundary.decode(below_in, aux_sent.shape) if below_in else None
        if rank == world - 1:
            loss = task_loss(out, targets[index].to(device), settings)
            total += float(loss.detach()) * len(index)
            seen += len(index)
        else:
            lam = state.lam_out[index].to(device) if state.lam_out is not None else None
            loss = boundary_objective(target_aux, produced, beta, lam)
        if rank > 0:
            lam = state.lam_in[index].to(device) if state.lam_in is not None else None
            loss = loss + boundary_objective(aux_sent, from_below, beta, lam)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            if rank > 0:  # RMSprop on the rows of the auxiliary variable
                grad = x_in.grad.cpu()
                sq = state.aux_sq[index].mul_(0.9).add_(0.1 * grad * grad)
                state.aux_sq[index] = sq
                state.aux[index] = state.aux[index] - settings.aux_lr * grad / (sq.sqrt() + 1e-8)
            if settings.method == "al":
                if rank < world - 1:
                    lam = state.lam_out[index]
                    update_multipliers(lam, target_aux.cpu(), produced.detach().cpu(), beta)
                    state.lam_out[index] = lam
                if rank > 0:
                    lam = state.lam_in[index]
                    update_multipliers(lam, aux_sent.detach().cpu(), from_below.cpu(), beta)
                    state.lam_in[index] = lam
    return (total / seen if seen else float("nan")), sent


def _serial_correction(
    rank, world, model, keys, optimizer, inputs, targets, settings, epoch, device
):  # noqa: ANN001, PLR0913
    losses = []

    def correct() -> None:
        losses.append(serial_epoch(model, optimizer, inputs, targets, settings, epoch, device))
        _recalibrate(model, inputs, settings, device)

    _on_rank0_then_share(rank, world, model, keys, settings, correct)
    return losses[0] if losses else float("nan")


def _finalise(rank, world, model, keys, inputs, settings, device) -> None:  # noqa: ANN001
    """After a parallel last epoch: stitch on rank 0, fix BN statistics, share back."""
    _on_rank0_then_share(
        rank, world, model, keys, settings, lambda: _recalibrate(model, inputs, settings, device)
    )


def _on_rank0_then_share(rank, world, model, keys, settings, work) -> None:  # noqa: ANN001
    """Gather every stage on every rank, run ``work`` on rank 0 with all the workers'
    threads (the others are idle meanwhile), then give everyone rank 0's weights."""
    broadcast_stages(model.state_dict(), keys, world)
    if rank == 0:
        with TorchThreads(settings.serial_threads or settings.threads_per_worker * world):
            work()
    if world > 1:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def _recalibrate(model: nn.Module, inputs: torch.Tensor, settings: LPSettings, device) -> None:  # noqa: ANN001
    """Re-estimate every BatchNorm's statistics on un-augmented training inputs.

    In parallel epochs stage k > 0 sees its auxiliary variables, not the previous
    stage's real outputs, so its running statistics describe the wrong inputs for the
    stitched network; a serial epoch only half-repairs them (an EMA). Measured on
    Fashion-MNIST (ResNet-8, K=2): 11% test accuracy after a serial epoch without this,
    67% with it.
    """
    chosen = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(settings.seed))
    recalibrate_batchnorm(model, inputs[chosen[:RECALIBRATION_SAMPLES]], device=device)
