"""Batch arithmetic: Llama 2's 4M-token batch and the errors that name what to change."""
import dataclasses

import pytest

from jaxlm.data.batching import BatchPlan, batch_shards, plan_batches


def test_llama2_numbers():
    plan = plan_batches(global_batch_tokens=4_194_304, seq_len=4096, batch_shards=256,
                        num_processes=32, micro_batch_per_device=1)
    assert (plan.global_batch, plan.micro_global_batch, plan.grad_accum_steps) == (1024, 256, 4)
    assert (plan.per_host_batch, plan.per_host_micro_batch) == (32, 8)
    assert plan.global_batch * plan.seq_len == 4_194_304
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.grad_accum_steps = 1


@pytest.mark.parametrize("kw,accum,host", [
    (dict(batch_shards=1024), 1, 1024),  # one row per chip: no accumulation
    (dict(batch_shards=256, micro_batch_per_device=4), 1, 1024),
    (dict(batch_shards=8, num_processes=2, micro_batch_per_device=2), 64, 512),
])
def test_other_layouts(kw, accum, host):
    plan = plan_batches(4_194_304, 4096, **kw)
    assert plan.grad_accum_steps == accum and plan.per_host_batch == host
    assert plan.per_host_micro_batch * plan.grad_accum_steps == plan.per_host_batch
    assert isinstance(plan, BatchPlan)


@pytest.mark.parametrize("kw,match", [
    (dict(global_batch_tokens=4_000_000, seq_len=4096, batch_shards=8),
     r"not a multiple of seq_len=4096.*3997696 or 4001792"),
    (dict(global_batch_tokens=4_194_304, seq_len=4096, batch_shards=256,
          micro_batch_per_device=3), r"micro_batch_per_device in \[1, 2, 4\]"),
    (dict(global_batch_tokens=8 * 4096, seq_len=4096, batch_shards=256),
     r"8 rows.*global_batch_tokens a multiple of seq_len x batch_shards = 1048576"),
    (dict(global_batch_tokens=4_194_304, seq_len=4096, batch_shards=256, num_processes=3),
     r"batch_shards=256 \(mesh data x fsdp x expert\) is not a multiple of num_processes=3"),
    (dict(global_batch_tokens=4_194_304, seq_len=0, batch_shards=8), "seq_len=0"),
    (dict(global_batch_tokens=4_194_304, seq_len=4096, batch_shards=8.0), "batch_shards=8.0"),
])
def test_impossible_combinations_are_one_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        plan_batches(**kw)


def test_batch_shards_leave_out_tensor():
    # Tensor-parallel chips share rows; only data x fsdp x expert split the batch.
    assert batch_shards({"data": 2, "fsdp": 4, "expert": 1, "tensor": 2}) == 8
    assert batch_shards({"data": 1, "fsdp": 1, "expert": 2, "tensor": 4}) == 2
