"""experiments/pretrain.py end to end: SIGTERM / SIGKILL / resume give exactly the losses of an
uninterrupted run; NaN batches are skipped; broken checkpoints fall back to the previous one
(moved aside, never deleted); another model's checkpoints or a storage error are raised."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.train.checkpointing import Checkpoints, abstract_like

ROOT = Path(__file__).resolve().parents[2]
CONFIG = f"{ROOT}/experiments/configs/pretrain.py:test"
FLAGS = ["--config.train.steps=30", "--config.checkpoint.every_steps=5",
         "--config.train.eval_every=1000", "--config.train.inject_nan_at=(7,)"]


def start(workdir):
    cmd = [sys.executable, f"{ROOT}/experiments/pretrain.py", f"--workdir={workdir}",
           f"--config={CONFIG}", *FLAGS]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=240):
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < end, "timed out"
        time.sleep(0.02)


def losses_by_step(workdir):
    """The last logged loss of each step (a resumed run re-logs the steps it redoes)."""
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


def checkpoint_steps(workdir):
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.mark.slow  # four trainer processes: ~2.5 min on 2 cores; `make test-slow`
def test_preemption_and_kill_then_resume_match_an_uninterrupted_run(tmp_path):
    base = tmp_path / "uninterrupted"
    run = start(base)
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    assert "skipped non-finite steps 1" in out  # the NaN batch at step 7
    reference = losses_by_step(base)
    assert sorted(reference) == list(range(1, 31))
    assert reference[7] is None and reference[8] is not None  # skipped, then the run went on

    work = tmp_path / "interrupted"
    # 1. SIGTERM (TPU preemption) during start-up: saves a checkpoint and exits 0.
    proc = start(work)
    wait_for(lambda: (work / "config.json").is_file(), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted at step" in out
    first = checkpoint_steps(work)
    assert first, "SIGTERM must leave a checkpoint"
    # 2. SIGKILL after the next checkpoint: loses at most the steps since that save.
    proc = start(work)
    wait_for(lambda: checkpoint_steps(work) and checkpoint_steps(work)[-1] > first[-1], proc)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert max(losses_by_step(work)) < 30
    # 3. Restart to the end.
    proc = start(work)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    resumed = losses_by_step(work)
    # Bitwise on CPU: same compiled program, same restored params, optimizer state and batches.
    assert resumed == reference
    assert (work / "model" / "config.json").is_file() and (work / "loss.png").is_file()
    assert any((work / "tensorboard").iterdir())


def test_broken_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    ckpts = Checkpoints(tmp_path / "ckpt", keep=5, async_save=False)
    states = {s: {"w": jnp.full((4, 4), float(s)), "step": jnp.int32(s)} for s in (1, 2)}
    for s, st in states.items():
        ckpts.save(s, st, {"doc": s}, {"note": "test"})
    ckpts.wait()
    # Truncate every data file of the newest checkpoint's state.
    for f in (tmp_path / "ckpt" / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[:3])
    abstract = abstract_like(jax.tree.map(jnp.zeros_like, states[1]))
    step, state, data = ckpts.restore_latest(abstract)
    assert step == 1 and data == {"doc": 1}
    np.testing.assert_array_equal(state["w"], np.full((4, 4), 1.0))
    assert "checkpoint 2" in caplog.text and "unreadable" in caplog.text
    # Moved aside, not deleted: kept for a person to look at, and step 2 can be saved again.
    assert ckpts.steps() == [1] and (tmp_path / "ckpt" / "broken-2" / "state").is_dir()
    ckpts.save(2, states[2], {"doc": 2}, {"note": "test"})
    ckpts.wait()
    assert ckpts.steps() == [1, 2]
    ckpts.close()


def _two_checkpoints(directory):
    ckpts = Checkpoints(directory, keep=5, async_save=False)
    states = {s: {"w": jnp.full((4, 4), float(s)), "step": jnp.int32(s)} for s in (1, 2)}
    for s, st in states.items():
        ckpts.save(s, st, {"doc": s}, {"model_config": {"d_model": 4}})
    ckpts.wait()
    return ckpts, abstract_like(states[1])


def test_checkpoint_of_another_model_is_an_error_and_nothing_is_deleted(tmp_path):
    _two_checkpoints(tmp_path / "ckpt")[0].close()
    ckpts = Checkpoints(tmp_path / "ckpt", keep=5, async_save=False)  # as a restarted run opens it
    other = abstract_like({"w": jnp.zeros((4, 8)), "step": jnp.int32(0)})
    with pytest.raises(ValueError, match=r"different model.*w: checkpoint \[4, 4\], config "
                       r"\[4, 8\].*d_model 4 -> 8.*new --workdir"):
        ckpts.restore_latest(other, {"model_config": {"d_model": 8}})
    assert ckpts.steps() == [1, 2] and sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2"]
    ckpts.close()


@pytest.mark.parametrize("error", [OSError("connection reset"),
                                   ValueError("GCS request failed: UNAVAILABLE (503)")])
def test_storage_error_is_raised_not_taken_for_a_broken_checkpoint(tmp_path, monkeypatch, error):
    ckpts, abstract = _two_checkpoints(tmp_path / "ckpt")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(ckpts.manager, "restore", fail)
    with pytest.raises(type(error)):
        ckpts.restore_latest(abstract)
    monkeypatch.undo()
    assert ckpts.steps() == [1, 2] and not list((tmp_path / "ckpt").glob("broken-*"))
    assert ckpts.restore_latest(abstract)[0] == 2  # the next try, with storage back, resumes
    ckpts.close()


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    ckpts, abstract = _two_checkpoints(tmp_path / "ckpt")
    for f in (tmp_path / "ckpt").rglob("*"):
        if f.is_file() and "state" in f.parts:
            f.write_bytes(f.read_bytes()[:3])
    with pytest.raises(ValueError, match="no checkpoint restores.*step 2.*step 1"):
        ckpts.restore_latest(abstract)
    assert ckpts.steps() == [1, 2]
    ckpts.close()


def test_resume_with_another_model_is_one_error_line(tmp_path):
    """The CLI on a workdir written by another model: one `error:` line, checkpoints kept (it
    used to restart from step 0, after which orbax's max_to_keep deleted the original run)."""
    args = [sys.executable, f"{ROOT}/experiments/pretrain.py", f"--workdir={tmp_path}",
            f"--config={CONFIG}", "--config.train.steps=3", "--config.checkpoint.every_steps=1",
            "--config.train.eval_every=1000"]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert checkpoint_steps(tmp_path) == [1, 2, 3]
    run = subprocess.run(args + ["--config.model.overrides.d_model=96"], capture_output=True,
                         text=True)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(errors) == 1, run.stderr[-3000:]
    assert "different model" in errors[0] and "checkpoint 3 " in errors[0], errors[0]
    assert "d_model 64 -> 96" in errors[0]
    assert "new --workdir" in errors[0] and "Traceback" not in run.stderr
    assert checkpoint_steps(tmp_path) == [1, 2, 3]


def test_bad_config_is_one_clear_error(tmp_path):
    cmd = [sys.executable, f"{ROOT}/experiments/pretrain.py", f"--workdir={tmp_path}",
           f"--config={CONFIG}", "--config.train.seq_len=0"]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    assert run.returncode == 2 and "config.train.seq_len must be >= 1" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.slow  # ~50 s: compiles a MoE train step; `make test-slow`
def test_moe_training_logs_aux_losses_and_expert_load(tmp_path):
    """The trainer adds the MoE auxiliary loss and logs it with the expert-load spread."""
    import ml_collections  # noqa: F401  (config module needs it)
    import importlib.util

    from jaxlm.train.trainer import train

    spec = importlib.util.spec_from_file_location("pretrain_cfg", CONFIG.split(":")[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("test_moe")
    config.train.steps = 4
    config.train.log_every = 1
    summary = train(config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert summary["completed"] and len(logged) == 4
    for r in logged:
        assert r["aux/aux_loss"] > 0 and r["aux/load_balance"] >= 0.99  # 1.0 when balanced
        assert 0 <= r["aux/expert_load_min"] <= r["aux/expert_load_max"] <= 1


def test_checkpoint_is_saved_before_an_evaluation_that_fails(tmp_path, monkeypatch):
    import importlib.util

    from jaxlm.train import trainer

    spec = importlib.util.spec_from_file_location("pretrain_cfg", CONFIG.split(":")[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("test")
    config.train.update(steps=3, eval_every=3)
    config.checkpoint.update(every_steps=3, async_save=False)

    def broken_eval(*args, **kwargs):
        raise RuntimeError("eval data went away")

    monkeypatch.setattr(trainer, "_evaluate", broken_eval)
    with pytest.raises(RuntimeError, match="eval data went away"):
        trainer.train(config, tmp_path)
    assert checkpoint_steps(tmp_path) == [3]  # the 3 steps are not lost


@pytest.mark.parametrize("process", [0, 1])
def test_every_process_of_a_pod_saves_its_shards_of_the_final_model(tmp_path, monkeypatch, process):
    """On a multi-host pod the final parameters span hosts: every process calls save_model with
    the sharded arrays (it was process 0 alone, after a jax.device_get that fails on a pod);
    only process 0 plots and samples."""
    import importlib.util

    import jaxlm.checkpoint
    from flax import nnx

    from jaxlm.sharding import init_sharded
    from jaxlm.train import trainer
    from jaxlm.train.experiment import resolve
    from jaxlm.train.step import TrainState

    spec = importlib.util.spec_from_file_location("pretrain_cfg", CONFIG.split(":")[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    exp = resolve(module.get_config("test"), tmp_path)
    model = init_sharded(lambda: exp.model_class(exp.model, rngs=nnx.Rngs(0)), exp.mesh)
    params = nnx.to_pure_dict(nnx.state(model))
    saved, synced = [], []
    monkeypatch.setattr(jaxlm.checkpoint, "save_model", lambda d, m: saved.append(m))
    monkeypatch.setattr(trainer, "sync_processes", synced.append)
    monkeypatch.setattr(trainer, "plot_loss", lambda *a, **k: "loss.png")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: process)

    def no_device_get(x):
        raise AssertionError("jax.device_get on a pod's sharded parameters")

    monkeypatch.setattr(jax, "device_get", no_device_get)
    summary = {"final_state": TrainState(params, None, None, None, None)}
    trainer._finish(exp, tmp_path, summary)
    assert len(saved) == 1 and synced  # every process saves, after the old model dir is gone
    leaves = jax.tree.leaves(nnx.state(saved[0]))
    assert all(isinstance(a, jax.Array) and len(a.sharding.device_set) == 8 for a in leaves)
    assert ("loss_plot" in summary) == (process == 0)


@pytest.mark.parametrize("error, storage", [
    (ValueError("GCS: HTTP 503 Service Unavailable"), True), (TimeoutError("read"), True),
    (ValueError("DEADLINE_EXCEEDED: reading manifest"), True), (ConnectionResetError(), True),
    (ValueError("Requested shape: (503, 64) is not compatible"), False),  # a number, not a code
    (FileNotFoundError("state/_METADATA"), False),  # a missing file: the checkpoint is damaged
])
def test_storage_errors_are_told_from_damage(error, storage):
    from jaxlm.train.checkpointing import _is_storage_error

    assert _is_storage_error(error) == storage


def test_preemption_on_one_host_is_its_own_sigterm(monkeypatch):
    import os
    import signal

    from jaxlm.train import trainer

    before = signal.getsignal(signal.SIGTERM)
    preempt = trainer._Preemption()
    try:
        never = type("Manager", (), {"reached_preemption": lambda self, step: True})()
        assert not preempt.check(1, never)  # one host: the pod's sync point is not asked
        os.kill(os.getpid(), signal.SIGTERM)
        assert preempt.check(2, never)
    finally:
        preempt.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_preemption_on_a_pod_stops_every_host_at_the_synced_step(monkeypatch):
    """On a pod a host's own SIGTERM must not decide (hosts would stop at different steps and
    hang in the collective save): no handler of ours is installed (JAX's preemption notifier
    keeps SIGTERM), and the step comes from the sync manager through orbax."""
    import signal

    from jaxlm.train import trainer

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    before = signal.getsignal(signal.SIGTERM)
    preempt = trainer._Preemption()
    assert signal.getsignal(signal.SIGTERM) == before
    asked = []

    class Manager:
        def reached_preemption(self, step):
            asked.append(step)
            return step == 3

    manager = Manager()
    assert [preempt.check(step, manager) for step in (1, 2, 3, 4)] == [False, False, True, True]
    assert asked == [1, 2, 3]  # once the sync point is reached it stays reached
    preempt.restore()
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("processes, calls", [(1, 1), (2, 3)])
def test_eval_calls_agree_across_a_pod(monkeypatch, processes, calls):
    """A host whose eval shard runs out stops early on one host, but on a pod it keeps calling
    the (collective) eval step with batches that train no token, so every host makes
    eval_batches calls; the loss is that of the real batches alone."""
    from types import SimpleNamespace

    from jaxlm.train import trainer

    real = {"inputs": np.ones((2, 4), np.int32), "targets": np.ones((2, 4), np.int32),
            "positions": np.tile(np.arange(4, dtype=np.int32), (2, 1)),
            "segment_ids": np.ones((2, 4), np.int32), "loss_mask": np.ones((2, 4), np.float32)}
    exp = SimpleNamespace(eval_split="validation", train=SimpleNamespace(eval_batches=3, seq_len=4),
                          plan=SimpleNamespace(per_host_batch=2),
                          make_iterator=lambda split, eval_mode: _Closable(iter([real])))
    seen = []

    def eval_fn(params, batch):
        mask = np.asarray(batch["loss_mask"])
        seen.append(batch["inputs"].shape)
        return 2.5 * mask.sum(), mask.sum()  # mean loss 2.5 per trained token

    monkeypatch.setattr(jax, "process_count", lambda: processes)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    loss = trainer._evaluate(exp, eval_fn, SimpleNamespace(params=None), sharding)
    assert len(seen) == calls and set(seen) == {(2, 4)}
    assert loss == pytest.approx(2.5)


class _Closable:
    def __init__(self, it):
        self._it = it

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def close(self):
        pass


class _SyncManager:
    """JAX's preemption sync rules (tsl PreemptionSyncManager): it learns step numbers as they
    are reported; a notice sets the sync step to the largest reported + 1; only that exact step
    reports True."""

    def __init__(self):
        self.reported, self.sync_at = [0], None

    def notice(self):
        self.sync_at = max(self.reported) + 1

    def reached_preemption(self, step):
        self.reported.append(step)
        return step == self.sync_at


def test_pod_preemption_during_the_first_compile_of_a_resumed_run(monkeypatch):
    """A resumed pod run registers its resume step before the first step: a notice that comes
    during the first step's compile stops at the step after it (without that first report the
    sync step would be 1, which a run resumed at 1000 never reaches)."""
    from jaxlm.train import trainer

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    manager, preempt = _SyncManager(), trainer._Preemption()
    assert not preempt.check(1000, manager)  # _loop, right after the restore
    manager.notice()                          # SIGTERM while step 1001 compiles
    assert preempt.check(1001, manager)


def test_the_loop_reports_its_start_step_first(tmp_path, monkeypatch):
    import importlib.util

    from jaxlm.train import trainer

    spec = importlib.util.spec_from_file_location("pretrain_cfg", CONFIG.split(":")[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("test")
    config.train.steps = 3
    checked = []

    class PodPreemption(trainer._Preemption):  # the pod path; orbax reports no preemption here
        def __init__(self):
            super().__init__()
            self.multi_host = True

        def check(self, step, manager):
            checked.append(step)
            return super().check(step, manager)

    monkeypatch.setattr(trainer, "_Preemption", PodPreemption)
    assert trainer.train(config, tmp_path)["completed"]
    assert checked == [0, 1, 2, 3]
