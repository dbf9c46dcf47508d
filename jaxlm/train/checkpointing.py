"""Training checkpoints with orbax's CheckpointManager: async saves every N steps, the last K
kept, each holding the train state (params, optimizer state, step counters), the data iterator's
state and the resolved config.

Restoring never deletes anything. A checkpoint of a different model (changed preset or overrides)
is an error naming what differs, not a reason to start again: that would start from step 0 and
let orbax's max_to_keep delete the original run. A storage error (a bucket's 503) is raised for
the caller to retry. Only a checkpoint that is itself damaged is moved aside (broken-STEP) and the
next older one restored."""
from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxlm.checkpoint import array_shapes
from jaxlm.paths import as_path

log = logging.getLogger("jaxlm.train")


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = as_path(directory)  # local, or gs:// (orbax writes buckets itself)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        # Handlers up front (not item_names): a fresh manager can then read a step's metadata,
        # which restore_latest compares with the current model before restoring anything.
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: Any, data_state: dict, config: dict, *, force: bool = False) -> bool:
        """Start saving (returns at once when async); orbax writes to a temp dir and renames it
        when complete, so a kill mid-save leaves the previous checkpoints intact."""
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config)), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: Any, config: dict | None = None
                       ) -> tuple[int, Any, dict] | None:
        """(step, state, data_state) of the newest checkpoint that restores, or None if none.

        abstract_state: jax.ShapeDtypeStruct tree (with shardings) the state is restored into,
        so each device reads only its own shard. config: the current resolved config, to name the
        changed model fields when the checkpoints hold another model.

        Raises ValueError if the checkpoints hold arrays of other names or shapes than
        abstract_state (another model; a dtype is cast on restore), or if every checkpoint is damaged; re-raises storage
        errors (OSError, a bucket's UNAVAILABLE / 503). A damaged checkpoint (truncated files, a
        missing item) is moved to broken-STEP once an older one has restored.
        """
        broken = []
        for step in reversed(self.steps()):
            try:
                saved = self._saved_arrays(step)
                if saved is not None:
                    # Outside the try below: a different model is the user's error, not damage.
                    self._check_same_arrays(step, saved, abstract_state, config)
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except Exception as e:  # orbax raises many types for a damaged directory
                if isinstance(e, CheckpointMismatch) or _is_storage_error(e):
                    raise
                broken.append(self._report_broken(step, e))
                continue
            self._move_aside([b for b, _ in broken])  # so the run can save these steps again
            return step, restored["state"], restored["data"]
        if broken:
            raise ValueError(
                f"{self.directory}: no checkpoint restores ("
                + "; ".join(f"step {b}: {why}" for b, why in broken)
                + "). Nothing was deleted; move the directory away (or use a new --workdir) to "
                "start again from step 0")
        return None

    def _report_broken(self, step: int, e: Exception) -> tuple[int, str]:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        log.warning("checkpoint %d in %s is unreadable (%s); trying the previous one",
                    step, self.directory, msg)
        return step, msg

    def _saved_arrays(self, step: int) -> dict[str, tuple] | None:
        """{path: shape} of the saved state, from orbax's metadata (no array is read)."""
        tree = getattr(self.manager.item_metadata(step)["state"], "tree", None)
        return None if tree is None else array_shapes(tree, sep="/")

    def _check_same_arrays(self, step: int, saved: dict, abstract_state: Any,
                           config: dict | None) -> None:
        now = array_shapes(abstract_state, sep="/")
        if saved == now:
            return
        diffs = [f"{k}: only in the checkpoint" for k in saved if k not in now]
        diffs += [f"{k}: not in the checkpoint" for k in now if k not in saved]
        diffs += [f"{k}: checkpoint {list(saved[k])}, config {list(now[k])}"
                  for k in now if k in saved and saved[k] != now[k]]
        fields = self._changed_model_fields(step, config)
        raise CheckpointMismatch(
            f"{self.directory} holds a different model than the config: checkpoint {step} has "
            f"{len(diffs)} array(s) of another shape or name ({'; '.join(diffs[:3])}"
            f"{'; ...' if len(diffs) > 3 else ''})"
            + (f"; model fields changed since it was saved: {fields}" if fields else "")
            + f". Use a new --workdir, or restore the config it was written with "
            f"({self.directory.parent / 'config.json'} / checkpoint {step}'s config). "
            "Nothing was deleted.")

    def _changed_model_fields(self, step: int, now: dict | None) -> str:
        """`field saved -> now` for the resolved model config, if both are at hand."""
        if not now:
            return ""
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(
                config=ocp.args.JsonRestore()))["config"]
        except Exception:  # noqa: BLE001  only for the message
            return ""
        if not isinstance(saved, dict):
            return ""
        a, b = saved.get("model_config") or {}, now.get("model_config") or {}
        return ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                         if a.get(k) != b.get(k))

    def _move_aside(self, steps: list[int]) -> None:
        """checkpoints/STEP -> checkpoints/broken-STEP: kept for a person to look at, and out of
        orbax's step list so its max_to_keep never touches them and the step can be saved again."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                src, dst = self.directory / str(step), self.directory / f"broken-{step}"
                n = 1
                while dst.exists():
                    dst, n = self.directory / f"broken-{step}.{n}", n + 1
                if src.exists():
                    src.rename(dst)
                    log.warning("moved damaged checkpoint %s to %s", src, dst)
        sync_processes("jaxlm_checkpoints_moved_aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class CheckpointMismatch(ValueError):
    """The checkpoints hold another model's arrays (changed preset / overrides)."""


# A bucket or network that is down is not a damaged checkpoint: the caller should retry, and the
# checkpoint must not be skipped (tensorstore reports them as ValueError with a status name).
# HTTP codes only next to a word saying so: a bare 503 could be a shape or a byte count.
_STORAGE_ERROR = re.compile(r"UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|PERMISSION_DENIED|"
                            r"UNAUTHENTICATED|(HTTP|[Ss]tatus|[Cc]ode)[ :=]*(429|50[0234])\b|"
                            r"Service Unavailable|[Tt]imed? ?out")


def _is_storage_error(e: BaseException) -> bool:
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, IsADirectoryError,
                                                      NotADirectoryError)):
        return True  # a missing file is damage; any other OSError is the storage's
    return bool(_STORAGE_ERROR.search(str(e)))


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with the same shardings) for a tree of arrays."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def sync_processes(name: str) -> None:
    """A barrier across the processes of a multi-host run (nothing on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
