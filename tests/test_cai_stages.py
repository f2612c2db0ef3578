"""The CAI stage graph: the runner's order from the stages' declared needs, missing
inputs named by stage, the three training stages as one class, and a stage added from
its own module through `plugins` with no other file changing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxcai.cai import stages
from jaxcai.cai.run import run_cai, stage_inputs
from jaxcai.cai.stages import base
from jaxcai.config import ConfigError, compose

PLUGINS = Path(__file__).parent / "plugins"
# The tiny pipeline of test_cai_pipeline, cut to the initial policy and one stage.
FAST = [
    "experiment=cai_smoke",
    "prompts.limit=4",
    "sampling.max_new_tokens=8",
    "progress=false",
    "eval.choice_files=[]",
]


@pytest.fixture
def registry(monkeypatch):
    """A scratch copy of the stage registry; the toy plugin is imported afresh."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.delitem(sys.modules, "toy_stage", raising=False)
    yield base._REGISTRY
    sys.modules.pop("toy_stage", None)


def _stage(name: str, *needs: str, uses: tuple[str, ...] = ()) -> base.Stage:
    return base.Stage(name, needs=tuple(needs), uses=uses)


def test_the_builtin_graph_runs_in_pipeline_order():
    assert [s.name for s in stages.order()] == [
        "initial",
        "critique",
        "sft",
        "feedback",
        "rm",
        "dpo",
        "rl",
        "eval",
    ]
    assert stages.STAGES == ("critique", "sft", "feedback", "rm", "dpo", "rl", "eval")
    trained = {s.name: s for s in stages.registered() if isinstance(s, stages.TrainStage)}
    assert {n: (s.objective, s.needs) for n, s in trained.items()} == {
        "sft": ("sft", ("critique", "initial")),
        "rm": ("rm", ("feedback", "sft")),
        "dpo": ("dpo", ("feedback", "sft")),
    }
    assert {s.name: s.produces for s in stages.registered()} == {
        "initial": "model",
        "critique": "dataset",
        "sft": "model",
        "feedback": "dataset",
        "rm": "model",
        "dpo": "model",
        "rl": "model",
        "eval": "results",
    }


def test_order_comes_from_needs_and_uses(registry):
    a, b, c = _stage("a"), _stage("b", "a"), _stage("c", "b")
    late = _stage("late", "a", uses=("c",))  # optional input: still ordered after it
    for s in (a, b, c):
        stages.register(s)
    assert [s.name for s in stages.order([late, c, b, a])] == ["a", "b", "c", "late"]
    assert [s.name for s in stages.order([c, a, b])] == ["a", "b", "c"]
    assert [s.name for s in stages.order([late, a])] == ["a", "late"]  # c not in this run
    x, y = stages.register(_stage("x", "y")), stages.register(_stage("y", "x"))
    with pytest.raises(base.PipelineError, match=r"stages \['x', 'y'\] need each other"):
        stages.order([x, y])
    with pytest.raises(base.PipelineError, match=r"stage z needs unknown stages \['nowhere'\]"):
        stages.order([_stage("z", "nowhere")])
    with pytest.raises(base.PipelineError, match="produces 'weights'"):
        stages.register(base.Stage("w", produces="weights"))


def test_missing_inputs_are_named_by_stage():
    expected = {
        "critique": ["initial"],
        "sft": ["critique"],
        "feedback": ["sft"],
        "rm": ["feedback", "sft"],
        "dpo": ["feedback", "sft"],
    }
    for name, missing in expected.items():
        outputs = {} if name == "critique" else {"initial": "init"}
        with pytest.raises(base.PipelineError) as e:
            stage_inputs(stages.get(name), outputs)
        assert str(e.value) == (
            f"stage {name} needs the output of {missing}: add them to `stages` or hand "
            "them in with inputs.<stage>=PATH"
        )
    # eval needs the initial policy only and reads the trained ones that are there.
    got = stage_inputs(stages.get("eval"), {"initial": "i", "dpo": "d", "critique": "c"})
    assert got == {"initial": "i", "dpo": "d"}


def _sft_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"\n\nHuman: q{i}?", "response": f"a{i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_plugin_stage_runs_with_no_other_change(registry, tmp_path):
    sft = _sft_file(tmp_path, 5)
    overrides = [*FAST, "plugins=[toy_stage]", "stages=[toy_count]", f"inputs.critique={sft}"]
    records = run_cai(compose(overrides, "cai"), tmp_path / "run")
    assert list(records) == ["initial", "critique", "toy_count"]
    assert records["critique"]["given"]
    assert records["toy_count"]["stats"] == {"examples": 5}
    assert records["toy_count"]["outputs"] == {
        "results": str(tmp_path / "run/toy_count/count.json")
    }
    assert json.loads((tmp_path / "run" / "toy_count" / "stage.json").read_text())["stats"] == {
        "examples": 5
    }
    assert "## toy_count" in (tmp_path / "run" / "report.md").read_text()
    # Without the handed-in data, the plugin's missing input is named like any stage's.
    with pytest.raises(
        base.PipelineError, match=r"stage toy_count needs the output of \['critique'\]"
    ):
        run_cai(
            compose([*FAST, "plugins=[toy_stage]", "stages=[toy_count]"], "cai"), tmp_path / "b"
        )


def test_plugins_and_stage_names_are_checked(registry, tmp_path):
    with pytest.raises(ConfigError, match=r"config plugins: cannot import 'no_such_plugin'"):
        run_cai(compose([*FAST, "plugins=[no_such_plugin]"], "cai"), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"config stages=\['toy_count'\]: unknown"):
        run_cai(compose([*FAST, "stages=[toy_count]"], "cai"), tmp_path / "b")  # no plugin


@pytest.mark.slow  # a jaxcai-cai subprocess
def test_a_plugin_stage_through_the_command_line(tmp_path):
    sft = _sft_file(tmp_path, 3)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxcai.main.cai",
            *FAST,
            "plugins=[toy_stage]",
            "stages=[toy_count]",
            f"inputs.critique={sft}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "toy_count" / "stage.json").read_text())
    assert record["stats"] == {"examples": 3}
