"""Batch arithmetic: from a token budget per optimizer step to rows, hosts and accumulation.

Llama 2 (§2.2, Table 1 of the paper): 4M tokens per step = 4,194,304 = 1024 rows x 4096 tokens.
On 256 devices with 1 row each per forward/backward pass that is 256 rows per micro-step, so 4
gradient-accumulation steps; with 32 hosts each host feeds 32 rows per step (8 per micro-step).

    plan = plan_batches(global_batch_tokens=4_194_304, seq_len=4096, num_devices=256,
                        num_processes=32, micro_batch_per_device=1)
    plan.global_batch, plan.grad_accum_steps, plan.per_host_batch  # 1024, 4, 32

The data pipeline's DataConfig.batch_size is plan.per_host_batch (one optimizer step per
batch); the trainer reshapes it to [grad_accum_steps, per_host_micro_batch, seq_len].
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Derived batch sizes; construct with plan_batches (which checks they divide evenly)."""

    global_batch_tokens: int  # tokens per optimizer step, all hosts
    seq_len: int
    num_devices: int
    num_processes: int
    micro_batch_per_device: int  # rows per device per forward/backward pass
    global_batch: int  # rows per optimizer step = global_batch_tokens / seq_len
    micro_global_batch: int  # rows per forward/backward pass = micro_batch_per_device x devices
    grad_accum_steps: int  # forward/backward passes per optimizer step
    per_host_batch: int  # rows each host loads per optimizer step
    per_host_micro_batch: int  # rows each host feeds per forward/backward pass


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batches(global_batch_tokens: int, seq_len: int, num_devices: int,
                 num_processes: int = 1, micro_batch_per_device: int = 1) -> BatchPlan:
    """The BatchPlan, or one ValueError naming the numbers to change.

    Args:
      global_batch_tokens: tokens per optimizer step (4_194_304 for Llama 2).
      seq_len: tokens per row.
      num_devices: all accelerator chips (jax.device_count()).
      num_processes: hosts (jax.process_count()); each feeds num_devices / num_processes chips.
      micro_batch_per_device: rows per chip per forward/backward pass (memory bound).
    """
    args = dict(global_batch_tokens=global_batch_tokens, seq_len=seq_len,
                num_devices=num_devices, num_processes=num_processes,
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
    if num_devices % num_processes:
        raise ValueError(f"num_devices={num_devices} is not a multiple of num_processes="
                         f"{num_processes}: every host must own the same number of devices")
    rows = global_batch_tokens // seq_len
    micro = micro_batch_per_device * num_devices
    if rows % micro:
        per_device = rows // num_devices if rows % num_devices == 0 else None
        fix = (f"micro_batch_per_device in {_divisors(per_device)}" if per_device else
               f"global_batch_tokens a multiple of seq_len x num_devices = {seq_len * num_devices}"
               f" (e.g. {max(1, rows // num_devices) * num_devices * seq_len})")
        raise ValueError(
            f"global batch of {rows} rows (global_batch_tokens={global_batch_tokens} / seq_len="
            f"{seq_len}) is not a multiple of micro_batch_per_device x num_devices = "
            f"{micro_batch_per_device} x {num_devices} = {micro} rows per pass: choose {fix}")
    return BatchPlan(**args, global_batch=rows, micro_global_batch=micro,
                     grad_accum_steps=rows // micro, per_host_batch=rows // num_processes,
                     per_host_micro_batch=micro // num_processes)
