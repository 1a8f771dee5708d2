"""The auxiliary-variable objectives of layer-parallel training, and boundary filters.

With stages ``F_1..F_K`` and auxiliary variables ``x_j`` for the activations at the
K-1 stage boundaries (``x_0`` = the input), training solves

    penalty:  min  L(F_K(x_{K-1}), y) + beta/2 * sum_j ||x_j - F_j(x_{j-1})||^2
    AL:       the same + sum_j <lambda_j, x_j - F_j(x_{j-1})>,
              lambda_j += beta * (x_j - F_j(x_{j-1}))   after each step

so each stage's weights (and the auxiliary variable at its input) form a sub-problem
that only needs its neighbours' boundary tensors: K workers solve them in parallel.

Choices (the paper leaves them open or tunes per dataset):

* the squared residual is **averaged over the activation's elements** (and over the
  batch), so beta means the same at every boundary whatever its size;
* **beta schedule**: ``beta_e = min(beta0 * beta_growth**e, beta_max)`` per parallel
  epoch -- a loose coupling first, so stages can move, then a tightening one so the
  stitched network agrees with the auxiliary variables; AL can use a smaller beta,
  since the multipliers absorb the remaining constraint violation;
* multipliers are updated with the residual of the step's forward pass (Jacobi
  style: no extra forward), and reset to zero whenever the auxiliary variables are
  re-initialised from a forward pass (the constraints then hold exactly);
* the auxiliary variables take **RMSprop steps** (per element, scale-free): their
  gradient's size depends on beta and on the boundary's size, a plain SGD step size
  would have to be retuned for each;
* a **downsampling filter** (average pooling by ``factor``) is applied before a
  boundary tensor is sent, so the bytes shrink by factor^2. The auxiliary variable
  lives at the stage input's full resolution, initialised from the real forward
  activations. Both sides pool their own copy and the residual is taken between
  pooled tensors, so the penalty constrains the low frequencies and the next stage
  trains on sharp inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F  # noqa: N812 - the universal alias

from fl_ec.bitpack import pack_codes, packed_size, unpack_codes
from fl_ec.errors import check_fields, one_of

METHODS = ("penalty", "al")
LOSSES = ("ce", "kl")
BOUNDARY_BITS = (32, 8, 6, 4)  # 32 = fp32; else unsigned codes, packed below 8 bits
LR_SCHEDULES = ("constant", "cosine")
BACKENDS = ("auto", "nccl", "gloo")
BOUNDARY_BITS_REASON = (
    "is not offered: set 32 (fp32 on the wire), 8, 6 or 4 "
    "(codes per sample's range: ~4x, 5.3x, 8x fewer boundary bytes)"
)


@dataclass(frozen=True)
class LPSettings:
    """Knobs of layer-parallel training.

    Construction checks every choice and range; a bad one raises
    :class:`~fl_ec.errors.SettingError` (a ``ValueError``) naming the field.
    :meth:`fl_ec.config.ExperimentConfig.lp_settings` builds it from a run-config.
    """

    stages: int = 2
    method: str = "penalty"  # "al" needs >= 2 parallel epochs per cycle (multipliers_act)
    epochs: int = 4
    parallel_epochs: int = 1  # parallel epochs per cycle, then serial_epochs
    serial_epochs: int = 1  # 0 = never correct serially
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    aux_lr: float = 0.01  # RMSprop step of the auxiliary variables (activation units)
    beta0: float = 1.0
    beta_growth: float = 2.0
    beta_max: float = 16.0
    downsample: int = 1  # 1 = off; 2 = 2x2 average pooling on the wire
    boundary_bits: int = 32  # 32 = fp32 on the wire; 8/6/4 = codes + per-sample range
    lr_schedule: str = "constant"  # or "cosine": per-epoch cosine decay of the weights' lr
    augment: bool = True  # random shifts (+ flips) in serial passes only
    flip: bool = True  # horizontal flips in the augmentation
    loss: str = "ce"  # "ce" on labels, or "kl" to teacher logits (distillation)
    temperature: float = 1.0
    threads_per_worker: int = 1
    serial_threads: int = 0  # threads of serial passes (0 = all workers' threads)
    backend: str = "auto"  # auto: nccl when every stage has a GPU, else gloo
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(
            self,
            (
                ("method", self.method in METHODS, one_of(METHODS)),
                ("loss", self.loss in LOSSES, one_of(LOSSES)),
                ("lr_schedule", self.lr_schedule in LR_SCHEDULES, one_of(LR_SCHEDULES)),
                ("backend", self.backend in BACKENDS, one_of(BACKENDS)),
                ("stages", self.stages >= 1, "must be >= 1"),
                ("epochs", self.epochs >= 1, "must be >= 1"),
                ("parallel_epochs", self.parallel_epochs >= 1, "must be >= 1"),
                ("serial_epochs", self.serial_epochs >= 0, "must be >= 0"),
                ("downsample", self.downsample >= 1, "must be >= 1 (1: off)"),
                ("boundary_bits", self.boundary_bits in BOUNDARY_BITS, BOUNDARY_BITS_REASON),
            ),
        )

    def lr_at(self, epoch: int) -> float:
        """The weights' learning rate in epoch ``epoch`` (0-based) of ``epochs``."""
        if self.lr_schedule == "constant":
            return self.lr
        return 0.5 * self.lr * (1 + math.cos(math.pi * epoch / self.epochs))

    def apply_lr(self, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        """Set ``optimizer``'s learning rate to :meth:`lr_at` for epoch ``epoch``."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr_at(epoch)

    def beta(self, parallel_epoch: int) -> float:
        return min(self.beta0 * self.beta_growth**parallel_epoch, self.beta_max)

    @property
    def multipliers_act(self) -> bool:
        """Whether AL's multipliers ever reach a step (else AL is the penalty method).

        A sample's multiplier is updated when the sample is visited and first used at
        its next visit in a parallel epoch. Every serial correction resets the
        multipliers, so with one parallel epoch between corrections (1+1) each is reset
        before it is used: AL then takes exactly the penalty method's steps.
        """
        if self.method != "al" or self.epochs < 2:
            return False
        return self.serial_epochs == 0 or self.parallel_epochs >= 2

    def is_serial(self, epoch: int) -> bool:
        """Epoch ``epoch`` (0-based) is a serial correction pass in the schedule."""
        cycle = self.parallel_epochs + self.serial_epochs
        return self.serial_epochs > 0 and epoch % cycle >= self.parallel_epochs


class BoundaryFilter:
    """What crosses a stage boundary: pooled and/or coded activations.

    ``factor > 1`` average-pools before sending (:meth:`down`): ``factor^2`` fewer
    bytes.
    ``bits`` in (8, 6, 4) sends each sample as unsigned codes over its own [min, max]
    range, bit-packed densely (:func:`fl_ec.bitpack.pack_codes`), plus those two floats:
    32 / bits times fewer bytes, less 8 bytes of range per sample. So 8 bits stop just
    short of 4x (3.995x at ResNet-20's first boundary) and 6 bits clear it (5.3x). The
    rounding error is at most half a step, (max - min) / (2 * (2^bits - 1)). Only the
    partner's copy is coded: each rank's own activations and auxiliary variables stay
    fp32, so the penalty sees the coding error once, as a small residual. Under AL the
    two ranks' copies of a multiplier then differ by beta times the coding error per
    step; they are reset with the auxiliary variables at every serial correction.
    """

    def __init__(self, factor: int = 1, bits: int = 32) -> None:
        self.factor = factor
        self.bits = bits
        check_fields(self, (("bits", bits in BOUNDARY_BITS, BOUNDARY_BITS_REASON),))
        self.levels = 2**bits - 1

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.factor == 1 else F.avg_pool2d(x, self.factor, ceil_mode=True)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The tensors to send for ``x`` (already pooled by :meth:`down`)."""
        x = x.detach()
        if self.bits == 32:
            return [x.contiguous()]
        flat = x.flatten(1)
        low, high = flat.amin(1), flat.amax(1)
        step = ((high - low) / self.levels).clamp_min(1e-12)
        codes = ((flat - low[:, None]) / step[:, None]).round_().clamp_(0, self.levels)
        return [pack_codes(codes, self.bits), torch.stack([low, step], 1)]

    def buffers_like(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Receive buffers for a tensor shaped and typed like ``x``."""
        if self.bits == 32:
            return [torch.empty_like(x)]
        codes = torch.empty(packed_size(x.numel(), self.bits), dtype=torch.uint8, device=x.device)
        return [codes, torch.empty((x.shape[0], 2), dtype=x.dtype, device=x.device)]

    def decode(self, received: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
        """The tensor of ``shape`` that :meth:`encode` sent as ``received``."""
        if self.bits == 32:
            return received[0]
        packed, ranges = received
        codes = unpack_codes(packed, self.bits, math.prod(shape)).view(shape)
        scale = (-1,) + (1,) * (len(shape) - 1)
        return codes.to(ranges.dtype) * ranges[:, 1].view(scale) + ranges[:, 0].view(scale)


def boundary_objective(
    aux: torch.Tensor,
    produced: torch.Tensor,
    beta: float,
    multipliers: torch.Tensor | None = None,
) -> torch.Tensor:
    """``beta/2 * mean||aux - produced||^2 (+ mean <lambda, aux - produced>)``.

    Means are over the batch and the activation's elements (see the module notes).
    """
    residual = aux - produced
    value = 0.5 * beta * residual.pow(2).mean()
    if multipliers is not None:
        value = value + (multipliers * residual).mean()
    return value


@torch.no_grad()
def update_multipliers(
    multipliers: torch.Tensor, aux: torch.Tensor, produced: torch.Tensor, beta: float
) -> None:
    """AL dual step, in place: ``lambda += beta * (aux - produced)``."""
    multipliers.add_(beta * (aux - produced))
