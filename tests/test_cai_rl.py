"""The `rl` stage of `jaxcai-cai`: online RL of the SL-CAI policy against the pipeline's
reward model (or the feedback model as judge), compared by the eval stage, plotted in the
report; and the error when it has no reward source. (Learning on the CAI testbed:
tests/test_rl_testbed.py.)"""

from __future__ import annotations

import pytest

from jaxcai.cai.run import run_cai
from jaxcai.cai.stages.base import PipelineError
from jaxcai.config import compose
from jaxcai.metrics import read_metrics

FAST = [
    "experiment=cai_smoke",
    "prompts.limit=8",
    "chunk_size=4",
    "sampling.max_new_tokens=8",
    "sampling.batch_size=8",
    "cai.revision_rounds=1",
    "sft.trainer.steps=4",
    "rm.trainer.steps=4",
    "eval.max_prompts=4",
    "progress=false",
    "rl.trainer.steps=4",
    "rl.rollout.prompts=4",
    "rl.rollout.samples=2",
    "rl.rollout.max_new_tokens=8",
    "++rl.trainer.batch_size=4",
]


def test_rl_without_a_reward_model_names_what_is_missing(tmp_path):
    cfg = compose([*FAST, "stages=[rl]", f"inputs.sft={tmp_path}"], "cai")
    with pytest.raises(PipelineError, match=r"rl.algorithm=grpo.*inputs.rm=PATH.*rl.reward=judge"):
        run_cai(cfg, tmp_path / "run")
    cfg = compose([*FAST, "stages=[rl]", f"inputs.sft={tmp_path}", "rl.algorithm=sac"], "cai")
    with pytest.raises(PipelineError, match="rl.algorithm='sac': choose one of"):
        run_cai(cfg, tmp_path / "run2")


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "online_dpo"])
def test_rl_stage_trains_the_sl_cai_policy_and_eval_compares_it(algorithm, tmp_path):
    stages = "[critique,sft,feedback,rm,rl,eval]" if algorithm != "online_dpo" else (
        "[critique,sft,rl,eval]")  # fmt: skip
    cfg = compose([*FAST, f"stages={stages}", f"rl.algorithm={algorithm}"], "cai")
    records = run_cai(cfg, tmp_path)
    assert "rl" in records and records["eval"]["stats"]["policies"]["rl"] == str(tmp_path / "rl")
    assert "rl" in records["eval"]["stats"]["preference_vs_initial"]
    run_cfg = (tmp_path / "rl" / "config.yaml").read_text()
    assert f"name: {algorithm}" in run_cfg and str(tmp_path / "sft") in run_cfg  # from SL-CAI
    if algorithm == "online_dpo":  # the feedback model (here the initial policy) judges
        assert f"judge: {tmp_path / 'initial' / 'hf'}" in run_cfg
    else:
        assert f"reward_model: {tmp_path / 'rm'}" in run_cfg
    rollouts = [m for m in read_metrics(tmp_path / "rl") if "objective/kl" in m]
    assert len(rollouts) >= 2
    report = (tmp_path / "report.md").read_text()
    assert "plots/rl_reward_kl.png" in report and (tmp_path / "plots/rl_reward_kl.png").is_file()
