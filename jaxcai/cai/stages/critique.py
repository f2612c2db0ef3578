"""Stage `critique`: SL-CAI data. Critique -> revision rounds on the red-team prompts,
mixed with sampled answers to helpfulness prompts, prepared as an SFT dataset."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from jaxcai import streams
from jaxcai.cai import io
from jaxcai.cai.context import RunContext
from jaxcai.cai.critique import Revised, critique_and_revise, sft_pairs
from jaxcai.cai.provenance import plain
from jaxcai.cai.stages.base import PipelineError, Stage, register

log = logging.getLogger(__name__)


def _revised(row: dict[str, Any]) -> Revised:
    return Revised(row["prompt"], row["initial"], row["rounds"])


def _sample(
    context: RunContext,
    model: tuple,
    prompts: list[str],
    lo: int,
    hi: int,
    *,
    rounds: int,
    seed: int,
    few_shot: bool,
) -> list[Revised]:
    """`critique_and_revise` on `prompts[lo:hi]` with the run's settings."""
    config, params = model
    return critique_and_revise(
        config,
        params,
        context.chat,
        context.constitution,
        prompts[lo:hi],
        rounds=rounds,
        seed=seed,
        few_shot=few_shot,
        settings=context.sampling(),
        indices=range(lo, hi),
        mesh=context.mesh,
    )


def _helpful_count(cfg, pairs: int, available: int) -> int:
    """Helpfulness samples for the mix: `helpful_ratio` per revision pair, at most all."""
    want = int(round(cfg.cai.helpful_ratio * pairs))
    n = min(want, available)
    if n < want:
        log.warning(
            "cai.helpful_ratio=%s asks for %d helpfulness samples; only %d helpful prompts",
            cfg.cai.helpful_ratio,
            want,
            available,
        )
    return n


@dataclasses.dataclass
class CritiqueStage(Stage):
    """Revision pairs and helpful answers from the initial policy (`critique/dataset`)."""

    def run(self, context: RunContext, inputs: dict[str, str]) -> tuple[str, dict[str, Any]]:
        cfg = context.cfg
        model = context.model(inputs["initial"])
        red = context.prompts["red_team"]["train"]
        if not red:
            raise PipelineError("stage critique: no red-team training prompts (prompts.red_team)")

        def revise(lo: int, hi: int) -> list[dict[str, Any]]:
            seed = streams.seed("critique.red_team", cfg.seed)
            out = _sample(
                context,
                model,
                red,
                lo,
                hi,
                rounds=cfg.cai.revision_rounds,
                seed=seed,
                few_shot=cfg.cai.few_shot,
            )
            return [dataclasses.asdict(r) for r in out]

        trajectories = context.chunks(self.name, "revise", len(red), revise)
        records = [_revised(t) for t in trajectories]
        up_to = {"all": None, "final": -1}.get(str(cfg.cai.sft_rounds), cfg.cai.sft_rounds)
        pairs = sft_pairs(records, up_to=None if up_to is None else int(up_to))
        helpful = context.prompts["helpful"]["train"]

        def answer(lo: int, hi: int) -> list[dict[str, Any]]:
            seed = streams.seed("critique.helpful", cfg.seed)  # a stream of its own
            out = _sample(context, model, helpful, lo, hi, rounds=0, seed=seed, few_shot=False)
            return [{"prompt": r.prompt, "response": r.initial} for r in out]

        n_helpful = _helpful_count(cfg, len(pairs), len(helpful))
        helpful_rows = context.chunks(self.name, "helpful", n_helpful, answer)
        mix = pairs + [
            {"prompt": h["prompt"], "response": h["response"], "metadata": {"source": "helpful"}}
            for h in helpful_rows
            if h["response"].strip()
        ]
        if not mix:
            raise PipelineError("stage critique: every revision and helpful answer was empty")
        stats = {
            "red_team_prompts": len(red),
            "revision_rounds": int(cfg.cai.revision_rounds),
            "revision_pairs": len(pairs),
            "helpful_samples": len(mix) - len(pairs),
            "examples": len(mix),
            "empty_revisions_dropped": sum(len(r.rounds) for r in records) - len(pairs)
            if up_to is None
            else None,
        }
        return self._write(context, inputs, trajectories, mix, stats), stats

    def _write(self, context: RunContext, inputs: dict[str, str], trajectories, mix, stats):
        """The trajectories as a file, and the SFT mix as a file and a dataset."""
        if context.writer:
            io.write_jsonl(context.stage_dir(self.name) / "trajectories.jsonl", trajectories)
        return context.write_dataset(
            self.name, "sft", "sft.jsonl", mix,
            policy=inputs["initial"], settings=plain(context.cfg.cai), stats=stats,
        )  # fmt: skip


CRITIQUE = register(CritiqueStage("critique", needs=("initial",), produces="dataset", samples=True))
