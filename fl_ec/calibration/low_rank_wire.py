"""The wire form of low-rank class statistics, within a byte budget.

A client's dense statistics (:mod:`fl_ec.calibration.low_rank`) are one Gaussian
component per class (per k-means cluster) it holds: a count, a mean, factor columns and
a residual diagonal. On the wire:

* means and residual variances in float16 (float32 where float16 would overflow, which
  the budget does not foresee); each factor column in int8 with its own float32 scale;
* columns ragged: component ``i`` sends its ``ranks[i]`` strongest columns as rows of
  ``factors``;
* under a budget the columns that explain the least of the client's pooled variance
  (column variance x component count) are dropped first, and what a dropped column
  explained joins its component's residual diagonal, so every component keeps its total
  variance. The counts, means and residuals always travel: ``4 d + 24`` bytes a
  component.

:func:`pack_components` writes that form, :func:`unpack_factors` checks and rebuilds the
dense factors. Nothing here knows about Flower.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fl_ec.calibration.statistics import check_real_dtype


def pack_components(
    counts: torch.Tensor,
    means: torch.Tensor,
    factors: torch.Tensor,
    residuals: torch.Tensor,
    budget_bytes: int | None,
) -> dict[str, np.ndarray]:
    """``counts``, ``ranks``, ``means``, ``residuals``, ``factors`` and ``factor-scales``
    of components ``(n,)``, ``(n, d)``, ``(n, d, r)``, ``(n, d)``, within ``budget_bytes``
    (None: every non-zero column)."""
    factors, residuals = _strongest_first(factors), residuals.clone()
    ranks = _ranks_within(factors, counts, budget_bytes)
    columns = []
    for component, rank in enumerate(ranks.tolist()):
        residuals[component] += factors[component, :, rank:].pow(2).sum(1)
        columns.append(factors[component, :, :rank].T)
    kept = torch.cat(columns) if columns else torch.zeros(0, means.shape[1], dtype=torch.float64)
    scales = kept.abs().amax(1) / 127.0
    quantized = torch.round(kept / scales.clamp_min(1e-30)[:, None]).clamp(-127, 127)
    return {
        "counts": counts.numpy().astype(np.int64),
        "ranks": ranks.numpy().astype(np.int64),
        "means": _half_if_finite(means),
        "residuals": _half_if_finite(residuals),
        "factors": quantized.numpy().astype(np.int8),
        "factor-scales": scales.numpy().astype(np.float32),
    }


def unpack_factors(arrays: Mapping[str, np.ndarray], dim: int, rank: int) -> torch.Tensor:
    """float64 factors ``(n, dim, rank)`` from ``ranks`` (n,), ``factors`` and
    ``factor-scales``; ``ValueError`` says what is wrong.

    Every check runs before the dense factors are built: integer ranks within ``[0,
    rank]``, as many factor rows and scales (real numbers) as the ranks add up to,
    finite non-negative scales, finite columns.
    """
    ranks = np.asarray(arrays["ranks"])
    if not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError("feature statistics ranks must be integers")
    if len(ranks) and (ranks.min() < 0 or ranks.max() > rank):
        raise ValueError(f"feature statistics ranks must be within [0, {rank}]")
    total = int(ranks.sum())
    missing = [key for key in ("factors", "factor-scales") if key not in arrays]
    if missing:
        raise ValueError(f"feature statistics lack {missing}")
    for key, shape in (("factors", (total, dim)), ("factor-scales", (total,))):
        value = np.asarray(arrays[key])
        if value.shape != shape:
            raise ValueError(
                f"feature statistics {key!r} have shape {value.shape}, expected {shape}"
            )
        check_real_dtype(key, value)
    scales = np.asarray(arrays["factor-scales"], dtype=np.float64)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise ValueError("feature statistics factor scales must be finite and >= 0")
    columns = np.asarray(arrays["factors"], dtype=np.float64) * scales[:, None]
    if not np.isfinite(columns).all():
        raise ValueError("feature statistics contain non-finite values")
    factors = torch.zeros(len(ranks), dim, rank, dtype=torch.float64)
    starts = np.concatenate([[0], np.cumsum(ranks)])
    for component, kept in enumerate(ranks.tolist()):
        block = columns[starts[component] : starts[component + 1]]
        factors[component, :, :kept] = torch.as_tensor(block.T)
    return factors


def _strongest_first(factors: torch.Tensor) -> torch.Tensor:
    """``factors`` (n, d, r) with each component's columns sorted by decreasing norm.

    Reordering a factor's columns leaves ``F @ F.T`` unchanged; sorted, a component's
    strongest columns are a prefix, which the ragged wire form sends.
    """
    order = factors.pow(2).sum(1).argsort(dim=1, descending=True, stable=True)
    return torch.gather(factors, 2, order.unsqueeze(1).expand_as(factors))


# Bytes a component always costs on the wire: class, count and rank (int64), mean and
# residual (float16); and each factor column it keeps: d int8 values and a float32 scale.
def _component_bytes(dim: int) -> int:
    return 3 * 8 + 2 * 2 * dim


def _column_bytes(dim: int) -> int:
    return dim + 4


def _ranks_within(
    factors: torch.Tensor, counts: torch.Tensor, budget_bytes: int | None
) -> torch.Tensor:
    """How many of its strongest columns each component sends, within ``budget_bytes``.

    Every non-zero column without a budget. Under one, the columns ranked by the
    variance they explain in the client's pooled features (their squared norm x the
    component's count) are kept from the top while they fit.
    """
    n, dim, rank = factors.shape
    value = factors.pow(2).sum(1) * counts[:, None]  # (n, r), each row non-increasing
    useful = value > 0
    if budget_bytes is None:
        return useful.sum(1)
    room = (budget_bytes - n * _component_bytes(dim)) // _column_bytes(dim)
    keep = torch.zeros(n * rank, dtype=torch.bool)
    if room > 0:
        order = value.flatten().argsort(descending=True, stable=True)[: int(room)]
        keep[order] = True
    # A component's kept columns are a prefix: its values are sorted, ties broken stably.
    return (keep.view(n, rank) & useful).sum(1)


def _half_if_finite(values: torch.Tensor) -> np.ndarray:
    """float16 where every value fits it (features of ReLU nets do), else float32."""
    half = values.numpy().astype(np.float16)
    return half if np.isfinite(half).all() else values.numpy().astype(np.float32)
