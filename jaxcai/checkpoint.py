"""Orbax checkpoints of the train state, restorable onto any mesh.

Each checkpoint step holds the `TrainState` (params, optimizer state, step, RNG), a
small JSON `meta` (the step, the config's objective) and, when given, the state of each
process's grain data iterator (one small JSON file per process), so a resumed run reads
exactly the batch the interrupted one would have read next. Saves are asynchronous
and atomic (orbax writes a temporary directory and renames it when complete), so a run
killed mid-save leaves the previous checkpoints intact; a latest checkpoint that fails to
restore is reported and the one before it is used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

__all__ = ["Checkpointer", "NoCheckpointError"]


class NoCheckpointError(FileNotFoundError):
    """No checkpoint in the directory could be restored."""


class Checkpointer:
    """Save and restore `(state, meta)` under `directory`, keeping the last `keep`."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Completed checkpoint steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        meta: dict[str, Any],
        *,
        data: Any = None,
        extra: dict[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Start saving (returns at once when async); `wait` blocks until it is on disk.

        `data` is a grain iterator whose position is saved with the state; `extra` names
        more pytrees of arrays saved beside it (`restore_item` reads one back)."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data)
        for name, tree in (extra or {}).items():
            if name in items:
                raise ValueError(f"checkpoint item {name!r} is reserved")
            items[name] = ocp.args.StandardSave(tree)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_item(self, step: int, name: str, target: Any) -> Any:
        """The extra item `name` of checkpoint `step`, into `target`'s shapes and
        shardings (`NoCheckpointError` when the checkpoint has no such item)."""
        if not (self.directory / str(step) / name).is_dir():
            raise NoCheckpointError(f"checkpoint {step} in {self.directory} has no {name!r}")
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
        )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(abstract)})
        )
        return restored[name]

    def restore_data(self, step: int, iterator: Any) -> None:
        """Set `iterator` to the position saved with checkpoint `step` (raises
        `NoCheckpointError` when that checkpoint holds none for this process)."""
        if not (self.directory / str(step) / "data").is_dir():
            raise NoCheckpointError(f"checkpoint {step} in {self.directory} has no data state")
        try:
            self.manager.restore(
                step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator))
            )
        except (ValueError, OSError, KeyError) as e:
            raise NoCheckpointError(
                f"checkpoint {step} in {self.directory}: data iterator state unreadable ({e})"
            ) from e

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, target: Any, step: int | None = None) -> tuple[int, Any, dict[str, Any]]:
        """Restore into the shapes, dtypes and shardings of `target` (arrays or
        `jax.ShapeDtypeStruct`s), so a checkpoint written on one mesh loads onto another.

        Without `step`, tries the newest checkpoint, then older ones if it is unreadable.
        """
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
        )
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if not candidates:
            raise NoCheckpointError(f"no checkpoint in {self.directory}")
        errors = []
        for candidate in candidates:
            try:
                restored = self.manager.restore(
                    candidate,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
                if errors:
                    log.warning(
                        "restored checkpoint %d after newer ones failed: %s",
                        candidate,
                        "; ".join(errors),
                    )
                return candidate, restored["state"], dict(restored["meta"])
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                message = f"checkpoint {candidate} in {self.directory} is unreadable ({e})"
                log.error(message)
                errors.append(message)
        raise NoCheckpointError("; ".join(errors))

    def restore_params(self, abstract_params: Any, step: int | None = None) -> tuple[int, Any]:
        """Only the params of checkpoint `step` (default: the newest), into the shapes and
        shardings of `abstract_params` (`jax.ShapeDtypeStruct`s with `.sharding`)."""
        steps = self.steps()
        if not steps:
            raise NoCheckpointError(f"no checkpoint in {self.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise NoCheckpointError(f"no checkpoint {step} in {self.directory} (have {steps})")
        target = {"params": abstract_params}
        restore_args = jax.tree_util.tree_map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), target
        )
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=target, restore_args=restore_args, partial_restore=True
                    )
                ),
            )
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            raise NoCheckpointError(
                f"checkpoint {step} in {self.directory}: params unreadable ({e})"
            ) from e
        return step, restored["state"]["params"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
