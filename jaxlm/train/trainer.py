"""The pretraining loop: resolve the experiment config, build model / optimizer / data on the
mesh, resume, train with checkpoints and metrics, and leave a model directory for generation.

    from jaxlm.train.trainer import train
    summary = train(config, workdir)     # config: experiments/configs/pretrain.py ConfigDict
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from etils import epath
from jax.sharding import NamedSharding

from jaxlm.data.packing import empty_batch
from jaxlm.paths import as_path
from jaxlm.train.checkpointing import Checkpoints, abstract_like, sync_processes
from jaxlm.train.metrics import MetricsWriter, peak_flops_per_device, plot_loss, train_flops_per_token
from jaxlm.train.optim import make_optimizer
from jaxlm.train.experiment import Experiment, resolve
from jaxlm.train.step import init_state, make_train_step
from jaxlm.train.losses import token_losses
from jaxlm.sharding import init_sharded, logical_to_spec

log = logging.getLogger("jaxlm.train")


class NonFiniteError(RuntimeError):
    pass


class _Preemption:
    """Whether to save and stop after a step because the VM is being preempted.

    One process: SIGTERM sets a flag that `check` reports. Several processes (a pod): every host
    must stop at the same step, or one enters the collective checkpoint save while another runs
    the next step and the pod hangs, so a host's own SIGTERM cannot decide. There JAX's
    preemption sync manager (started by jax.distributed.initialize, which then catches SIGTERM
    itself, so no handler of ours replaces it) picks one step for all, read through orbax's
    `reached_preemption`, as MaxText does.
    """

    def __init__(self):
        self.requested = False
        self.multi_host = jax.process_count() > 1
        self._old = None if self.multi_host else signal.signal(signal.SIGTERM, self._handle)
        if self.multi_host and not _preemption_service_running():
            log.warning("JAX's preemption service is off (jax_enable_preemption_service=False, "
                        "or Pathways): a SIGTERM on this pod kills the run without a checkpoint; "
                        "the last periodic one is kept")

    def _handle(self, signum, frame):
        self.requested = True

    def check(self, step: int, manager) -> bool:
        """After `step`: stop now? manager: the orbax CheckpointManager (pods only)."""
        if self.multi_host and not self.requested:
            self.requested = bool(manager.reached_preemption(step))
        return self.requested

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _preemption_service_running() -> bool:
    from jax._src import distributed  # the sync manager jax.distributed.initialize starts

    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


def train(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) the experiment in `workdir`, a local directory or a bucket URL
    (gs://BUCKET/RUN, shared by all hosts of a pod). Returns a summary dict."""
    # First, so a SIGTERM during set-up / compilation is not lost (one host; a pod's sync
    # manager learns the resume step only after the restore, see _loop).
    preempt = _Preemption()
    try:
        return _train(config, as_path(workdir), preempt)
    finally:
        preempt.restore()


