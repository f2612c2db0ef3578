"""Evaluation by generation: answer SFT prompts and compare with the reference responses.

Each record is an SFT record (`prompt`: a transcript ending on a Human turn, `response`:
the reference answer), as `PreparedDataset.records(split)` or
`read_records(path, "sft")` give them. The prompt's conversation is opened for the
assistant's answer in the chat format (`fmt.prompt_ids`; with a bare `Tokenizer`, the
Human/Assistant transcript `bos + prompt.rstrip() + "\\n\\nAssistant:"`); a prompt too
long for the model keeps its first id and its end. The model continues it until a stop
id of the format (eos, a template's end-of-turn token), one of its stop strings (the
start of a new Human turn) or `max_new_tokens`; greedy by default. Predictions and
references are stripped and scored with `jaxcai.evals.text`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax

from jaxcai.chat import ChatFormat, messages_from_transcript
from jaxcai.evals.text import text_metrics
from jaxcai.model_config import ModelConfig
from jaxcai.sample import STOP, generate_chat
from jaxcai.tokenizer import Tokenizer, answer_context

__all__ = ["STOP", "evaluate_generation", "metrics_markdown", "sampling_prompt"]

# `STOP` (re-exported for callers) is the Human/Assistant transcript's end of turn,
# defined once in `jaxcai.sample.chat`; generation stops at the format's own stops.


sampling_prompt = answer_context  # the transcript with an open Assistant turn


def evaluate_generation(
    config: ModelConfig,
    params: Any,
    tok: Tokenizer | ChatFormat,
    records: Iterable[Mapping[str, Any]],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Generate an answer per record and score it against the record's `response`.

    Returns `{"n", "truncated", "metrics": text_metrics(...), "examples": [{"source",
    "prompt", "reference", "prediction", "stop_reason"}, ...]}`. `tok` is the chat format
    (a `Tokenizer` means its Human/Assistant transcript)."""
    records = list(records)
    if not records:
        raise ValueError("no records to evaluate")
    out = generate_chat(
        config,
        params,
        tok,
        [messages_from_transcript(r["prompt"]) for r in records],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        mesh=mesh,
        progress=progress,
    )
    predictions, truncated = out.texts, out.truncated
    references = [str(r["response"]).strip() for r in records]
    return {
        "n": len(records),
        "truncated": truncated,
        "metrics": text_metrics(predictions, references),
        "examples": [
            {
                "source": r.get("source", ""),
                "prompt": r["prompt"],
                "reference": ref,
                "prediction": pred,
                "stop_reason": why,
            }
            for r, ref, pred, why in zip(
                records, references, predictions, out.stop_reasons, strict=True
            )
        ],
    }


def metrics_markdown(metrics: Mapping[str, float], n: int) -> str:
    """A two-column table of the metrics (BLEU on its 0-100 scale)."""
    rows = [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    return "\n".join(["| metric | value |", "|---|---|", f"| items | {n} |", *rows])
