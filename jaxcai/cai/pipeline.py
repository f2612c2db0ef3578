"""The Constitutional AI pipeline behind `jaxcai-cai`: every stage in one run directory.

    initial   the helpful model to start from (`policy`), or a random one for smoke runs
    critique  SL-CAI data: critique -> revision rounds on red-team prompts, mixed with
              sampled answers to helpfulness prompts          -> critique/dataset (sft)
    sft       supervised fine-tuning on it                      -> sft/ (a training run)
    feedback  RL-CAI data: pairs from the SL-CAI policy, labelled by the feedback model
                                                                -> feedback/dataset (pref.)
    rm        a reward model on the AI-feedback labels          -> rm/
    dpo       DPO of the SL-CAI policy on them                  -> dpo/
    eval      held-out prompts: the policies compared           -> eval/results.json

A stage whose `stage.json` exists is done and skipped, so an interrupted run resumes by
running the same command again: sampling stages keep finished chunks of prompts
(`parts/`), training stages resume from their last checkpoint. `inputs.<stage>` hands a
stage's output in from elsewhere instead of running it. Every dataset records its
provenance in its TFDS metadata, every trained model in `provenance.json` and
`MODEL_CARD.md` beside its checkpoints; `report.md` gathers the numbers and plots.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import jaxcai
from jaxcai import hf, model, sharding
from jaxcai.cai import evaluate as E
from jaxcai.cai.constitution import Constitution, load_constitution
from jaxcai.cai.critique import Revised, SamplingSettings, critique_and_revise, sft_pairs
from jaxcai.cai.feedback import (
    FeedbackSettings,
    Judgement,
    ModelJudge,
    judge_pairs,
    preference_records,
    sample_pairs,
)
from jaxcai.chat import ChatError, ChatFormat
from jaxcai.config import CHAT_KINDS, ConfigError, compose, model_config
from jaxcai.data import builders
from jaxcai.data.training import open_dataset
from jaxcai.load import chat_format, load_model, model_config_of
from jaxcai.sample import SAMPLING_RULES

log = logging.getLogger(__name__)

__all__ = ["STAGES", "PipelineError", "run_cai", "stage_record"]

STAGES = ("critique", "sft", "feedback", "rm", "dpo", "eval")
TRAINED = {"sft": "sft", "rm": "rm", "dpo": "dpo"}  # stage -> objective
DONE = "stage.json"


class PipelineError(RuntimeError):
    """A stage cannot run: a missing input, an empty dataset, ..."""


def stage_record(run_dir: str | os.PathLike, stage: str) -> dict[str, Any] | None:
    """A finished stage's record (outputs, stats, provenance), or None if not done."""
    path = Path(run_dir) / stage / DONE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, value: Any) -> None:
    """Write atomically: a reader never sees half a file (and a kill leaves none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclasses.dataclass
class _Run:
    """What every stage shares: the config, the run directory and loaded inputs."""

    cfg: DictConfig
    run_dir: Path
    chat: ChatFormat  # the policy's tokenizer and chat format (all policies share them)
    feedback_chat: ChatFormat  # the feedback model's (its own checkpoint's by default)
    constitution: Constitution
    prompts: dict[str, dict[str, list[str]]]  # set -> {"train", "eval"} -> prompts
    prompt_sources: dict[str, Any]
    mesh: Any
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)  # stage -> path
    _models: dict[str, tuple] = dataclasses.field(default_factory=dict)

    @property
    def progress(self) -> bool:
        return bool(self.cfg.progress) and jax.process_index() == 0

    def model(self, path: str) -> tuple:
        """(config, params) of a policy or reward model, loaded once per path."""
        if path not in self._models:
            self._models.clear()  # keep at most one model in memory between stages
            numerics = {k: self.cfg.model[k] for k in ("dtype", "param_dtype")}
            self._models[path] = load_model(
                path, mesh=self.mesh, rules=SAMPLING_RULES, progress=self.progress, **numerics
            )
        return self._models[path]

    def sampling(self) -> SamplingSettings:
        s = self.cfg.sampling
        return SamplingSettings(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            batch_size=s.batch_size,
        )

    def feedback_settings(self) -> FeedbackSettings:
        f = self.cfg.feedback
        return FeedbackSettings(
            principles=f.principles,
            debias=f.debias,
            cot=f.cot,
            cot_max_new_tokens=f.cot_max_new_tokens,
            few_shot=f.few_shot,
        )

    def judge(self) -> ModelJudge:
        path = self.cfg.feedback_model or self.outputs["initial"]
        config, params = self.model(path)
        return ModelJudge(
            config,
            params,
            self.feedback_chat,
            batch_size=self.cfg.sampling.batch_size,
            temperature=self.cfg.sampling.temperature,
            top_p=self.cfg.sampling.top_p,
            mesh=self.mesh,
        )

    def provenance(self, stage: str, **extra: Any) -> dict[str, Any]:
        c = self.constitution
        return {
            "stage": stage,
            "jaxcai_version": jaxcai.__version__,
            "seed": int(self.cfg.seed),
            "constitution": {"name": c.name, "source": c.source, "sha256": c.sha256},
            "prompts": self.prompt_sources,
            "initial_policy": self.outputs.get("initial"),
            "feedback_model": self.cfg.feedback_model or self.outputs.get("initial"),
            "chat": {"policy": self.chat.describe(), "feedback": self.feedback_chat.describe()},
            "sampling": OmegaConf.to_container(self.cfg.sampling, resolve=True),
            **extra,
        }

    def chunks(
        self, stage: str, name: str, n: int, work: Callable[[int, int], list[dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """`work(lo, hi)` over `[0, n)` in chunks, each kept in `parts/` once finished, so
        a restarted stage does only the chunks it had not finished."""
        size = int(self.cfg.chunk_size)
        parts = self.run_dir / stage / "parts"
        rows: list[dict[str, Any]] = []
        starts = range(0, n, size)
        for lo in tqdm(starts, desc=f"{stage}: {name}", unit="chunk", disable=not self.progress):
            path = parts / f"{name}-c{size}-{lo:07d}.jsonl"
            if path.is_file():
                rows += _read_jsonl(path)
                continue
            chunk = work(lo, min(n, lo + size))
            if jax.process_index() == 0:
                _write_jsonl(path, chunk)
            rows += chunk
        return rows


# ----- stages -------------------------------------------------------------------------


def _stage_initial(run: _Run) -> dict[str, Any]:
    """The starting policy: `policy`, or a randomly initialised `model` (smoke runs)."""
    if run.cfg.policy:
        return {"outputs": {"model": str(run.cfg.policy)}, "stats": {"random_init": False}}
    config = model_config(run.cfg.model)
    params = model.init_params(config, jax.random.key(run.cfg.seed))
    path = run.run_dir / "initial" / "hf"
    hf.save_pretrained(path, config, params, progress=False, tokenizer=run.chat.tokenizer)
    return {"outputs": {"model": str(path)}, "stats": {"random_init": True}}


def _stage_critique(run: _Run) -> dict[str, Any]:
    cfg = run.cfg
    config, params = run.model(run.outputs["initial"])
    settings = run.sampling()
    red = run.prompts["red_team"]["train"]
    if not red:
        raise PipelineError("stage critique: no red-team training prompts (prompts.red_team)")

    def revise(lo: int, hi: int) -> list[dict[str, Any]]:
        out = critique_and_revise(
            config,
            params,
            run.chat,
            run.constitution,
            red[lo:hi],
            rounds=cfg.cai.revision_rounds,
            seed=cfg.seed,
            few_shot=cfg.cai.few_shot,
            settings=settings,
            indices=range(lo, hi),
            mesh=run.mesh,
        )
        return [dataclasses.asdict(r) for r in out]

    trajectories = run.chunks("critique", "revise", len(red), revise)
    records = [_revised(t) for t in trajectories]
    up_to = {"all": None, "final": -1}.get(str(cfg.cai.sft_rounds), cfg.cai.sft_rounds)
    pairs = sft_pairs(records, up_to=None if up_to is None else int(up_to))
    helpful = run.prompts["helpful"]["train"]
    want = int(round(cfg.cai.helpful_ratio * len(pairs)))
    n_helpful = min(want, len(helpful))
    if n_helpful < want:
        log.warning(
            "cai.helpful_ratio=%s asks for %d helpfulness samples; only %d helpful prompts",
            cfg.cai.helpful_ratio,
            want,
            len(helpful),
        )

    def answer(lo: int, hi: int) -> list[dict[str, Any]]:
        out = critique_and_revise(
            config,
            params,
            run.chat,
            run.constitution,
            helpful[lo:hi],
            rounds=0,
            seed=cfg.seed + 1,  # a stream of its own
            few_shot=False,
            settings=settings,
            indices=range(lo, hi),
            mesh=run.mesh,
        )
        return [{"prompt": r.prompt, "response": r.initial} for r in out]

    helpful_rows = run.chunks("critique", "helpful", n_helpful, answer)
    mix = pairs + [
        {"prompt": h["prompt"], "response": h["response"], "metadata": {"source": "helpful"}}
        for h in helpful_rows
        if h["response"].strip()
    ]
    if not mix:
        raise PipelineError("stage critique: every revision and helpful answer was empty")
    stage_dir = run.run_dir / "critique"
    _write_jsonl(stage_dir / "trajectories.jsonl", trajectories)
    _write_jsonl(stage_dir / "sft.jsonl", mix)
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
    dataset = builders.prepare(
        "sft",
        str(stage_dir / "sft.jsonl"),
        stage_dir / "dataset",
        provenance=run.provenance(
            "critique", policy=run.outputs["initial"], settings=_plain(cfg.cai), stats=stats
        ),
        overwrite=True,
    )
    return {"outputs": {"dataset": str(dataset.path)}, "stats": stats}


def _revised(row: dict[str, Any]) -> Revised:
    return Revised(row["prompt"], row["initial"], row["rounds"])


def _stage_feedback(run: _Run) -> dict[str, Any]:
    cfg = run.cfg
    policy = run.outputs["sft"]
    prompts = [p for s in cfg.feedback.prompt_sets for p in run.prompts[s]["train"]]
    if not prompts:
        raise PipelineError(f"stage feedback: no prompts in sets {list(cfg.feedback.prompt_sets)}")
    settings = run.feedback_settings()
    s = cfg.sampling

    def sample(lo: int, hi: int) -> list[dict[str, Any]]:
        config, params = run.model(policy)
        pairs = sample_pairs(
            config,
            params,
            run.chat,
            prompts[lo:hi],
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            batch_size=s.batch_size,
            seed=cfg.seed,
            indices=range(lo, hi),
            mesh=run.mesh,
        )
        return [{"index": lo + i, "responses": list(p)} for i, p in enumerate(pairs)]

    def label(lo: int, hi: int) -> list[dict[str, Any]]:
        judgements = judge_pairs(
            run.judge(),
            run.constitution,
            prompts[lo:hi],
            [tuple(r["responses"]) for r in sampled[lo:hi]],
            settings=settings,
            seed=cfg.seed,
            indices=range(lo, hi),
        )
        return [{"index": lo + i, **dataclasses.asdict(j)} for i, j in enumerate(judgements)]

    sampled = run.chunks("feedback", "sample", len(prompts), sample)
    labels = run.chunks("feedback", "label", len(prompts), label)
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
    agree = [j.agreement for j in judgements if j.agreement is not None]
    p = np.array([r["p_chosen"] for r in records])
    stats = {
        "prompts": len(prompts),
        "pairs": len(records),
        "skipped": dict(skipped),
        "position_agreement": float(np.mean(agree)) if agree else None,
        "p_chosen_mean": float(p.mean()),
        "p_chosen_hist": np.histogram(p, bins=5, range=(0.5, 1.0))[0].tolist(),
        "labels": str(cfg.feedback.labels),
    }
    stage_dir = run.run_dir / "feedback"
    _write_jsonl(stage_dir / "preferences.jsonl", records)
    dataset = builders.prepare(
        "preference",
        str(stage_dir / "preferences.jsonl"),
        stage_dir / "dataset",
        provenance=run.provenance(
            "feedback", policy=policy, settings=_plain(cfg.feedback), stats=stats
        ),
        overwrite=True,
    )
    return {"outputs": {"dataset": str(dataset.path)}, "stats": stats}


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def train_config(run: _Run, stage: str, data: str, init_from: str) -> DictConfig:
    """The `jaxcai-train` config of a training stage: the objective's defaults, then
    `train` (shared), then the stage's own section, then the pipeline's wiring."""
    objective = TRAINED[stage]
    data_group = "sft" if objective == "sft" else "preferences"
    cfg = compose([f"objective={objective}", f"data={data_group}"], "train")
    cfg = OmegaConf.merge(cfg, {"mesh": run.cfg.mesh, "model": run.cfg.model})
    for key in ("train", stage):
        try:
            cfg = OmegaConf.merge(cfg, run.cfg[key] or {})
        except Exception as e:  # an unknown or mistyped key
            raise ConfigError(f"config {key}: {e}") from e
    cfg.data.train = data
    cfg.data.tokenizer = run.cfg.tokenizer
    cfg.data.chat = run.chat.kind  # every policy keeps the initial policy's format
    cfg.data.chat_kwargs = getattr(run.chat, "template_kwargs", {})
    cfg.trainer.init_from = init_from
    cfg.trainer.progress = run.progress
    if objective in ("rm", "dpo"):
        cfg.objective.soft_labels = run.cfg.feedback.labels == "soft"
    return cfg


def _stage_train(run: _Run, stage: str, data: str, init_from: str) -> dict[str, Any]:
    from jaxcai.loop import run as train

    cfg = train_config(run, stage, data, init_from)
    out = run.run_dir / stage
    summary = train(cfg, out)
    provenance = run.provenance(
        stage,
        data=data,
        data_provenance=_dataset_provenance(data),
        init_from=init_from,
        objective=_plain(cfg.objective),
        trainer=_plain(cfg.trainer),
        optimizer=_plain(cfg.optimizer),
    )
    if jax.process_index() == 0:
        _write_json(out / "provenance.json", provenance)
        (out / "MODEL_CARD.md").write_text(_model_card(stage, provenance, summary))
    return {"outputs": {"model": str(out)}, "stats": summary}


def _dataset_provenance(spec: str) -> dict[str, Any] | None:
    try:
        return builders.load(spec).metadata.get("provenance")
    except Exception:  # a raw file handed in through `inputs`
        return None


def _model_card(stage: str, provenance: dict[str, Any], summary: dict[str, Any]) -> str:
    numbers = "\n".join(
        f"| {k} | {v:.4g} |" for k, v in summary.items() if isinstance(v, float | int)
    )
    return (
        f"# jaxcai {stage} model\n\n"
        f"Trained by the jaxcai Constitutional AI pipeline (jaxcai {jaxcai.__version__}), "
        f"stage `{stage}`, objective `{provenance['objective']['name']}`.\n\n"
        f"- initialised from: `{provenance['init_from']}`\n"
        f"- data: `{provenance['data']}`\n"
        f"- constitution: `{provenance['constitution']['name']}` "
        f"(sha256 {provenance['constitution']['sha256'][:16]}...)\n"
        f"- seed: {provenance['seed']}\n\n"
        f"Load with `jaxcai.load.load_model(<this directory>)`. The full record is in "
        f"`provenance.json`; the training curves in `metrics.jsonl`.\n\n"
        f"| final metric | value |\n|---|---|\n{numbers}\n"
    )


def _stage_eval(run: _Run) -> dict[str, Any]:
    cfg = run.cfg
    policies = {"initial": run.outputs["initial"]}
    for name in ("sft", "dpo"):
        if name in run.outputs:
            policies[name] = run.outputs[name]
    final = list(policies)[-1]
    settings = dataclasses.replace(run.sampling(), temperature=float(cfg.eval.temperature))
    limit = cfg.eval.max_prompts
    sets = {k: v["eval"][:limit] if limit else v["eval"] for k, v in run.prompts.items()}
    responses: dict[str, dict[str, list[str]]] = {}
    for name, path in policies.items():
        config, params = run.model(path)
        responses[name] = {}
        for set_name, prompts in sets.items():
            out = critique_and_revise(
                config,
                params,
                run.chat,
                run.constitution,
                prompts,
                rounds=0,
                seed=cfg.seed + 2,
                few_shot=False,
                settings=settings,
                mesh=run.mesh,
            )
            responses[name][set_name] = [r.initial for r in out]
    results: dict[str, Any] = {
        "policies": policies,
        "prompts": {k: len(v) for k, v in sets.items()},
    }
    if "rm" in run.outputs:
        config, params = run.model(run.outputs["rm"])
        max_len = train_config(run, "rm", "unused", "unused").data.max_len
        scores = {
            name: {
                s: E.reward_scores(
                    config, params, run.chat, sets[s], responses[name][s], max_len=max_len
                ).tolist()
                for s in sets
            }
            for name in policies
        }
        results["reward"] = {
            name: {s: E.summary(v) for s, v in per_set.items()} for name, per_set in scores.items()
        }
        _write_json(run.run_dir / "eval" / "reward_scores.json", scores)
    judge = run.judge()
    fb = run.feedback_settings()
    results["harm"] = {
        name: {s: E.harm_share(judge, run.constitution, sets[s], responses[name][s]) for s in sets}
        for name in policies
    }
    if final != "initial":
        results["preference_vs_initial"] = {
            name: {
                s: E.preference_rate(
                    judge,
                    run.constitution,
                    sets[s],
                    responses[name][s],
                    responses["initial"][s],
                    settings=fb,
                    seed=cfg.seed,
                )
                for s in sets
            }
            for name in policies
            if name != "initial"
        }
    if cfg.eval.choice_files:
        from jaxcai.evals.choice import choice_files, evaluate_choices, read_choice_file

        results["choice"] = {}
        for path in choice_files(list(cfg.eval.choice_files)):
            report = evaluate_choices(
                judge.config, judge.params, judge.fmt, read_choice_file(path), mesh=run.mesh
            )
            results["choice"][path.name] = report.summary()
    rows = [
        {"policy": name, "set": s, "prompt": p, "response": r}
        for name, per_set in responses.items()
        for s, texts in per_set.items()
        for p, r in zip(sets[s], texts, strict=True)
    ]
    _write_jsonl(run.run_dir / "eval" / "responses.jsonl", rows)
    _write_json(run.run_dir / "eval" / "results.json", results)
    return {"outputs": {"results": str(run.run_dir / "eval" / "results.json")}, "stats": results}


# ----- the runner ---------------------------------------------------------------------


def _split_prompts(cfg: DictConfig) -> tuple[dict[str, dict[str, list[str]]], dict[str, Any]]:
    """Each prompt set's train and held-out eval prompts (a seeded split unless the
    dataset has an `eval` split), and where they came from."""
    out, sources = {}, {}
    for name in ("red_team", "helpful"):
        spec = cfg.prompts[name]
        if not spec:
            out[name], sources[name] = {"train": [], "eval": []}, None
            continue
        ds = open_dataset(str(spec), "prompts", key=f"prompts.{name}")
        train = [r["prompt"] for r in ds.records("train")]
        if "eval" in ds.splits:
            held = [r["prompt"] for r in ds.records("eval")]
        else:
            order = np.random.default_rng([cfg.seed, 7]).permutation(len(train))
            k = int(round(cfg.prompts.eval_fraction * len(train)))
            held = [train[i] for i in sorted(order[:k])]
            train = [train[i] for i in sorted(order[k:])]
        if cfg.prompts.limit:
            train = train[: cfg.prompts.limit]
        out[name] = {"train": train, "eval": held}
        sources[name] = {
            "spec": str(spec),
            "inputs": ds.metadata.get("inputs"),
            "train": len(train),
            "eval": len(held),
        }
    return out, sources


def validate_cai(cfg: DictConfig) -> None:
    """Check the pipeline's own keys; raise `ConfigError` naming the key."""

    def check(ok: bool, key: str, value: Any, why: str) -> None:
        if not ok:
            raise ConfigError(f"config {key}={value!r}: {why}")

    bad = [s for s in cfg.stages if s not in STAGES]
    check(not bad, "stages", list(cfg.stages), f"unknown {bad}; stages are {STAGES}")
    unknown = [k for k in (cfg.inputs or {}) if k not in STAGES]
    check(not unknown, "inputs", unknown, f"inputs name stages: {STAGES[:-1]}")
    check(cfg.cai.revision_rounds >= 0, "cai.revision_rounds", cfg.cai.revision_rounds, ">= 0")
    rounds = cfg.cai.sft_rounds
    check(
        rounds in ("all", "final") or (isinstance(rounds, int) and rounds >= 1),
        "cai.sft_rounds",
        rounds,
        "all, final or a round count >= 1",
    )
    check(cfg.cai.helpful_ratio >= 0, "cai.helpful_ratio", cfg.cai.helpful_ratio, "must be >= 0")
    check(
        cfg.feedback.labels in ("soft", "hard"),
        "feedback.labels",
        cfg.feedback.labels,
        "soft or hard",
    )
    check(cfg.feedback.principles >= 1, "feedback.principles", cfg.feedback.principles, ">= 1")
    sets = [s for s in cfg.feedback.prompt_sets if s not in ("red_team", "helpful")]
    check(not sets, "feedback.prompt_sets", sets, "choose from red_team, helpful")
    check(cfg.chunk_size >= 1, "chunk_size", cfg.chunk_size, "must be >= 1")
    for key in ("chat", "feedback_chat"):
        value = cfg.get(key, "auto")
        check(value in CHAT_KINDS, key, value, f"choose one of {CHAT_KINDS}")
    check(
        0 <= cfg.prompts.eval_fraction < 1,
        "prompts.eval_fraction",
        cfg.prompts.eval_fraction,
        "must be in [0, 1)",
    )
    check(
        cfg.sampling.max_new_tokens >= 1,
        "sampling.max_new_tokens",
        cfg.sampling.max_new_tokens,
        ">= 1",
    )
    check(cfg.sampling.batch_size >= 1, "sampling.batch_size", cfg.sampling.batch_size, ">= 1")


def _chat_formats(cfg: DictConfig) -> tuple[ChatFormat, ChatFormat]:
    """The policy's and the feedback model's tokenizer and chat format: `tokenizer` /
    `feedback_tokenizer` when set, else each model's own files, else the bundled
    tokenizer; `chat` / `feedback_chat` pick the format. Text passes between the two as
    text, so they may differ. Each tokenizer must fit its model's embeddings."""
    pairs = [
        ("policy", "tokenizer", "chat"),
        ("feedback_model", "feedback_tokenizer", "feedback_chat"),
    ]
    formats = []
    for model_key, tok_key, chat_key in pairs:
        if model_key == "feedback_model" and not cfg.feedback_model:
            if cfg.get(tok_key) or cfg.get(chat_key, "auto") != "auto":
                raise ConfigError(f"config {tok_key}/{chat_key}: set feedback_model too")
            formats.append(formats[0])
            continue
        vocab = model_config(cfg.model).vocab_size  # a random initial policy's
        if cfg[model_key]:  # fail now, not after hours of sampling
            try:
                vocab = model_config_of(cfg[model_key]).vocab_size
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"config {model_key}={cfg[model_key]!r}: {e}") from e
        try:
            kwargs = cfg.get(f"{chat_key}_kwargs")
            fmt = chat_format(
                cfg[model_key],
                tokenizer=cfg.get(tok_key),
                kind=cfg.get(chat_key, "auto"),
                template_kwargs=OmegaConf.to_container(kwargs) if kwargs else None,
            )
        except (ChatError, OSError, ValueError) as e:
            raise ConfigError(f"config {model_key}/{tok_key}/{chat_key}: {e}") from e
        if fmt.tokenizer.vocab_size > vocab:
            raise ConfigError(
                f"config {tok_key}: {fmt.tokenizer.source} has {fmt.tokenizer.vocab_size} "
                f"tokens, more than the {model_key}'s {vocab} embeddings"
            )
        formats.append(fmt)
    log.info("chat formats: policy %s, feedback %s", formats[0].describe(), formats[1].describe())
    return formats[0], formats[1]


