"""`report.md` of a CAI run: each stage's numbers, training curves and eval plots (PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxcai.metrics import read_metrics

__all__ = ["write_report"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        return json.dumps(v, default=str)
    return str(v)


def _table(rows: dict[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows.items() if v is not None]
    return "\n".join(lines)


def _save(fig, run_dir: Path, name: str) -> str:
    """Write `fig` to `plots/name` under `run_dir`; the path relative to `run_dir`."""
    import matplotlib.pyplot as plt

    path = run_dir / "plots" / name
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path.relative_to(run_dir))


def _plot_training(run_dir: Path, stage: str) -> str | None:
    """Train (and eval) loss against step; the PNG's path relative to `run_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(run_dir / stage)
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval/loss"]) for m in metrics if "eval/loss" in m]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{stage}")
    ax.legend()
    fig.tight_layout()
    return _save(fig, run_dir, f"{stage}_loss.png")


def _plot_rl(run_dir: Path, stage: str) -> str | None:
    """Online RL: the reward source's mean score and the KL to the reference per rollout
    against step; the PNG's path relative to `run_dir` (None for other runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in read_metrics(run_dir / stage) if "objective/scores" in m]
    if not metrics:
        return None
    steps = [m["step"] for m in metrics]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 4.4), dpi=100, sharex=True)
    top.plot(steps, [m["objective/scores"] for m in metrics], "o-", label="score")
    top.plot(steps, [m["objective/rlhf_reward"] for m in metrics], "s--", label="score - KL")
    top.set_ylabel("reward")
    top.set_title(f"{stage}: rollouts")
    top.legend()
    bottom.plot(steps, [m["objective/kl"] for m in metrics], "o-", color="tab:red")
    bottom.set_ylabel("KL to reference")
    bottom.set_xlabel("step")
    fig.tight_layout()
    return _save(fig, run_dir, f"{stage}_reward_kl.png")


def _plot_rewards(run_dir: Path) -> str | None:
    """Histograms of reward-model scores per policy (all eval prompt sets together)."""
    scores_file = run_dir / "eval" / "reward_scores.json"
    if not scores_file.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = json.loads(scores_file.read_text())
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for policy, per_set in scores.items():
        values = [v for vs in per_set.values() for v in vs]
        if values:
            ax.hist(values, bins=20, alpha=0.5, label=policy)
    ax.set_xlabel("reward-model score")
    ax.set_ylabel("responses")
    ax.legend()
    fig.tight_layout()
    return _save(fig, run_dir, "eval_rewards.png")


def _eval_section(results: dict[str, Any]) -> list[str]:
    out = []
    for measure, title in (
        ("harm", "Share judged harmful by the feedback model"),
        ("reward", "Reward-model scores (mean)"),
        ("preference_vs_initial", "Feedback-model preference over the initial policy (debiased)"),
    ):
        table = results.get(measure)
        if not table:
            continue
        sets = sorted({s for per_set in table.values() for s in per_set})
        key = {"harm": "harmful", "reward": "mean", "preference_vs_initial": "p_first"}[measure]
        out += [f"### {title}", "", "| policy | " + " | ".join(sets) + " |"]
        out.append("|---" * (len(sets) + 1) + "|")
        for policy, per_set in table.items():
            cells = [_fmt(per_set.get(s, {}).get(key)) for s in sets]
            out.append(f"| {policy} | " + " | ".join(cells) + " |")
        out.append("")
    for path, numbers in (results.get("choice") or {}).items():
        out += [f"### Multiple-choice: `{path}`", "", _table(numbers), ""]
    return out


def write_report(run_dir: str | Path, records: dict[str, dict[str, Any]]) -> Path:
    """Write `run_dir/report.md` from the stages' records; returns its path."""
    run_dir = Path(run_dir)
    lines = ["# jaxcai Constitutional AI run", "", f"Run directory: `{run_dir}`", ""]
    for stage, record in records.items():
        lines += [f"## {stage}", ""]
        if record.get("given"):
            lines += [f"Handed in: `{record['outputs']['given']}`", ""]
            continue
        outputs = ", ".join(f"{k}: `{v}`" for k, v in record["outputs"].items())
        lines += [
            f"Outputs: {outputs}" + (f" ({record['seconds']} s)" if "seconds" in record else ""),
            "",
        ]
        stats = record.get("stats") or {}
        if stage == "eval":
            lines += _eval_section(stats)
            plot = _plot_rewards(run_dir)
        else:
            lines += [_table(stats), ""]
            trained = (run_dir / stage / "metrics.jsonl").is_file()  # a training stage's run
            plot = _plot_training(run_dir, stage) if trained else None
            rl_plot = _plot_rl(run_dir, stage) if trained else None
            if rl_plot:
                lines += [f"![{stage} reward and KL]({rl_plot})", ""]
        if plot:
            lines += [f"![{stage}]({plot})", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_numbers(run_dir: str | Path) -> dict[str, float]:
    """A CAI run's headline numbers, flattened: `harm/<policy>/<set>`,
    `pref/<policy>/<set>` (debiased preference over the initial policy),
    `reward/<policy>/<set>` (mean score), `feedback/agreement`, `choice/<file>/accuracy`."""
    run_dir = Path(run_dir)
    out: dict[str, float] = {}
    results_file = run_dir / "eval" / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for measure, key, short in (
        ("harm", "harmful", "harm"),
        ("preference_vs_initial", "p_first", "pref"),
        ("reward", "mean", "reward"),
    ):
        for policy, per_set in (results.get(measure) or {}).items():
            for s, numbers in per_set.items():
                if numbers.get(key) is not None:
                    out[f"{short}/{policy}/{s}"] = numbers[key]
    for name, numbers in (results.get("choice") or {}).items():
        out[f"choice/{name}/accuracy"] = numbers["accuracy"]
    feedback = run_dir / "feedback" / "stage.json"
    if feedback.is_file():
        stats = json.loads(feedback.read_text()).get("stats", {})
        if stats.get("position_agreement") is not None:
            out["feedback/agreement"] = stats["position_agreement"]
        out["feedback/p_chosen"] = stats.get("p_chosen_mean")
    return {k: v for k, v in out.items() if v is not None}


def ablation_table(sweep_dir: str | Path, keys: list[str] | None = None) -> str:
    """A markdown table of a `jaxcai-cai -m ...` sweep: one row per run (the overrides
    that differ between runs), one column per number of `run_numbers` (or `keys`)."""
    import yaml

    sweep_dir = Path(sweep_dir)
    runs = sorted(
        p.parent for p in sweep_dir.rglob("cai.yaml") if any(p.parent.glob("*/stage.json"))
    )
    if not runs:
        raise FileNotFoundError(f"no jaxcai-cai runs (cai.yaml) below {sweep_dir}")
    overrides = []
    for run in runs:
        path = run / ".hydra" / "overrides.yaml"
        overrides.append(yaml.safe_load(path.read_text()) if path.is_file() else [])
    shared = set.intersection(*(set(o) for o in overrides)) if len(runs) > 1 else set()
    rows = [
        (" ".join(o for o in own if o not in shared) or run.name, run_numbers(run))
        for run, own in zip(runs, overrides, strict=True)
    ]
    keys = keys or sorted({k for _, numbers in rows for k in numbers})
    lines = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, numbers in rows:
        cells = [_fmt(numbers[k]) if k in numbers else "" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
