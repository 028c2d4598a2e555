"""The data order: which examples each process reads at each optimizer step.

The order is a pure function of (seed, epoch, step), the same on every process, so:
- resuming needs only the step number to continue exactly where a run stopped;
- 1 process or N processes with the same global batch read the same examples per optimizer step
  (each process takes its slice), and since every process knows the whole global batch, the loss is
  normalised by the global batch's target-token count without any communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataOrder:
    num_examples: int
    batch_size: int  # per process, per micro-batch
    accumulation: int
    num_processes: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulation * self.num_processes

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch, the last one possibly partial (then a process's share may be empty)."""
        return -(-self.num_examples // self.global_batch)

    def step_indices(self, step: int) -> list[int]:
        """Every example of optimizer step `step` (0-based), all processes together."""
        epoch, position = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_examples, generator=generator)
        return order[position * self.global_batch:(position + 1) * self.global_batch].tolist()

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This process's micro-batches of optimizer step `step`: its slice of each of the step's micro-batches.

        In a partial last batch a slice can be empty; the loop then runs a zero-weighted placeholder so that
        every process still takes part in the gradient all-reduce.
        """
        micro_batches = torch.tensor_split(torch.tensor(self.step_indices(step)), self.accumulation)
        return [torch.tensor_split(micro, self.num_processes)[rank].tolist() for micro in micro_batches]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch
