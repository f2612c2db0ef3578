"""A Hugging Face checkpoint directory as downloaded is all `jaxcai-cai` needs: a tiny
random Qwen3 saved by `transformers`, with a ChatML-style tokenizer and template beside
it, runs every stage with its own tokenizer, template and stop tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hf_fixtures import qwen2_dir, tiny_model_dir
from test_cai_pipeline import FAST

from jaxcai import chat
from jaxcai.cai.pipeline import run_cai
from jaxcai.config import compose
from jaxcai.data import builders
from jaxcai.data.pipeline import Layout, encode_example
from jaxcai.load import chat_format

pytestmark = pytest.mark.slow  # every stage of the pipeline: minutes on 2 CPU cores


@pytest.fixture(scope="module")
def qwen3_run(tmp_path_factory):
    policy = tmp_path_factory.mktemp("Qwen3-tiny")
    qwen2_dir(policy)  # tokenizer.json, tokenizer_config.json (ChatML), generation_config
    fmt = chat.load(policy)
    size = fmt.tokenizer.vocab_size + 2
    tiny_model_dir(policy, "Qwen3", size, head_dim=24, max_position_embeddings=512)
    run_dir = tmp_path_factory.mktemp("cai-qwen3")
    records = run_cai(compose([*FAST, f"policy={policy}"], "cai"), run_dir)
    return policy, run_dir, records


def test_every_stage_runs_with_the_checkpoints_own_format(qwen3_run):
    policy, run_dir, records = qwen3_run
    assert list(records) == ["initial", "critique", "sft", "feedback", "rm", "dpo", "eval"]
    provenance = json.loads((run_dir / "critique" / "dataset" / "metadata.json").read_text())
    assert "template" in json.dumps(provenance)
    # Each trained policy keeps the tokenizer and format it was trained with.
    for stage in ("sft", "rm", "dpo"):
        fmt = chat_format(run_dir / stage)
        assert fmt.kind == "template"
        assert fmt.tokenizer.vocab_size == chat.load(policy).tokenizer.vocab_size
    trajectories = (run_dir / "critique" / "trajectories.jsonl").read_text().splitlines()
    assert all("<|im_start|>" not in json.loads(t)["initial"] for t in trajectories)


def test_sft_example_carries_the_template_markers_and_an_assistant_only_mask(qwen3_run):
    policy, run_dir, _ = qwen3_run
    fmt = chat_format(run_dir / "sft")
    tok = fmt.tokenizer
    dataset = builders.load(run_dir / "critique" / "dataset")
    raw = next(iter(dataset.source("train")))
    layout = Layout(kind="sft", max_len=512, pack=False)
    example = encode_example(raw, fmt, layout)
    ids = [*example["tokens"], example["targets"][-1]]
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\n" in text and "<|im_start|>assistant\n" in text
    learned = [int(t) for t, m in zip(example["targets"], example["mask"], strict=True) if m]
    response = raw["response"].decode() if isinstance(raw["response"], bytes) else raw["response"]
    assert tok.decode(learned) == response.strip() + "<|im_end|>"
    # The masked targets are one run at the end: the response and its end-of-turn token.
    mask = np.asarray(example["mask"])
    first = int(np.argmax(mask))
    assert mask[first:].all() and not mask[:first].any()
