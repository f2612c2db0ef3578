"""The `jaxcai-cai` runner: every stage end to end on the tiny model, skipping finished
stages, handed-in inputs, provenance records, config errors, and a run killed during the
feedback stage resuming to the same datasets as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxcai.cai.pipeline import PipelineError, run_cai, stage_record
from jaxcai.config import ConfigError, compose
from jaxcai.data import builders

# cai_smoke, made smaller still: 8 red-team prompts in chunks of 4, 4-step trainings.
FAST = [
    "experiment=cai_smoke",
    "prompts.limit=8",
    "chunk_size=4",
    "sampling.max_new_tokens=8",
    "sampling.batch_size=8",
    "cai.revision_rounds=1",
    "sft.trainer.steps=4",
    "rm.trainer.steps=4",
    "dpo.trainer.steps=4",
    "eval.max_prompts=4",
    "progress=false",
]


def _cfg(*extra: str):
    return compose([*FAST, *extra], "cai")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cai")
    records = run_cai(_cfg(), run_dir)
    return run_dir, records


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_stage_writes_its_output(smoke_run):
    run_dir, records = smoke_run
    assert list(records) == ["initial", "critique", "sft", "feedback", "rm", "dpo", "eval"]
    for stage in records:
        assert stage_record(run_dir, stage) is not None

    # SL-CAI data: one revision pair per (prompt, round) plus helpfulness samples at the
    # configured ratio (0.5), every intermediate text kept.
    trajectories = _lines(run_dir / "critique" / "trajectories.jsonl")
    assert len(trajectories) == 8
    assert all(len(t["rounds"]) == 1 for t in trajectories)
    assert set(trajectories[0]["rounds"][0]) == {
        "principle",
        "critique_request",
        "critique",
        "revision_request",
        "revision",
    }
    stats = records["critique"]["stats"]
    assert stats["revision_pairs"] + stats["empty_revisions_dropped"] == 8
    assert stats["helpful_samples"] == round(0.5 * stats["revision_pairs"])
    sft = builders.load(run_dir / "critique" / "dataset")
    assert sft.kind == "sft" and sft.num_examples() == stats["examples"]

    # RL-CAI data: a preference dataset with soft labels and the feedback's record.
    prefs = builders.load(run_dir / "feedback" / "dataset")
    assert prefs.kind == "preference"
    rows = list(prefs.records())
    assert len(rows) == records["feedback"]["stats"]["pairs"] > 0
    for row in rows:
        assert 0.5 <= row["p_chosen"] <= 1.0
        meta = row["metadata"]
        assert len(meta["principles"]) == 2  # cai_smoke ensembles two principles
        assert len(meta["p_ab"]) == len(meta["p_ba"]) == 2
        assert isinstance(meta["agreement"], bool)

    # Trained stages are ordinary training runs that load_model reads.
    for stage in ("sft", "rm", "dpo"):
        assert (run_dir / stage / "checkpoints" / "4").is_dir()
        assert (run_dir / stage / "MODEL_CARD.md").is_file()

    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results["policies"]) == {"initial", "sft", "dpo"}
    for policy in ("initial", "sft", "dpo"):
        for s in ("red_team", "helpful"):
            assert 0 <= results["harm"][policy][s]["harmful"] <= 1
            assert results["reward"][policy][s]["n"] == results["prompts"][s]
    assert 0 <= results["preference_vs_initial"]["dpo"]["red_team"]["p_first"] <= 1
    choice = results["choice"]["choice_smoke.jsonl"]  # cai_smoke scores the bundled file
    assert choice["n"] == 20 and 0 <= choice["accuracy"] <= 1 and 0 <= choice["ece"] <= 1

    report = (run_dir / "report.md").read_text()
    for stage in records:
        assert f"## {stage}" in report
    for png in ("sft_loss.png", "rm_loss.png", "dpo_loss.png", "eval_rewards.png"):
        assert (run_dir / "plots" / png).read_bytes()[:4] == b"\x89PNG"
        assert f"plots/{png}" in report


GOLDEN = Path(__file__).parent / "data" / "golden_cai"
PINNED = (
    "critique/trajectories.jsonl",
    "critique/sft.jsonl",
    "feedback/preferences.jsonl",
    "eval/responses.jsonl",
)


def _same(a, b, where: str) -> None:
    """Equal JSON values: strings, ints and structure exactly, floats to 1e-6 (the one
    allowance for a CPU whose float rounding differs from the one that wrote the files)."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, int | float) and isinstance(b, int | float), where
        assert abs(a - b) <= 1e-6, f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} != {b}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_outputs_match_the_pinned_run(smoke_run):
    """The critique, feedback and eval JSONL of this fixed small run, as the pipeline
    wrote them before it was restructured: every text, choice and label the same."""
    run_dir, _ = smoke_run
    for rel in PINNED:
        got = (run_dir / rel).read_text(encoding="utf-8").splitlines()
        want = (GOLDEN / rel.replace("/", "__")).read_text(encoding="utf-8").splitlines()
        assert len(got) == len(want), rel
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if g != w:
                _same(json.loads(g), json.loads(w), f"{rel}:{i + 1}")


