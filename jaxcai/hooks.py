"""What a training run does between steps, as small hooks on one shared context.

The loop (`jaxcai.loop.run`) is: take a batch from `context.feed`, run the step, then
every hook whose trigger is due. A hook has an `every` (steps; 0 = never between steps),
`run(context)` for a due step, `end(context)` once after the last step, and `close()`
in every case (also after an error). The built-in hooks, in the order they run:

    MetricsHook       each step's metrics: non-finite check, tokens/s, MFU, metrics.jsonl
    (the objective's) `Objective.hooks`, e.g. online RL's value step and rollout metrics
    EvalHook          eval loss every `trainer.eval_every` steps and at the end
    GenerationHook    answers to eval prompts, scored against the references (the end)
    CheckpointHook    an orbax checkpoint every `trainer.checkpoint_every` steps, and last
    PreemptionHook    on SIGTERM: checkpoint, then exit between steps
    ExportHook        the final params as a Hugging Face directory (`trainer.export_hf`)

An objective that needs work between steps adds its own hooks through
`Objective.hooks` (they run before checkpoints, so state they change is saved current; a
hook may add host values to `context.step_metrics`, which `MetricsHook` writes with the
device values); one that makes its own batches (online RL) has an
`Objective.feed`, which the loop builds in place of the data pipeline's `Feed`.
Metrics are read one step late (the step after runs meanwhile); a hook that needs them
current (evaluation, a checkpoint, which must never hold a non-finite step) calls
`context.flush()` first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import jax
from omegaconf import DictConfig

from jaxcai import hf
from jaxcai.checkpoint import Checkpointer
from jaxcai.data.batches import eval_index_batches, global_batch
from jaxcai.data.training import TrainData
from jaxcai.metrics import MetricsWriter, peak_flops_per_device
from jaxcai.model_config import flops_per_token

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointHook",
    "EvalHook",
    "ExportHook",
    "GenerationHook",
    "Hook",
    "MetricsHook",
    "PreemptionHook",
    "RunContext",
    "TrainingError",
    "default_hooks",
]


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss with `trainer.nonfinite=stop`, ...)."""


@dataclasses.dataclass
class RunContext:
    """What the loop and its hooks share: the config, the trainer, the data, the state."""

    cfg: DictConfig
    run_dir: Path
    trainer: Any  # jaxcai.trainer.Trainer
    data: TrainData
    eval_rows: Any
    # .next() -> (global batch, tokens in it); .iterator is checkpointed, and so are
    # .checkpoint_items() when the feed has them (restored by .restore(checkpointer, step))
    feed: Any
    checkpointer: Checkpointer
    writer: MetricsWriter
    state: Any
    tokenizer: Any = None  # saved with an export
    step: int = 0  # updates applied
    step_metrics: Any = None  # the last step's metrics, still on device
    step_tokens: int = 0  # real tokens in the last step's batch
    last: dict[str, Any] = dataclasses.field(default_factory=dict)  # last train metrics
    final: dict[str, Any] = dataclasses.field(default_factory=dict)  # end-of-run metrics
    saved_step: int | None = None
    hooks: list[Hook] = dataclasses.field(default_factory=list)

    def flush(self) -> None:
        """Finish every step's metrics read so far (`MetricsHook`)."""
        for hook in self.hooks:
            if isinstance(hook, MetricsHook):
                hook.flush(self)

    def save(self, step: int, force: bool = False) -> None:
        meta = {"step": step, "data_seed": self.cfg.trainer.seed}
        meta["objective"] = self.cfg.objective.name
        extra = self.feed.checkpoint_items() if hasattr(self.feed, "checkpoint_items") else None
        self.checkpointer.save(
            step, self.state, meta, data=self.feed.iterator, extra=extra, force=force
        )
        self.saved_step = step


class Hook:
    """A trigger (`every` steps) and what to do then, at the end and when closing."""

    every: int = 0

    def due(self, ctx: RunContext) -> bool:
        return bool(self.every) and ctx.step % self.every == 0

    def run(self, ctx: RunContext) -> None:
        """Work after a step where `due`."""

    def end(self, ctx: RunContext) -> None:
        """Work once after the last step."""

    def close(self) -> None:
        """Release what the hook holds (runs after errors too)."""


class MetricsHook(Hook):
    """Reads each step's device metrics one step late, stops (or counts a skip) on a
    non-finite step, and writes every `log_every` steps with tokens/s and MFU."""

    every = 1

    def __init__(self, ctx: RunContext, bar: Any = None):
        t = ctx.cfg.trainer
        self.log_every, self.steps, self.nonfinite = t.log_every, t.steps, t.nonfinite
        self.peak = peak_flops_per_device(t.peak_tflops)
        self.flops_token = flops_per_token(ctx.trainer.model, ctx.cfg.data.max_len)
        self.bar = bar
        self.pending: tuple | None = None
        self.skipped = 0
        self.window = {"tokens": 0, "time": time.perf_counter()}

    def run(self, ctx: RunContext) -> None:
        """Hold this step's metrics; finish the previous step's (read while this one runs)."""
        self.flush(ctx)
        self.pending = (ctx.step, ctx.step_metrics, ctx.step_tokens)

    def flush(self, ctx: RunContext) -> None:
        if self.pending is not None:
            record, self.pending = self.pending, None
            self._finish(ctx, *record)

    def _finish(self, ctx: RunContext, step: int, device_metrics: Any, n_tokens: int) -> None:
        m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        self.window["tokens"] += n_tokens
        if m.pop("nonfinite"):
            if self.nonfinite == "stop":
                raise TrainingError(
                    f"step {step}: loss {m['loss']} / grad norm {m['grad_norm']} is not "
                    f"finite; the update was not applied and no checkpoint holds it "
                    f"(set trainer.nonfinite=skip to skip such steps)"
                )
            self.skipped += 1
            log.warning("step %d: non-finite loss, update skipped", step)
        if step % self.log_every == 0 or step == self.steps:
            now = time.perf_counter()
            m["tokens_per_s"] = self.window["tokens"] / max(now - self.window["time"], 1e-9)
            peak = self.peak * jax.device_count() if self.peak else None
            m["mfu"] = m["tokens_per_s"] * self.flops_token / peak if peak else None
            m["skipped_steps"] = self.skipped
            self.window.update(tokens=0, time=now)
            ctx.writer.write(step, m)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
        ctx.last = m

    def end(self, ctx: RunContext) -> None:
        self.flush(ctx)


