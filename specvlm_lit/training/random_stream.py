"""The random numbers of training steps: a stream of their own, advanced only by training steps, checkpointed.

Why not simply save the global RNG states in the checkpoint and put them back on resume: the compressors draw
their training randomness (``select``: Gumbel noise, ``prune`` / ``weighted``: random subsets, feature noise) from
the global RNGs, and so does everything else in the process. Every DataLoader iterator takes its base seed from
torch's global RNG, and Lightning creates a different number of iterators when it restarts inside an epoch than
when it runs through, validation runs or not, a callback may draw... No single hook puts the global state back at
"the same point" for every place a checkpoint can be written. So the training steps get their own states (torch
CPU, CUDA of the step's device, numpy, python ``random``), swapped in around each step and out again; nothing else
advances them, and a checkpoint of them resumes exactly whatever wrote it (a step checkpoint, an end-of-epoch one,
one written after validation). Each DDP rank has its own stream: all of them are gathered into the checkpoint.

Data randomness needs nothing here: the epoch pipeline's shard order and shuffle buffer use their own RNGs seeded
by (seed, epoch), and the DataModule's checkpointed position replays them (see ``ShardDataModule``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn


def capture(device: torch.device) -> dict:
    """The global random states that code running on ``device`` draws from, as plain checkpointable values."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        # numpy's key as a list: checkpoints stay loadable with torch.load(weights_only=True)
        "numpy": (kind, key.tolist(), pos, has_gauss, gauss),
        "python": random.getstate(),
    }


def restore(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TrainingRandomStream:
    """Random states that only training steps use; see the module docstring for why.

    A fresh run starts the stream from the global states at its first training step (deterministic after
    ``seed_everything``); a resumed run starts it from the checkpoint (:meth:`load_state_dict`).
    """

    def __init__(self) -> None:
        self._state: dict | None = None  # this rank's stream; None until the first step of a fresh run
        self._loaded: list[dict] | None = None  # every rank's stream, from a checkpoint, until the first step

    def _mine(self) -> dict | None:
        if self._loaded is not None:
            rank, world = _world()
            if len(self._loaded) != world:
                rank_zero_warn(
                    f"the checkpoint holds the training random states of {len(self._loaded)} rank(s) but this run "
                    f"has {world}; resuming on another number of devices cannot reproduce the interrupted run exactly"
                )
            self._state, self._loaded = self._loaded[rank % len(self._loaded)], None
        return self._state

    @contextmanager
    def active(self, device: torch.device) -> Iterator[None]:
        """Run the body on the stream's states, then put the global states back as they were."""
        mine = self._mine()
        outside = capture(device)
        if mine is not None:
            restore(mine, device)
        try:
            yield
        finally:
            self._state = capture(device)
            restore(outside, device)

    def state_dict(self) -> list[dict]:
        """Every rank's stream (collective under DDP: Lightning builds checkpoints on all ranks, rank 0 writes)."""
        mine = self._mine()
        _, world = _world()
        if world == 1:
            return [] if mine is None else [mine]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        return [] if any(s is None for s in gathered) else gathered

    def load_state_dict(self, per_rank: list[dict]) -> None:
        """Resume the streams of a checkpoint; an empty list (an older checkpoint) starts a fresh stream."""
        self._state, self._loaded = None, list(per_rank) or None