def test_provenance_is_recorded(smoke_run):
    run_dir, _ = smoke_run
    from jaxcai.cai.constitution import load_constitution

    constitution = load_constitution("minimal")
    for dataset in ("critique", "feedback"):
        meta = builders.load(run_dir / dataset / "dataset").metadata
        prov = meta["provenance"]
        assert prov["constitution"]["sha256"] == constitution.sha256
        assert prov["seed"] == 0 and prov["jaxcai_version"]
        assert prov["initial_policy"] == str(run_dir / "initial" / "hf")
        assert prov["feedback_model"] == prov["initial_policy"]
        assert prov["sampling"]["max_new_tokens"] == 8
        red = prov["prompts"]["red_team"]
        assert red["spec"] == "bundled:red_team_prompts.jsonl"
        assert all(len(i["sha256"]) == 64 for i in red["inputs"]["train"])
    critique = builders.load(run_dir / "critique" / "dataset").metadata["provenance"]
    assert critique["policy"] == str(run_dir / "initial" / "hf")
    assert critique["settings"]["revision_rounds"] == 1
    feedback = builders.load(run_dir / "feedback" / "dataset").metadata["provenance"]
    assert feedback["policy"] == str(run_dir / "sft")  # pairs come from the SL-CAI policy
    dpo = json.loads((run_dir / "dpo" / "provenance.json").read_text())
    assert dpo["init_from"] == str(run_dir / "sft")
    assert dpo["data"] == str(run_dir / "feedback" / "dataset")
    assert dpo["objective"]["soft_labels"] is True
    assert dpo["data_provenance"]["stage"] == "feedback"