def _stage_input(run: _Run, stage: str) -> str | None:
    given = (run.cfg.inputs or {}).get(stage)
    if given and stage == "initial":
        raise ConfigError("config inputs.initial: set `policy` for the starting model")
    return str(given) if given else None


def run_cai(cfg: DictConfig, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Run the pipeline's stages in order in `run_dir`, skipping finished ones; returns
    each stage's record and writes `report.md`."""
    from jaxcai.cai.report import write_report

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    validate_cai(cfg)
    policy_chat, feedback_chat = _chat_formats(cfg)  # checks the model paths too
    if jax.process_index() == 0:
        (run_dir / "cai.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    prompts, sources = _split_prompts(cfg)
    mesh = sharding.make_mesh(sharding.MeshConfig(**cfg.mesh))
    constitution = load_constitution(cfg.cai.constitution)
    run = _Run(cfg, run_dir, policy_chat, feedback_chat, constitution, prompts, sources, mesh)
    wanted = set(cfg.stages)
    sampling = wanted & {"critique", "feedback", "eval"}
    if jax.process_count() > 1 and sampling:
        raise PipelineError(
            f"stages {sorted(sampling)} sample in one process; run them on one host and hand "
            "their outputs to a multi-host run of the training stages with inputs.<stage>=PATH"
        )
    records: dict[str, Any] = {}
    for stage in ("initial", *STAGES):
        record = stage_record(run_dir, stage)
        given = _stage_input(run, stage)
        if given:
            record = {"stage": stage, "outputs": {"given": given}, "stats": {}, "given": True}
        elif record is not None:
            log.info("stage %s: done (%s), skipped", stage, run_dir / stage / DONE)
        elif stage == "initial" or stage in wanted:
            if stage != "initial" and not _ready(run, stage):
                continue
            log.info("stage %s: running", stage)
            start = time.perf_counter()
            record = {"stage": stage, **_STAGES[stage](run)}
            record["seconds"] = round(time.perf_counter() - start, 1)
            if jax.process_index() == 0:
                _write_json(run_dir / stage / DONE, record)
        if record is not None:
            records[stage] = record
            output = record["outputs"]
            run.outputs[stage] = (
                output.get("given")
                or output.get("model")
                or output.get("dataset")
                or output.get("results")
            )
    if jax.process_index() == 0:
        write_report(run_dir, records)
    return records


def _ready(run: _Run, stage: str) -> bool:
    """Whether a stage's inputs exist; a stage asked for without them is an error."""
    needs = {
        "critique": ["initial"],
        "sft": ["critique"],
        "feedback": ["sft"],
        "rm": ["feedback", "sft"],
        "dpo": ["feedback", "sft"],
        "eval": ["initial"],
    }[stage]
    missing = [n for n in needs if n not in run.outputs]
    if missing:
        raise PipelineError(
            f"stage {stage} needs the output of {missing}: add them to `stages` or hand "
            f"them in with inputs.<stage>=PATH"
        )
    return True


_STAGES: dict[str, Callable[[_Run], dict[str, Any]]] = {
    "initial": _stage_initial,
    "critique": _stage_critique,
    "sft": lambda run: _stage_train(run, "sft", run.outputs["critique"], run.outputs["initial"]),
    "feedback": _stage_feedback,
    "rm": lambda run: _stage_train(run, "rm", run.outputs["feedback"], run.outputs["sft"]),
    "dpo": lambda run: _stage_train(run, "dpo", run.outputs["feedback"], run.outputs["sft"]),
    "eval": _stage_eval,
}
