"""Training checkpoints with orbax's CheckpointManager: async saves every N steps, the last K
kept, each holding the train state (params, optimizer state, step counters), the data iterator's
state and the resolved config. Restoring falls back to an older step if the latest is broken."""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxlm.paths import as_path

log = logging.getLogger("jaxlm.train")


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = as_path(directory)  # local, or gs:// (orbax writes buckets itself)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "config"))

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

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, data_state) of the newest checkpoint that restores, or None if none.

        abstract_state: jax.ShapeDtypeStruct tree (with shardings) the state is restored into,
        so each device reads only its own shard. A checkpoint that fails to restore (truncated
        files, a missing item) is reported and the next older one is tried.
        """
        broken = []
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
                for bad in broken:  # so the run can save these step numbers again
                    self.manager.delete(bad)
                return step, restored["state"], restored["data"]
            except Exception as e:  # orbax raises many types for a damaged directory
                msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                log.warning("checkpoint %d in %s is unreadable (%s); trying the previous one",
                            step, self.directory, msg)
                broken.append(step)
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with the same shardings) for a tree of arrays."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
