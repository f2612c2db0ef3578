"""Where every CAI output came from: the provenance record each dataset and model
carries, and the model card written beside a trained model's checkpoints."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

import jaxcai
from jaxcai.cai.constitution import Constitution
from jaxcai.chat import ChatFormat
from jaxcai.data import builders

__all__ = ["dataset_provenance", "model_card", "plain", "provenance"]


def plain(node: Any) -> Any:
    """A config node as plain Python containers (other values as they are)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def provenance(
    cfg: DictConfig,
    constitution: Constitution,
    prompt_sources: dict[str, Any],
    outputs: dict[str, str],
    chats: tuple[ChatFormat, ChatFormat],
    stage: str,
    **extra: Any,
) -> dict[str, Any]:
    """The record of a stage's output: version, seed, constitution, prompts, models, chat
    formats and sampling settings, then the stage's own `extra` entries."""
    policy_chat, feedback_chat = chats
    c = constitution
    return {
        "stage": stage,
        "jaxcai_version": jaxcai.__version__,
        "seed": int(cfg.seed),
        "constitution": {"name": c.name, "source": c.source, "sha256": c.sha256},
        "prompts": prompt_sources,
        "initial_policy": outputs.get("initial"),
        "feedback_model": cfg.feedback_model or outputs.get("initial"),
        "chat": {"policy": policy_chat.describe(), "feedback": feedback_chat.describe()},
        "sampling": OmegaConf.to_container(cfg.sampling, resolve=True),
        **extra,
    }


def dataset_provenance(spec: str) -> dict[str, Any] | None:
    """The provenance a prepared dataset records, or None (e.g. a raw JSONL file)."""
    try:
        return builders.load(spec).metadata.get("provenance")
    except Exception:  # a raw file handed in through `inputs`
        return None


def model_card(stage: str, provenance: dict[str, Any], summary: dict[str, Any]) -> str:
    """`MODEL_CARD.md` of a trained stage: what it is, its inputs, its final metrics."""
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