def evaluate(ctx: RunContext) -> dict[str, float]:
    """The eval step over the eval split (`trainer.eval_batches` batches; 0 = all)."""
    t, tr = ctx.cfg.trainer, ctx.trainer
    batches = (
        global_batch(ctx.eval_rows, idx, t.grad_accum, tr.mesh, tr.rules)
        for idx in eval_index_batches(len(ctx.eval_rows), t.batch_size, t.eval_batches)
    )
    metrics = tr.evaluate(ctx.state.params, batches)
    return {f"eval/{k}": v for k, v in metrics.items()}


class EvalHook(Hook):
    """Eval metrics every `trainer.eval_every` steps (before the last) and at the end."""

    def __init__(self, ctx: RunContext):
        self.every, self.steps = ctx.cfg.trainer.eval_every, ctx.cfg.trainer.steps

    def due(self, ctx: RunContext) -> bool:
        return super().due(ctx) and ctx.step < self.steps

    def run(self, ctx: RunContext) -> None:
        ctx.flush()
        ctx.writer.write(ctx.step, evaluate(ctx))

    def end(self, ctx: RunContext) -> None:
        ctx.final.update(evaluate(ctx))


class GenerationHook(Hook):
    """At the end: greedy answers to the first `trainer.generate_eval` eval prompts,
    scored against the references (`eval/gen_*`), written to `generation_eval.jsonl`."""

    def end(self, ctx: RunContext) -> None:
        from jaxcai.data.builders import decode_record
        from jaxcai.evals.generation import evaluate_generation

        if jax.process_count() > 1:
            log.warning("trainer.generate_eval: sampling runs in one process; skipped")
            return
        t, data = ctx.cfg.trainer, ctx.data
        records = [decode_record(data.eval[i]) for i in range(min(t.generate_eval, len(data.eval)))]
        out = evaluate_generation(
            ctx.trainer.model,
            ctx.state.params,
            data.tok,
            records,
            max_new_tokens=t.generate_max_new_tokens,
            mesh=ctx.trainer.mesh,
            progress=t.progress,
        )
        with (ctx.run_dir / "generation_eval.jsonl").open("w", encoding="utf-8") as f:
            for example in out["examples"]:
                f.write(json.dumps(example, ensure_ascii=False) + "\n")
        ctx.final.update({f"eval/gen_{k}": v for k, v in out["metrics"].items()})


class CheckpointHook(Hook):
    """A checkpoint every `trainer.checkpoint_every` steps, and the final step's."""

    def __init__(self, ctx: RunContext):
        self.every, self.steps = ctx.cfg.trainer.checkpoint_every, ctx.cfg.trainer.steps

    def run(self, ctx: RunContext) -> None:
        ctx.flush()  # a non-finite step stops before it is saved
        ctx.save(ctx.step)

    def end(self, ctx: RunContext) -> None:
        if self.steps not in ctx.checkpointer.steps():
            ctx.save(self.steps, force=True)
        ctx.checkpointer.wait()


class PreemptionHook(Hook):
    """Remembers a SIGTERM; after the step it arrived in, saves a checkpoint and exits."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint, then exiting")
        self.requested = True

    def due(self, ctx: RunContext) -> bool:
        return self.requested

    def run(self, ctx: RunContext) -> None:
        if ctx.saved_step != ctx.step:
            ctx.flush()
            ctx.save(ctx.step)
        ctx.checkpointer.wait()
        raise SystemExit(f"preempted at step {ctx.step}; checkpoint saved")

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


class ExportHook(Hook):
    """At the end: the final params as a Hugging Face directory `hf/` with the tokenizer."""

    def end(self, ctx: RunContext) -> None:
        if ctx.trainer.objective.head == "reward":
            log.warning(
                "trainer.export_hf: a reward model has no Hugging Face causal-LM layout; skipped"
            )
            return
        hf.save_pretrained(
            ctx.run_dir / "hf",
            ctx.trainer.model,
            ctx.state.params,
            progress=ctx.cfg.trainer.progress,
            tokenizer=ctx.tokenizer,
        )


def default_hooks(ctx: RunContext, bar: Any = None) -> list[Hook]:
    """The metrics hook, the objective's own hooks (so whatever state they change is
    current when a checkpoint is saved), then the hooks `trainer` settings ask for."""
    t = ctx.cfg.trainer
    hooks: list[Hook] = [MetricsHook(ctx, bar)]
    if ctx.trainer.objective.hooks is not None:  # before checkpoints: their state is saved
        hooks += list(ctx.trainer.objective.hooks(ctx))
    if ctx.eval_rows is not None:  # objectives that sample their data have no eval split
        hooks.append(EvalHook(ctx))
    if t.generate_eval:
        hooks.append(GenerationHook())
    hooks += [CheckpointHook(ctx), PreemptionHook()]
    if t.export_hf:
        hooks.append(ExportHook())
    return hooks