def _train(config, workdir: epath.Path, preempt: _Preemption) -> dict[str, Any]:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except ImportError as e:  # fsspec: "Please install gcsfs to access Google Storage"
        raise ValueError(f"--workdir {workdir}: {e} (pip install -e '.[tpu]' includes it)") from e
    exp = resolve(config, workdir)
    main = jax.process_index() == 0
    if main:
        (workdir / "config.json").write_text(json.dumps(exp.resolved, indent=2) + "\n")
        log.info("resolved config:\n%s", json.dumps(exp.resolved, indent=2))

    mesh, plan, cfg = exp.mesh, exp.plan, exp.model
    model = init_sharded(lambda: exp.model_class(cfg, rngs=nnx.Rngs(exp.train.seed)), mesh)
    graphdef, param_state = nnx.split(model)
    tx = make_optimizer(exp.optim, param_state)
    params = nnx.to_pure_dict(param_state)
    state_sharding = train_state_shardings(params, tx, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda p: init_state(p, tx), out_shardings=state_sharding)(params)
    del model, param_state, params
    rows, seq = plan.per_host_batch * jax.process_count(), exp.data.seq_len
    batch_sharding = batch_sharding_for(mesh, rows, seq)
    step_fn = jit_train_step(graphdef, tx, state_sharding, batch_sharding,
                             accum_steps=plan.grad_accum_steps, z_loss=exp.train.z_loss,
                             seed=exp.train.seed)

    ckpts = Checkpoints(workdir / "checkpoints", keep=exp.ckpt.keep,
                        async_save=exp.ckpt.async_save)
    data = exp.make_iterator(split=exp.data.split)
    restored = ckpts.restore_latest(abstract_like(state), exp.resolved)
    if restored is not None:
        step0, state, data_state = restored
        data.set_state(data_state)
        log.info("resumed from step %d in %s", step0, ckpts.directory)

    writer = MetricsWriter(workdir, enabled=main)
    peak, peak_source = peak_flops_per_device()
    flops_step = train_flops_per_token(cfg, seq) * plan.global_batch * seq
    summary: dict[str, Any] = {"workdir": str(workdir)}
    try:
        summary.update(_loop(exp, state, step_fn, data, ckpts, writer, batch_sharding, mesh,
                             preempt, flops_step, peak * jax.device_count(), graphdef))
    finally:
        ckpts.close()
        writer.close()
        data.close()
    summary["peak_flops_source"] = peak_source
    if summary.get("completed"):
        _finish(exp, workdir, summary)  # on every process: the parameters are sharded across hosts
    summary.pop("final_state", None)
    return summary


def train_state_shardings(params, tx, mesh):
    """Shardings of the TrainState: optimizer leaves that mirror a parameter (Adam's mu, nu) take
    that parameter's sharding, everything else (counts, step counters) is replicated.

    `params` is the pure dict of (abstract or real) parameter arrays carrying their shardings.
    Left to jit's propagation, the optimizer state comes out replicated (zeros_like does not
    depend on its input's layout), which puts 8 bytes per parameter on every device: the AOT
    check (jaxlm.train.aot) found Llama-2 7B needing 102 GB per v5p chip that way.
    """
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    param_sharding = jax.tree.map(lambda a: a.sharding, params)
    abstract = jax.eval_shape(lambda p: init_state(p, tx), params)
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, param_sharding,
                                transform_non_params=lambda _: replicated)
    return abstract._replace(params=param_sharding, opt_state=opt, step=replicated,
                             bad_in_a_row=replicated, bad_total=replicated)


def batch_sharding_for(mesh, rows: int, seq: int) -> NamedSharding:
    """Sharding of every [rows, seq] batch array: rows over the table's batch mesh axes."""
    return NamedSharding(mesh, logical_to_spec(
        ("activation_batch", "activation_length"), (rows, seq), dict(mesh.shape)))


def jit_train_step(graphdef, tx, state_sharding, batch_sharding, *, accum_steps: int,
                   z_loss: float, seed: int = 0):
    """The train step exactly as the trainer runs it: explicit in/out shardings, state donated.

    Shared with `jaxlm.train.aot`, which lowers and compiles it against abstract inputs.
    """
    return jax.jit(make_train_step(graphdef, tx, accum_steps=accum_steps, z_loss=z_loss,
                                   seed=seed),
                   in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, None), donate_argnums=0)