def test_finished_stages_are_skipped(smoke_run, monkeypatch):
    run_dir, records = smoke_run
    from jaxcai.cai import stages

    def boom(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for stage in stages.registered():
        monkeypatch.setattr(stage, "run", boom)
    again = run_cai(_cfg(), run_dir)
    assert {k: v["outputs"] for k, v in again.items()} == {
        k: v["outputs"] for k, v in records.items()
    }


def test_stages_take_handed_in_inputs(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    records = run_cai(
        _cfg(
            f"inputs.critique={run_dir / 'critique' / 'dataset'}",
            f"inputs.feedback={run_dir / 'feedback' / 'dataset'}",
            "stages=[sft,dpo]",
            "feedback.labels=hard",
        ),
        tmp_path,
    )
    assert records["critique"]["given"] and records["feedback"]["given"]
    assert not (tmp_path / "critique").exists()
    dpo = json.loads((tmp_path / "dpo" / "provenance.json").read_text())
    assert dpo["init_from"] == str(tmp_path / "sft")
    assert dpo["objective"]["soft_labels"] is False  # feedback.labels=hard
    assert "eval" not in records


def test_missing_inputs_and_bad_config_values(tmp_path):
    with pytest.raises(PipelineError, match=r"stage dpo needs the output of \['feedback', 'sft'\]"):
        run_cai(_cfg("stages=[dpo]"), tmp_path / "a")
    for override, key in (
        ("stages=[critique,polish]", "stages"),
        ("feedback.labels=fuzzy", "feedback.labels"),
        ("cai.sft_rounds=latest", "cai.sft_rounds"),
        ("feedback.prompt_sets=[red_team,jokes]", "feedback.prompt_sets"),
        ("chunk_size=0", "chunk_size"),
        (f"policy={tmp_path / 'nowhere'}", "policy"),
        (f"feedback_model={tmp_path}", "feedback_model"),
    ):
        with pytest.raises(ConfigError, match=key):
            run_cai(_cfg(override), tmp_path / "b")
    with pytest.raises(ConfigError, match="config sft"):
        run_cai(
            _cfg(
                "stages=[sft]",
                f"inputs.critique={tmp_path}",
                "+sft.trainer.stepz=3",
            ),
            tmp_path / "c",
        )


def _cli(run_dir: Path) -> subprocess.Popen:
    overrides = [o for o in FAST if o != "progress=false"]
    return subprocess.Popen(
        [sys.executable, "-m", "jaxcai.main.cai", *overrides, f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.slow
def test_killed_during_feedback_resumes_to_the_same_datasets(smoke_run, tmp_path):
    """`jaxcai-cai` killed once the feedback stage has finished a chunk, then run again:
    it completes without redoing finished stages and writes the datasets of the
    uninterrupted (in-process) run."""
    reference, _ = smoke_run
    run_dir = tmp_path / "run"
    proc = _cli(run_dir)
    first_part = run_dir / "feedback" / "parts" / "sample-c4-0000000.jsonl"
    deadline = time.time() + 300
    while not first_part.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the feedback stage never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "feedback" / "stage.json").exists()
    critique_done = (run_dir / "critique" / "stage.json").stat().st_mtime_ns
    sft_done = (run_dir / "sft" / "stage.json").stat().st_mtime_ns

    proc = _cli(run_dir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "stage critique: done" in out and "stage sft: done" in out
    assert (run_dir / "critique" / "stage.json").stat().st_mtime_ns == critique_done
    assert (run_dir / "sft" / "stage.json").stat().st_mtime_ns == sft_done
    for name in ("critique/sft.jsonl", "critique/trajectories.jsonl", "feedback/preferences.jsonl"):
        assert _lines(run_dir / name) == _lines(reference / name), name
    assert stage_record(run_dir, "eval") is not None


def test_multirun_ablation_and_its_table(tmp_path):
    """One `-m` line sweeps the pipeline's settings; the table script lines the runs up."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxcai.main.cai",
            "-m",
            *[o for o in FAST if o != "cai.revision_rounds=1"],
            "stages=[critique,eval]",
            "eval.choice_files=[]",
            "cai.revision_rounds=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rounds = {}
    for run in sweep.iterdir():
        if (run / "critique" / "stage.json").is_file():
            trajectories = _lines(run / "critique" / "trajectories.jsonl")
            rounds[run.name] = {len(t["rounds"]) for t in trajectories}
    assert sorted(rounds.values(), key=min) == [{1}, {2}], rounds
    table = subprocess.run(
        [sys.executable, "scripts/tabulate_cai.py", str(sweep), "harm/initial/red_team"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout.splitlines()
    assert table[0] == "| run | harm/initial/red_team |"
    assert {row.split(" | ")[0] for row in table[2:]} == {
        "| cai.revision_rounds=1",
        "| cai.revision_rounds=2",
    }


@pytest.mark.slow
def test_readme_main_job(tmp_path):
    """The README's first command, as written: `jaxcai-cai experiment=cai_smoke`."""
    proc = subprocess.run(
        ["jaxcai-cai", "experiment=cai_smoke", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "report at" in proc.stdout
    for stage in ("initial", "critique", "sft", "feedback", "rm", "dpo", "eval"):
        assert stage_record(tmp_path, stage) is not None
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["choice"]["choice_smoke.jsonl"]["n"] == 20
