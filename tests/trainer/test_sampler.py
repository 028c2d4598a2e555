"""DataOrder: the same examples per optimizer step whatever the number of processes; epochs cover the data."""

from __future__ import annotations

import pytest

from deltatune.trainer.sampler import DataOrder


@pytest.mark.parametrize("processes", [1, 2, 3])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_processes_split_each_step_without_overlap(processes, accumulation):
    order = DataOrder(num_examples=23, batch_size=12 // processes // accumulation or 1, accumulation=accumulation,
                      num_processes=processes, seed=3)
    for step in range(order.steps_per_epoch * 2):
        shards = [i for rank in range(processes) for micro in order.micro_batches(step, rank) for i in micro]
        assert sorted(shards) == sorted(order.step_indices(step))
        assert all(len(order.micro_batches(step, rank)) == accumulation for rank in range(processes))


def test_one_epoch_reads_every_example_once_and_the_order_depends_only_on_seed_and_epoch():
    order = DataOrder(num_examples=10, batch_size=4, accumulation=1, num_processes=1, seed=0)
    assert order.steps_per_epoch == 3  # the last batch holds 2
    epoch0 = [i for step in range(3) for i in order.step_indices(step)]
    epoch1 = [i for step in range(3, 6) for i in order.step_indices(step)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    assert DataOrder(10, 4, 1, 1, seed=0).step_indices(4) == order.step_indices(4)
    assert DataOrder(10, 4, 1, 1, seed=1).step_indices(0) != order.step_indices(0)


def test_the_global_batch_not_the_process_count_fixes_the_steps():
    one = DataOrder(num_examples=19, batch_size=4, accumulation=2, num_processes=1, seed=0)
    two = DataOrder(num_examples=19, batch_size=2, accumulation=2, num_processes=2, seed=0)
    assert one.steps_per_epoch == two.steps_per_epoch == 3
    assert [one.step_indices(s) for s in range(6)] == [two.step_indices(s) for s in range(6)]
    assert [] in two.micro_batches(2, 1)  # 3 examples left for 2 processes x 2 micro-batches