def _to_device(batch: dict, sharding, inject_nan: bool) -> dict:
    batch = dict(batch)
    # loss_mask travels as float32 so the non-finite guard can be exercised with a real NaN.
    batch["loss_mask"] = batch["loss_mask"].astype(np.float32)
    if inject_nan:
        batch["loss_mask"][0, 0] = np.nan
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _loop(exp: Experiment, state, step_fn, data, ckpts: Checkpoints, writer: MetricsWriter,
          batch_sharding, mesh, preempt: _Preemption, flops_step: float, peak: float, graphdef):
    from tqdm import tqdm

    t = exp.train
    start = int(jax.device_get(state.step))
    every = exp.ckpt.every_steps
    eval_fn = _make_eval(graphdef, batch_sharding)
    bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0, file=sys.stderr)
    pending = None  # (step, device metrics, seconds per step) of the step before
    last_time = time.perf_counter()
    result = {"completed": False, "start_step": start}
    step = start

    def drain(pending):
        """Fetch the previous step's metrics once this step is dispatched: one step of
        pipelining, so the host never stalls the device waiting for a scalar."""
        done_step, metrics, dt = pending
        m = jax.device_get(metrics)
        if done_step % t.log_every == 0 or done_step == t.steps or done_step == start + 1:
            _log_step(done_step, m, dt, flops_step, peak, exp, writer, bar, result)
        if int(m["bad_in_a_row"]) >= t.max_bad_steps:
            bar.close()
            raise NonFiniteError(
                f"{t.max_bad_steps} non-finite steps in a row (last at step {done_step}); stopping."
                f" The last good checkpoint is kept in {ckpts.directory} (steps {ckpts.steps()});"
                " lower optim.peak_lr or enable train.z_loss, then resume")

    if preempt.multi_host:
        # Registers the resume step with the pod's preemption sync (JAX's counts from the first
        # step it is shown): a notice during the first step's compile then stops all hosts at
        # the step after it. A notice before this (during the restore) is missed. (One host
        # needs no registering: a SIGTERM during set-up saves after the first step.)
        preempt.check(start, ckpts.manager)
    with jax.set_mesh(mesh):
        while step < t.steps:
            batch = _to_device(next(data), batch_sharding, step + 1 in exp.inject_nan_at)
            state, metrics = step_fn(state, batch)
            step += 1
            if pending is not None:
                drain(pending)
            now = time.perf_counter()
            pending = (step, metrics, now - last_time)
            last_time = now
            # Save before evaluating: an evaluation that fails must not cost the steps since
            # the last save. A preempted VM has seconds left: save and go, no evaluation.
            stop = preempt.check(step, ckpts.manager)
            if step % every == 0 or step == t.steps or stop:
                ckpts.save(step, state, data.get_state(), exp.resolved, force=True)
            if (step % t.eval_every == 0 or step == t.steps) and not stop:
                eval_loss = _evaluate(exp, eval_fn, state, batch_sharding)
                writer.write(step, {"eval_loss": eval_loss,
                                    "eval_perplexity": math.exp(min(eval_loss, 50))})
                result["eval_loss"] = eval_loss
                last_time = time.perf_counter()  # eval time is not step time
            if stop:
                log.warning("preempted (SIGTERM): saved checkpoint %d, exiting", step)
                result["preempted"] = True
                break
            bar.update(1)
        if pending is not None:
            drain(pending)
    bar.close()
    result["completed"] = step >= t.steps
    result["steps"] = step
    result["bad_steps_total"] = int(jax.device_get(state.bad_total))
    result["final_state"] = state
    return result


def _log_step(step, m, dt, flops_step, peak, exp, writer, bar, result):
    loss = float(m["loss"])
    tokens = float(m["tokens"])
    row = {"loss": loss if math.isfinite(loss) else None,
           "perplexity": math.exp(min(loss, 50)) if math.isfinite(loss) else None,
           "grad_norm": float(m["grad_norm"]) if math.isfinite(float(m["grad_norm"])) else None,
           "learning_rate": float(exp.learning_rate(int(m["optimizer_step"]))),
           "tokens_per_s": tokens / dt if dt > 0 else None, "step_time_s": dt,
           "mfu": flops_step / dt / peak if dt > 0 else None,
           "skipped": not bool(m["finite"]), "bad_in_a_row": int(m["bad_in_a_row"])}
    if float(m["z_loss"]):
        row["z_loss"] = float(m["z_loss"])
    for k, v in m.items():
        if k.startswith("aux/"):
            v = np.asarray(v)
            if v.ndim:  # per-expert vectors: log the spread
                row[f"{k}_max"], row[f"{k}_min"] = float(v.max()), float(v.min())
            else:
                row[k] = float(v)
    writer.write(step, row)
    result["loss"] = row["loss"]
    result["losses"] = result.get("losses", []) + [(step, loss)]
    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s'] or 0:,.0f}",
                    mfu=f"{(row['mfu'] or 0):.1%}", refresh=False)


