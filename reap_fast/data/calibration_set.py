"""Calibration sequences: the sets observers consume (``CalibrationSet``, ``CalibrationBatch``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .spec import CalibrationDataError


@dataclass
class CalibrationBatch:
    """One batch for the observer."""

    input_ids: torch.LongTensor  # (B, L)
    attention_mask: torch.LongTensor  # (B, L) 1 = real token (attended), 0 = padding
    stats_mask: torch.BoolTensor  # (B, L) True = counted in the REAP statistics


@dataclass
class CalibrationSet:
    """Calibration sequences (N, L) with their masks and the category of each sequence."""

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    stats_mask: torch.BoolTensor
    categories: list[str]

    def __post_init__(self) -> None:
        shapes = {tuple(t.shape) for t in (self.input_ids, self.attention_mask, self.stats_mask)}
        if len(shapes) != 1 or self.input_ids.dim() != 2 or len(self.categories) != self.input_ids.shape[0]:
            raise ValueError(f"inconsistent calibration set: shapes {shapes}, {len(self.categories)} categories")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        """Tokens per sequence (L)."""
        return self.input_ids.shape[1]

    def num_stat_tokens(self) -> int:
        """Number of tokens counted in the statistics (no separators, no padding)."""
        return int(self.stats_mask.sum())

    def batches(self, batch_size: int, start: int = 0) -> Iterator[CalibrationBatch]:
        """Batches of ``batch_size`` sequences in order, from sequence ``start`` (to resume); last may be short."""
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise CalibrationDataError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(start, int) or not 0 <= start <= len(self):
            raise CalibrationDataError(f"start must be in [0, {len(self)}], got {start!r}")
        for begin in range(start, len(self), batch_size):
            end = begin + batch_size
            yield CalibrationBatch(self.input_ids[begin:end], self.attention_mask[begin:end], self.stats_mask[begin:end])

    def shard(self, rank: int, world_size: int, unit: int = 1) -> CalibrationSet:
        """Blocks of ``unit`` consecutive sequences, blocks ``rank, rank + world_size, ...`` (data-parallel split).

        With ``unit`` the batch size every rank's batches are batches of the single-process run, so statistics
        of a whole forward call (the router-logit distance) are the same; ``unit=1``: sequences one by one.
        """
        if not isinstance(world_size, int) or world_size <= 0:
            raise CalibrationDataError(f"world_size must be a positive integer, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise CalibrationDataError(f"rank must be in [0, {world_size - 1}], got {rank!r}")
        if not isinstance(unit, int) or unit <= 0:
            raise CalibrationDataError(f"unit must be a positive integer, got {unit!r}")
        index = torch.arange(len(self))
        index = index[(index // unit) % world_size == rank]
        return CalibrationSet(
            self.input_ids[index].clone(),
            self.attention_mask[index].clone(),
            self.stats_mask[index].clone(),
            [self.categories[i] for i in index.tolist()],
        )


