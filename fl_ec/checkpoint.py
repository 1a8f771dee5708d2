"""Per-round checkpoints of a run: written atomically, read back without unpickling.

After every completed round the ServerApp writes ``<run folder>/checkpoints/round-NNNNNN/``:

- ``model.pt``  -- the global model's tensors;
- ``state.pt``  -- the strategy's tensors (FedEC's client start, FedHCE's variants) and
  the server's torch random state;
- ``state.json`` -- everything else, in JSON: the round, the run-config, the metrics of
  every round so far, the strategy's own state (FedHCE's index maps and node tiers),
  the grid's counters, Python's and NumPy's random states, and the SHA-256 of both
  tensor files.

A checkpoint is built in a temporary folder, every file fsync'ed, then renamed into
place, so a crash leaves either a complete checkpoint or none -- never half of one. The
two newest are kept: when the newest cannot be read (a truncated file, a checksum that
does not match, a tensor file that is not tensors), :func:`load_latest` says why in one
line and falls back to the one before. Tensor files are read with
``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from flwr.common.logger import log

from fl_ec.errors import FlEcError

CHECKPOINT_DIR = "checkpoints"
KEEP = 2  # the newest and, should it be unreadable, the one before
FORMAT = 1
_TORCH_RNG = "rng/torch"


class CheckpointError(FlEcError):
    """A checkpoint that cannot be read back, or a run that cannot be resumed."""


@dataclass
class StrategyState:
    """What a strategy needs to go on after a restart: tensors and JSON-able values."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class KeepsState(Protocol):
    """A strategy whose state between rounds goes into the run's checkpoints."""

    def checkpoint_state(self) -> StrategyState:
        """The strategy's state after the last completed round."""
        ...

    def restore_state(self, state: StrategyState) -> None:
        """Continue from ``state`` (what :meth:`checkpoint_state` returned)."""
        ...


@dataclass
class Checkpoint:
    """One completed round: the model, the strategy's state, and the run's bookkeeping."""

    round: int
    model: dict[str, torch.Tensor]
    strategy: StrategyState
    run: dict[str, Any]  # config, metrics records, grid counters (JSON)
    # The random states when it was written (set on reading; writing captures them).
    rng: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> tuple[dict[str, Any], torch.Tensor]:
    """The process's random states: Python's and NumPy's as JSON, torch's as a tensor."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }, torch.get_rng_state()


def restore_rng(rng: Mapping[str, Any], torch_state: torch.Tensor | None) -> None:
    """Set the process's random states to what :func:`capture_rng` returned."""
    if "python" in rng:
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in rng:
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if torch_state is not None:
        torch.set_rng_state(torch_state)


def tensors_under(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` whose key starts with ``prefix``, without it, in order."""
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def write_checkpoint(run_dir: Path, checkpoint: Checkpoint, keep: int = KEEP) -> Path:
    """Write ``checkpoint`` atomically into ``run_dir``; drop all but the ``keep`` newest."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{checkpoint.round:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    rng, torch_rng = capture_rng()
    tensors = {f"strategy/{k}": v for k, v in checkpoint.strategy.tensors.items()}
    tensors[_TORCH_RNG] = torch_rng
    digests = {
        "model.pt": _save_tensors(tmp / "model.pt", checkpoint.model),
        "state.pt": _save_tensors(tmp / "state.pt", tensors),
    }
    document = {
        "format": FORMAT,
        "round": checkpoint.round,
        "sha256": digests,
        "strategy": checkpoint.strategy.meta,
        "run": checkpoint.run,
        "rng": rng,
    }
    _write_synced(tmp / "state.json", json.dumps(document).encode())
    _fsync_dir(tmp)
    if final.exists():  # the same round written again (a resumed run): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(root)
    for old in sorted(root.glob("round-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint in ``path``; :class:`CheckpointError` naming what is wrong with it."""
    path = Path(path)
    try:
        document = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path.name}/state.json is unreadable ({err})") from None
    digests = document.get("sha256") if isinstance(document, dict) else None
    if (
        not isinstance(document, dict)
        or document.get("format") != FORMAT
        or not isinstance(document.get("round"), int)
        or not isinstance(digests, dict)
        or not all(isinstance(document.get(k, {}), dict) for k in ("strategy", "run", "rng"))
    ):
        raise CheckpointError(f"{path.name}/state.json is not an fl-ec checkpoint")
    tensors = {}
    for name in ("model.pt", "state.pt"):
        file = path / name
        try:
            data = file.read_bytes()
        except OSError as err:
            raise CheckpointError(f"{path.name}/{name} is unreadable ({err})") from None
        if hashlib.sha256(data).hexdigest() != digests.get(name):
            raise CheckpointError(f"{path.name}/{name} does not match its checksum (truncated?)")
        tensors[name] = _load_tensors(data, f"{path.name}/{name}")
    state = tensors["state.pt"]
    torch_rng = state.pop(_TORCH_RNG, None)
    strategy = {k.removeprefix("strategy/"): v for k, v in state.items()}
    checkpoint = Checkpoint(
        round=document["round"],
        model=tensors["model.pt"],
        strategy=StrategyState(strategy, dict(document.get("strategy", {}))),
        run=dict(document.get("run", {})),
        rng=dict(document.get("rng", {})),
    )
    checkpoint.rng["torch"] = torch_rng
    return checkpoint


def load_latest(run_dir: Path) -> Checkpoint:
    """The newest readable checkpoint of ``run_dir``, falling back past unreadable ones."""
    root = checkpoint_root(run_dir)
    candidates = sorted(root.glob("round-*"), reverse=True) if root.is_dir() else []
    if not candidates:
        raise CheckpointError(
            f"no checkpoint in {root}: resume= must name the run folder of an fl-ec run "
            "that completed at least one round"
        )
    reasons = []
    for path in candidates:
        try:
            return read_checkpoint(path)
        except CheckpointError as err:
            reasons.append(str(err))
            log(WARNING, "checkpoint %s is unusable: %s; trying the one before", path.name, err)
    raise CheckpointError(f"no usable checkpoint in {root}: {'; '.join(reasons)}")


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> str:
    """Write ``tensors`` to ``path`` (fsync'ed); the SHA-256 of the bytes written."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buffer)
    data = buffer.getvalue()
    _write_synced(path, data)
    return hashlib.sha256(data).hexdigest()


def _load_tensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """The tensors in ``data`` (the file ``name``), loaded without unpickling objects."""
    try:
        tensors = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any unreadable file is one reason
        raise CheckpointError(f"{name} is not a tensor file ({err})") from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise CheckpointError(f"{name} holds something other than tensors")
    return tensors


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