def _make_eval(graphdef, batch_sharding):
    @jax.jit
    def eval_step(params, batch):
        model = nnx.merge(graphdef, params)
        logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
        s = token_losses(logits, batch["targets"], batch["loss_mask"])
        return s["ce_sum"], s["tokens"]
    return eval_step


def _evaluate(exp: Experiment, eval_fn, state, batch_sharding) -> float:
    """Token-weighted loss over the first eval_batches batches of the held-out split.

    Each eval_fn call is a computation over the global batch, so on a pod every host must make
    the same number of calls: a host whose shard of a small split runs out early feeds
    all-padding batches (no trained token) instead of stopping, which would leave the others
    waiting forever.
    """
    it = exp.make_iterator(split=exp.eval_split, eval_mode=True)
    total = count = 0.0
    try:
        for _ in range(exp.train.eval_batches):
            try:
                batch = next(it)
            except StopIteration:
                if jax.process_count() == 1:
                    break
                batch = empty_batch(exp.plan.per_host_batch, exp.train.seq_len)  # all padding
            ce, n = jax.device_get(eval_fn(state.params, _to_device(batch, batch_sharding, False)))
            total, count = total + float(ce), count + float(n)
    finally:
        it.close()
    return total / max(count, 1.0)


def _finish(exp: Experiment, workdir: epath.Path, summary: dict) -> None:
    """Model directory for generate.py / export (every process), then on process 0 the loss
    plot and a sample."""
    from jaxlm.checkpoint import save_model

    state = summary.pop("final_state")
    main = jax.process_index() == 0
    # Saved as sharded as it trained: on a pod the arrays span hosts, where a device_get fails
    # (and would pull the whole model onto one host); every process writes its own shards and
    # orbax joins them. load_model restores onto any devices (one, without a mesh).
    model = nnx.merge(exp.graphdef_for_export(), state.params)
    model_dir = workdir / "model"
    if main and model_dir.exists():
        model_dir.rmtree()
    sync_processes("jaxlm_model_dir_cleared")  # no host writes before the old one is gone
    save_model(model_dir, model)
    if not main:
        return
    if exp.tokenizer_path is not None:
        as_path(exp.tokenizer_path).copy(model_dir / "tokenizer.model", overwrite=True)
    summary["model_dir"] = str(model_dir)
    entropy = exp.unigram_entropy()
    summary["unigram_entropy"] = entropy
    summary["loss_plot"] = str(plot_loss(workdir / "metrics.jsonl", workdir / "loss.png",
                                         reference=entropy, reference_label="unigram entropy"))
    summary["tensorboard"] = str(workdir / "tensorboard")
    if exp.tokenizer is not None and exp.train.sample_prompt:
        if jax.process_count() > 1:  # generating is a computation every host would have to join
            log.info("no sample on a multi-host run: use experiments/generate.py on %s", model_dir)
            return
        from jaxlm.inference.generate import generate
        from jaxlm.inference.sampling import SamplingConfig

        ids = exp.tokenizer.encode(exp.train.sample_prompt, bos=True)
        out = generate(model, [ids], max_new_tokens=exp.train.sample_tokens, eos_id=exp.tokenizer.eos_id,
                       sampling=SamplingConfig(vocab_limit=exp.tokenizer.vocab_size))
        # Decoded with the prompt: alone, the continuation's first piece loses its leading space.
        summary["sample"] = exp.tokenizer.decode(ids + out.tokens[0])
