"""Stage `eval`: the policies (initial, then sft, dpo and rl when the run has them) answer the
held-out prompts; the reward model (if any) scores them, the feedback model judges their
harm and their preference over the initial policy, and scores the choice files.

Each per-prompt measure is `context.spread` over the processes of a multi-process launch
(every prompt's result depends on its index only); the choice files are scored whole by
every process."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxcai import streams
from jaxcai.cai import evaluate as E
from jaxcai.cai import io
from jaxcai.cai.context import RunContext
from jaxcai.cai.critique import critique_and_revise
from jaxcai.cai.feedback import Judgement
from jaxcai.cai.stages.base import Stage, register
from jaxcai.cai.stages.train import train_config

Responses = dict[str, dict[str, list[str]]]  # policy -> prompt set -> responses


def _answers(context: RunContext, model: tuple, prompts: list[str], settings) -> list[str]:
    """One policy's answers to one held-out set (spread over the processes)."""
    config, params = model

    def answer(lo: int, hi: int) -> list[str]:
        out = critique_and_revise(
            config,
            params,
            context.chat,
            context.constitution,
            prompts[lo:hi],
            rounds=0,
            seed=streams.seed("eval.responses", context.cfg.seed),
            few_shot=False,
            settings=settings,
            indices=range(lo, hi),
            mesh=context.mesh,
        )
        return [r.initial for r in out]

    return context.spread(answer, 0, len(prompts))


def _responses(context: RunContext, policies: dict[str, str], sets: dict[str, list[str]]):
    """Each policy's greedy (`eval.temperature`) answers to each held-out set."""
    cfg = context.cfg
    settings = dataclasses.replace(context.sampling(), temperature=float(cfg.eval.temperature))
    responses: Responses = {}
    for name, path in policies.items():
        model = context.model(path)
        responses[name] = {s: _answers(context, model, p, settings) for s, p in sets.items()}
    return responses


def _rewards(context: RunContext, rm: str, sets, responses: Responses) -> dict[str, Any]:
    """Reward-model scores of every answer (written to `reward_scores.json`), summarised."""
    config, params = context.model(rm)
    max_len = train_config(context, "rm", "unused", "unused").data.max_len

    def scored(prompts: list[str], answers: list[str]) -> list[float]:
        return context.spread(
            lambda lo, hi: E.reward_scores(
                config, params, context.chat, prompts[lo:hi], answers[lo:hi], max_len=max_len
            ).tolist(),
            0,
            len(prompts),
        )

    scores = {name: {s: scored(sets[s], responses[name][s]) for s in sets} for name in responses}
    if context.writer:
        io.write_json(context.stage_dir("eval") / "reward_scores.json", scores)
    return {name: {s: E.summary(v) for s, v in per_set.items()} for name, per_set in scores.items()}


def _preferences(context: RunContext, judge, sets, responses: Responses) -> dict[str, Any]:
    """How often the feedback model prefers each trained policy's answer to the initial's."""
    seed = streams.seed("eval.preference", context.cfg.seed)
    fb = context.feedback_settings()

    def rate(prompts: list[str], first: list[str], second: list[str]) -> dict[str, float]:
        def judged(lo: int, hi: int) -> list[dict[str, Any]]:
            out = E.preference_judgements(
                judge, context.constitution, prompts[lo:hi], first[lo:hi], second[lo:hi],
                settings=fb, seed=seed, indices=range(lo, hi),
            )  # fmt: skip
            return [dataclasses.asdict(j) for j in out]

        judgements = context.spread(judged, 0, len(prompts))
        return E.preference_summary([Judgement(**j) for j in judgements])

    return {
        name: {s: rate(sets[s], responses[name][s], responses["initial"][s]) for s in sets}
        for name in responses
        if name != "initial"
    }


def _harm(context: RunContext, judge, prompts: list[str], answers: list[str]) -> dict:
    """The share of `answers` the feedback model calls harmful (`E.harm_share`)."""
    p = context.spread(
        lambda lo, hi: E.harm_probs(
            judge, context.constitution, prompts[lo:hi], answers[lo:hi]
        ).tolist(),
        0,
        len(prompts),
    )
    return E.harm_summary(np.asarray(p, np.float64))


def _choices(context: RunContext, judge) -> dict[str, Any]:
    """The feedback model's scores on each multiple-choice file of `eval.choice_files`."""
    from jaxcai.evals.choice import choice_files, evaluate_choices, read_choice_file

    out = {}
    for path in choice_files(list(context.cfg.eval.choice_files)):
        report = evaluate_choices(
            judge.config, judge.params, judge.fmt, read_choice_file(path), mesh=context.mesh
        )
        out[path.name] = report.summary()
    return out


@dataclasses.dataclass
class EvalStage(Stage):
    """The policies compared on held-out prompts (`eval/results.json`)."""

    def run(self, context: RunContext, inputs: dict[str, str]) -> tuple[str, dict[str, Any]]:
        cfg = context.cfg
        policies = {"initial": inputs["initial"]}
        for name in ("sft", "dpo", "rl"):
            if name in inputs:
                policies[name] = inputs[name]
        final = list(policies)[-1]
        limit = cfg.eval.max_prompts
        sets = {k: v["eval"][:limit] if limit else v["eval"] for k, v in context.prompts.items()}
        responses = _responses(context, policies, sets)
        results: dict[str, Any] = {
            "policies": policies,
            "prompts": {k: len(v) for k, v in sets.items()},
        }
        if "rm" in inputs:
            results["reward"] = _rewards(context, inputs["rm"], sets, responses)
        judge = context.judge()
        results["harm"] = {
            name: {s: _harm(context, judge, sets[s], responses[name][s]) for s in sets}
            for name in policies
        }
        if final != "initial":
            results["preference_vs_initial"] = _preferences(context, judge, sets, responses)
        if cfg.eval.choice_files:
            results["choice"] = _choices(context, judge)
        rows = [
            {"policy": name, "set": s, "prompt": p, "response": r}
            for name, per_set in responses.items()
            for s, texts in per_set.items()
            for p, r in zip(sets[s], texts, strict=True)
        ]
        stage_dir = context.stage_dir(self.name)
        if context.writer:
            io.write_jsonl(stage_dir / "responses.jsonl", rows)
            io.write_json(stage_dir / "results.json", results)
        return str(stage_dir / "results.json"), results


EVAL = register(
    EvalStage(
        "eval",
        needs=("initial",),
        uses=("sft", "rm", "dpo", "rl"),
        produces="results",
        samples=True,
    )
)
