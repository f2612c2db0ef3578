"""Stage `feedback`: RL-CAI data. Pairs of the SL-CAI policy's responses, labelled by the
feedback model, prepared as a preference dataset."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np

from jaxcai import streams
from jaxcai.cai.context import RunContext
from jaxcai.cai.feedback import Judgement, judge_pairs, preference_records, sample_pairs
from jaxcai.cai.provenance import plain
from jaxcai.cai.stages.base import PipelineError, Stage, register


def _stats(cfg, prompts: list[str], records, judgements, skipped: Counter) -> dict[str, Any]:
    agree = [j.agreement for j in judgements if j.agreement is not None]
    p = np.array([r["p_chosen"] for r in records])
    return {
        "prompts": len(prompts),
        "pairs": len(records),
        "skipped": dict(skipped),
        "position_agreement": float(np.mean(agree)) if agree else None,
        "p_chosen_mean": float(p.mean()),
        "p_chosen_hist": np.histogram(p, bins=5, range=(0.5, 1.0))[0].tolist(),
        "labels": str(cfg.feedback.labels),
    }


@dataclasses.dataclass
class FeedbackStage(Stage):
    """Response pairs from the `sft` policy and their AI labels (`feedback/dataset`)."""

    def run(self, context: RunContext, inputs: dict[str, str]) -> tuple[str, dict[str, Any]]:
        cfg = context.cfg
        policy = inputs["sft"]
        prompts = [p for s in cfg.feedback.prompt_sets for p in context.prompts[s]["train"]]
        if not prompts:
            raise PipelineError(
                f"stage feedback: no prompts in sets {list(cfg.feedback.prompt_sets)}"
            )
        settings = context.feedback_settings()
        s = cfg.sampling

        def sample(lo: int, hi: int) -> list[dict[str, Any]]:
            config, params = context.model(policy)
            pairs = sample_pairs(
                config,
                params,
                context.chat,
                prompts[lo:hi],
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                batch_size=s.batch_size,
                seed=streams.seed("feedback.sample", cfg.seed),
                indices=range(lo, hi),
                mesh=context.mesh,
            )
            return [{"index": lo + i, "responses": list(p)} for i, p in enumerate(pairs)]

        def label(lo: int, hi: int) -> list[dict[str, Any]]:
            judgements = judge_pairs(
                context.judge(),
                context.constitution,
                prompts[lo:hi],
                [tuple(r["responses"]) for r in sampled[lo:hi]],
                settings=settings,
                seed=streams.seed("feedback.label", cfg.seed),
                indices=range(lo, hi),
            )
            return [{"index": lo + i, **dataclasses.asdict(j)} for i, j in enumerate(judgements)]

        sampled = context.chunks(self.name, "sample", len(prompts), sample)
        labels = context.chunks(self.name, "label", len(prompts), label)
        judgements = [Judgement(**{k: v for k, v in r.items() if k != "index"}) for r in labels]
        skipped: Counter = Counter()
        records = preference_records(
            prompts,
            [tuple(r["responses"]) for r in sampled],
            judgements,
            skipped=skipped,
            extra=lambda i: {"prompt_index": i},
        )
        if not records:
            raise PipelineError(
                f"stage feedback: no usable pairs out of {len(prompts)} ({dict(skipped)})"
            )
        stats = _stats(cfg, prompts, records, judgements, skipped)
        dataset = context.write_dataset(
            self.name, "preference", "preferences.jsonl", records,
            policy=policy, settings=plain(context.cfg.feedback), stats=stats,
        )  # fmt: skip
        return dataset, stats


FEEDBACK = register(FeedbackStage("feedback", needs=("sft",), produces="dataset", samples=True))
