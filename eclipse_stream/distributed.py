"""torchrun: each rank takes shards r, r + W, ...; ranks share only OUT, rank 0's go-ahead and the failures.

Rank and world size come from the environment (``RANK``, ``WORLD_SIZE``); a process group is created only
when there is more than one rank and none exists yet, and then destroyed after the run.
"""

from __future__ import annotations

import os

import torch

from .errors import EclipseError

__all__ = ["ProcessGroup", "RankZeroError"]


class ProcessGroup:
    """torchrun: rank and world size from the environment; the few collectives a run needs (none alone)."""

    def __init__(self, device: torch.device):
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.dist, self.owned = None, False
        if self.world > 1:
            import torch.distributed as dist
            self.dist = dist
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # --device cpu on a GPU box
                self.owned = True

    def share_go(self, problem):
        """Rank 0's verdict on OUT (None: go on), on every rank."""
        if self.dist is None:
            return problem
        box = [problem]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_failed(self, failed: list) -> list:
        if self.dist is None:
            return failed
        gathered = [None] * self.world
        self.dist.all_gather_object(gathered, failed)
        return [f for part in gathered for f in part]

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def close(self) -> None:
        # A process group left for interpreter exit can abort the process ("terminate called without an
        # active exception": gloo's threads outlive Python). Only on success: after an error the other
        # ranks may still be in a collective, and torchrun tears them down anyway.
        if self.owned:
            self.dist.destroy_process_group()


class RankZeroError(EclipseError):
    """Rank 0's refusal (OUT in use, unwritable, other settings), raised on the other ranks too."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code
