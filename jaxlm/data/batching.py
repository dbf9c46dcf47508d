"""Batch arithmetic: from a token budget per optimizer step to rows, hosts and accumulation.

Llama 2 (§2.2, Table 1 of the paper): 4M tokens per step = 4,194,304 = 1024 rows x 4096 tokens.
On 256 devices with 1 row each per forward/backward pass that is 256 rows per micro-step, so 4
gradient-accumulation steps; with 32 hosts each host feeds 32 rows per step (8 per micro-step).

The rows are split only over the batch mesh axes (data x fsdp x expert: `activation_batch` in
jaxlm.sharding.RULES); the chips of a tensor-parallel group work on the same rows. So the
divisor is the number of batch shards, not of devices: with tensor=8 on 256 chips, 32 shards.

    plan = plan_batches(global_batch_tokens=4_194_304, seq_len=4096, batch_shards=256,
                        num_processes=32, micro_batch_per_device=1)
    plan.global_batch, plan.grad_accum_steps, plan.per_host_batch  # 1024, 4, 32

The data pipeline's DataConfig.batch_size is plan.per_host_batch (one optimizer step per
batch); the trainer reshapes it to [grad_accum_steps, per_host_micro_batch, seq_len].
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from jaxlm.sharding import RULES


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Derived batch sizes; construct with plan_batches (which checks they divide evenly)."""

    global_batch_tokens: int  # tokens per optimizer step, all hosts
    seq_len: int
    batch_shards: int  # ways each batch is split: data x fsdp x expert mesh sizes
    num_processes: int
    micro_batch_per_device: int  # rows per device per forward/backward pass
    global_batch: int  # rows per optimizer step = global_batch_tokens / seq_len
    micro_global_batch: int  # rows per forward/backward pass = micro_batch_per_device x batch_shards
    grad_accum_steps: int  # forward/backward passes per optimizer step
    per_host_batch: int  # rows each host loads per optimizer step
    per_host_micro_batch: int  # rows each host feeds per forward/backward pass


def batch_shards(mesh_shape: Mapping[str, int]) -> int:
    """How many ways a batch is split on a mesh (mesh.shape): the product of the sizes of the
    batch axes, RULES["activation_batch"] (data x fsdp x expert)."""
    return math.prod(mesh_shape.get(axis, 1) for axis in RULES["activation_batch"])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batches(global_batch_tokens: int, seq_len: int, batch_shards: int,
                 num_processes: int = 1, micro_batch_per_device: int = 1) -> BatchPlan:
    """The BatchPlan, or one ValueError naming the numbers to change.

    Args:
      global_batch_tokens: tokens per optimizer step (4_194_304 for Llama 2).
      seq_len: tokens per row.
      batch_shards: how many ways the batch is split, the product of the mesh's data, fsdp and
        expert sizes (batch_shards(mesh.shape)); jax.device_count() / tensor.
        Every chip of a shard's tensor group processes that shard's rows.
      num_processes: hosts (jax.process_count()); each loads 1 / num_processes of the rows.
      micro_batch_per_device: rows per chip per forward/backward pass (memory bound).
    """
    args = dict(global_batch_tokens=global_batch_tokens, seq_len=seq_len,
                batch_shards=batch_shards, num_processes=num_processes,
                micro_batch_per_device=micro_batch_per_device)
    bad = [f"{k}={v!r}" for k, v in args.items() if not isinstance(v, int) or v < 1]
    if bad:
        raise ValueError(f"batch sizes must be positive integers: {', '.join(bad)}")
    if global_batch_tokens % seq_len:
        lo = global_batch_tokens // seq_len * seq_len
        raise ValueError(
            f"global_batch_tokens={global_batch_tokens} is not a multiple of seq_len={seq_len}: "
            f"rows must be whole; use global_batch_tokens={lo or seq_len} or "
            f"{lo + seq_len}, or a seq_len that divides it")
    if batch_shards % num_processes:
        raise ValueError(f"batch_shards={batch_shards} (mesh data x fsdp x expert) is not a "
                         f"multiple of num_processes={num_processes}: every host must feed whole "
                         "batch shards; move tensor parallelism inside hosts")
    rows = global_batch_tokens // seq_len
    micro = micro_batch_per_device * batch_shards
    if rows % micro:
        per_shard = rows // batch_shards if rows % batch_shards == 0 else None
        fix = (f"micro_batch_per_device in {_divisors(per_shard)}" if per_shard else
               f"global_batch_tokens a multiple of seq_len x batch_shards = {seq_len * batch_shards}"
               f" (e.g. {max(1, rows // batch_shards) * batch_shards * seq_len})")
        raise ValueError(
            f"global batch of {rows} rows (global_batch_tokens={global_batch_tokens} / seq_len="
            f"{seq_len}) is not a multiple of micro_batch_per_device x batch_shards (mesh data x "
            f"fsdp x expert) = {micro_batch_per_device} x {batch_shards} = {micro} rows per pass:"
            f" choose {fix}")
    return BatchPlan(**args, global_batch=rows, micro_global_batch=micro,
                     grad_accum_steps=rows // micro, per_host_batch=rows // num_processes,
                     per_host_micro_batch=micro // num_processes)
