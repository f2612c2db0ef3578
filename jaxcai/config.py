"""Typed configs of a training run, registered with Hydra as structured configs.

Hydra composes `configs/train.yaml` from the groups `model`, `objective`, `data`,
`optimizer`, `mesh`, `trainer` and `experiment`; each group's node is checked against the
dataclass here (a wrong type fails at composition), and `validate` checks values and
cross-field rules at start-up, naming the key of any bad value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from importlib import resources
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from jaxcai.model_config import ModelConfig
from jaxcai.sharding import MeshConfig

# The Hydra configs: the repository's top-level configs/ directory, shipped in the package
# as `jaxcai.configs` (pyproject.toml maps it; an editable install reads the checkout's).
CONFIG_PACKAGE = "jaxcai.configs"
CONFIG_PATH = f"pkg://{CONFIG_PACKAGE}"  # what the entry points give `hydra.main`
CONFIG_DIR = str(resources.files(CONFIG_PACKAGE))  # the same directory on disk
SCHEDULES = ("cosine", "linear", "constant")
REFERENCES = ("precompute", "model")
NONFINITE = ("stop", "skip")
PADDING = ("fixed", "bucket")
KL_ESTIMATORS = ("k1", "k3")
REWARD_NORMALIZE = ("none", "batch")


class ConfigError(ValueError):
    """A config value that cannot work; the message names its key."""


def _mutable_schema(
    cls: type,
    annotations: dict[str, str] | None = None,
    extra: dict[str, tuple[str, Any]] | None = None,
) -> type:
    """A non-frozen copy of a frozen dataclass (Hydra overrides need a mutable node)."""
    fields = [
        (
            f.name,
            (annotations or {}).get(f.name, f.type),
            dataclasses.field(default="???" if f.default is dataclasses.MISSING else f.default),
        )
        for f in dataclasses.fields(cls)
    ]
    fields += [(n, a, dataclasses.field(default=d)) for n, (a, d) in (extra or {}).items()]
    return dataclasses.make_dataclass(
        f"{cls.__name__}Schema", fields, namespace={"__module__": __name__}
    )


ModelConfigSchema = _mutable_schema(
    ModelConfig,
    {"rope_scaling": "Any", "lora_targets": "Any"},  # checked by from_dict
    {"name": ("str", "custom")},
)
MeshConfigSchema = _mutable_schema(MeshConfig)


@dataclasses.dataclass
class ObjectiveConfig:
    """What is optimised. `lm`: next-token loss on every token (raw text, packed);
    `sft`: loss on the response only; `rm`: Bradley-Terry reward model; `dpo`; and the
    online RL objectives `ppo`, `rloo`, `grpo`, `online_dpo` (`jaxcai.rl`), which sample
    their own data (`rollout`) and score it (`reward_model`, `reward`)."""

    name: str = "sft"
    beta: float = 0.1  # dpo
    loss_type: str = "sigmoid"  # dpo: sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0  # dpo (sigmoid, robust)
    soft_labels: bool = False  # rm/dpo: use the data's p_chosen as a soft label
    reference: str = "precompute"  # dpo: precompute ref log-probs once, or run a frozen model
    margin: float = 0.0  # rm: Bradley-Terry margin
    center_coef: float = 0.0  # rm: reward centering coefficient
    # online RL (ppo, rloo, grpo; online_dpo uses beta / loss_type / soft_labels above)
    clip: float = 0.2  # ppo, grpo: the policy ratio is clipped to [1 - clip, 1 + clip]
    kl_coef: float = 0.05  # weight of the KL to the reference policy
    kl_estimator: str = "k1"  # ppo: k1 per token in the reward | k3 as a loss term
    whiten_advantages: bool = True  # ppo: advantages to zero mean, unit variance per batch
    gamma: float = 1.0  # ppo: discount
    lam: float = 0.95  # ppo: GAE lambda
    vf_coef: float = 0.1  # ppo: weight of the value loss
    vf_clip: float = 0.2  # ppo: the value may move this far from the rollout's
    value_lr: float | None = None  # ppo: the value model's learning rate (None: optimizer.lr)
    # ppo: the value model's initial weights; None = the reward model (reward_model) when
    # given, else the policy's backbone with a fresh scalar head
    value_init: str | None = None


@dataclasses.dataclass
class DataConfig:
    """Training data: prepared TFDS datasets (`jaxcai-data`), `bundled:NAME` for a file
    shipped in `jaxcai/data/files/`, or a raw JSONL file (prepared once into the cache).
    Truncation, packing and padding are documented in `jaxcai.data.pipeline`."""

    train: str = "bundled:sft.jsonl"
    eval: str | None = None  # None: train's `eval` split if it has one, else hold out
    eval_fraction: float = 0.1
    format: str = "jsonl"  # raw files only: jsonl | hh
    max_len: int = 128  # tokens per row (prompt + response, or packed examples)
    max_prompt_len: int | None = None  # a truncated prompt keeps >= this many (None: max_len/2)
    truncate: bool = True  # over-long: keep the prompt's end and response's start; else error
    pack: bool = True  # sft: pack several examples into each row
    pad: str = "fixed"  # fixed: rows of max_len | bucket: the smallest bucket that fits
    buckets: list[int] | None = None  # bucket lengths; None = powers of two from 64
    # preference: several pairs per row, each pair's prompt computed once (jaxcai.data.pairs)
    pack_pairs: bool = True
    shuffle: bool = True
    workers: int = 0  # grain worker processes (0: read in the training process)
    read_threads: int = 2
    # A checkpoint directory, tokenizer.json or sentencepiece .model; None = the model's
    # own (trainer.init_from's), else the bundled tokenizer.
    tokenizer: str | None = None
    chat: str = "auto"  # auto | template | human_assistant (jaxcai.chat)
    chat_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # template keywords
    skip_invalid: bool = False  # count and report bad records instead of failing


@dataclasses.dataclass
class RolloutConfig:
    """Online RL: how each rollout batch is sampled from the current policy. A rollout
    gives `prompts * samples` sequences; each is used `epochs` times in updates of
    `trainer.batch_size` sequences (pairs for online_dpo)."""

    prompts: int = 8  # prompts per rollout
    samples: int = 2  # responses per prompt (rloo/grpo: the group; online_dpo: 2)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    epochs: int = 1  # update passes over each rollout batch
    batch_size: int = 32  # sequences sampled at a time


@dataclasses.dataclass
class RewardConfig:
    """Online RL: what scores a response, beside (or instead of) `reward_model`.

    `fn` is `module:function`, called with (prompts, responses) and returning one float
    per response; `judge` is a language model (HF directory or run) asked the
    constitution's preference questions about two responses, as in AI feedback."""

    fn: str | None = None
    judge: str | None = None
    constitution: str = "default"  # judge: a constitution file or bundled name
    few_shot: bool = True  # judge: the constitution's feedback examples first
    debias: bool = True  # judge: ask both orders and average
    length_penalty: float = 0.0  # subtracted per response token
    normalize: str = "none"  # none | batch: rewards to zero mean, unit variance per rollout
    clip: float = 0.0  # rewards clipped to [-clip, clip] after normalising; 0 = off
    batch_size: int = 32  # reward model / judge batch


@dataclasses.dataclass
class OptimizerConfig:
    """AdamW with warmup then `schedule` decay to `min_lr_ratio * lr`."""

    lr: float = 3e-4
    warmup_steps: int = 10
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables


@dataclasses.dataclass
class DistributedConfig:
    """Multi-process runs: all None lets `jax.distributed.initialize` read the environment
    (SLURM, TPU, ...); set them for a manual launch. `enabled=False` skips it."""

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list[int] | None = None


@dataclasses.dataclass
class TrainerConfig:
    steps: int = 100
    batch_size: int = 8  # global, in sequences (pairs for rm/dpo)
    grad_accum: int = 1  # micro-batches per step; batch_size must divide into them
    seed: int = 0
    init_from: str | None = None  # HF dir, jaxcai run or run/checkpoints/N; None = random
    log_every: int = 1
    eval_every: int = 50  # 0 disables
    eval_batches: int = 0  # 0 = the whole eval split
    checkpoint_every: int = 50  # 0 disables periodic saves (the final one is always saved)
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    resume: bool = True  # continue from the run directory's latest checkpoint
    nonfinite: str = "stop"  # a NaN/inf loss: stop the run, or skip the update and go on
    export_hf: bool = False  # write the final params as a Hugging Face directory
    generate_eval: int = 0  # sft: answer this many eval prompts by generation at the end
    generate_max_new_tokens: int = 128  # (scored with ROUGE-L, BLEU, exact match, token F1)
    peak_tflops: float | None = None  # per device, for MFU; None = known accelerators only
    progress: bool = True
    tensorboard: bool = True


@dataclasses.dataclass
class AotConfig:
    """`jaxcai-aot` only: the target the step is compiled for (`jaxcai.aot`)."""

    devices: int | None = None  # compile for this many CPU devices (a pod stand-in)
    device_memory_gb: float = 80.0  # per-device capacity the report compares the peak with


@dataclasses.dataclass
class TrainConfig:
    model: Any = dataclasses.field(default_factory=ModelConfigSchema)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfigSchema = dataclasses.field(default_factory=MeshConfigSchema)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    rules: list[list[Any]] | None = None  # logical->mesh rules; None = DEFAULT_RULES
    # Python modules imported at start-up; importing one registers its objectives
    # (`jaxcai.objectives.register`), e.g. plugins=[my_lab.objectives].
    plugins: list[str] = dataclasses.field(default_factory=list)
    aot: AotConfig = dataclasses.field(default_factory=AotConfig)
    # online RL: a reward model (an `rm` run or its checkpoint) that scores rollouts
    reward_model: str | None = None
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)


def register() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="model", name="schema", node=ModelConfigSchema)
    cs.store(group="objective", name="schema", node=ObjectiveConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="optimizer", name="schema", node=OptimizerConfig)
    cs.store(group="mesh", name="schema", node=MeshConfigSchema)
    cs.store(group="trainer", name="schema", node=TrainerConfig)


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config Hydra would build for `jaxcai-train overrides...` (for scripts and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register()
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (e.g. `jaxcai-cai`)
        return hydra_compose(config_name, overrides=list(overrides))
    with initialize_config_module(CONFIG_PACKAGE, version_base=None):
        return hydra_compose(config_name, overrides=list(overrides))


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"config {key}={value!r}: {why}")


def model_config(cfg: DictConfig | dict) -> ModelConfig:
    """The `ModelConfig` of a composed config's `model` node."""
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config model: {e}") from e


CHAT_KINDS = ("auto", "template", "human_assistant")  # jaxcai.chat.KINDS


def _validate_objective(o: DictConfig, t: DictConfig) -> None:
    from jaxcai import objectives
    from jaxcai.losses import DPO_LOSSES

    names = objectives.names()
    _check(o.name in names, "objective.name", o.name, f"choose one of {names}")
    _check(
        o.loss_type in DPO_LOSSES,
        "objective.loss_type",
        o.loss_type,
        f"choose one of {sorted(DPO_LOSSES)}",
    )
    _check(
        o.reference in REFERENCES, "objective.reference", o.reference, f"choose one of {REFERENCES}"
    )
    _check(o.beta > 0, "objective.beta", o.beta, "must be positive")
    _check(
        0 <= o.label_smoothing < 0.5,
        "objective.label_smoothing",
        o.label_smoothing,
        "must be in [0, 0.5)",
    )
    _check(
        not t.generate_eval or objectives.get(o.name).data_kind == "sft",
        "trainer.generate_eval",
        t.generate_eval,
        f"evaluation by generation needs objective sft, not {o.name}",
    )


def _validate_optimizer(opt: DictConfig) -> None:
    _check(
        opt.schedule in SCHEDULES, "optimizer.schedule", opt.schedule, f"choose one of {SCHEDULES}"
    )
    _check(opt.lr > 0, "optimizer.lr", opt.lr, "must be positive")
    _check(opt.warmup_steps >= 0, "optimizer.warmup_steps", opt.warmup_steps, "must be >= 0")
    _check(
        0 <= opt.min_lr_ratio <= 1, "optimizer.min_lr_ratio", opt.min_lr_ratio, "must be in [0, 1]"
    )


def _validate_trainer(t: DictConfig) -> None:
    _check(
        t.generate_max_new_tokens > 0,
        "trainer.generate_max_new_tokens",
        t.generate_max_new_tokens,
        "must be positive",
    )
    _check(t.nonfinite in NONFINITE, "trainer.nonfinite", t.nonfinite, f"choose one of {NONFINITE}")
    for key in ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
        _check(t[key] > 0, f"trainer.{key}", t[key], "must be positive")
    for key in ("eval_every", "eval_batches", "checkpoint_every", "generate_eval"):
        _check(t[key] >= 0, f"trainer.{key}", t[key], "must be >= 0")
    _check(
        t.batch_size % t.grad_accum == 0,
        "trainer.batch_size",
        t.batch_size,
        f"must be divisible by trainer.grad_accum={t.grad_accum}",
    )


def _validate_data(d: DictConfig) -> None:
    _check(d.max_len >= 2, "data.max_len", d.max_len, "must be at least 2")
    _check(d.format in ("jsonl", "hh"), "data.format", d.format, "choose jsonl or hh")
    _check(d.pad in PADDING, "data.pad", d.pad, f"choose one of {PADDING}")
    _check(d.chat in CHAT_KINDS, "data.chat", d.chat, f"choose one of {CHAT_KINDS}")
    _check(d.workers >= 0, "data.workers", d.workers, "must be >= 0")
    _check(d.read_threads >= 1, "data.read_threads", d.read_threads, "must be >= 1")
    _check(
        d.max_prompt_len is None or 0 < d.max_prompt_len < d.max_len,
        "data.max_prompt_len",
        d.max_prompt_len,
        f"must be in (0, data.max_len={d.max_len})",
    )
    _check(
        not d.buckets or all(0 < b <= d.max_len for b in d.buckets),
        "data.buckets",
        d.buckets,
        f"lengths must be in (0, data.max_len={d.max_len}]",
    )
    _check(0 <= d.eval_fraction < 1, "data.eval_fraction", d.eval_fraction, "must be in [0, 1)")


def validate(cfg: DictConfig, n_devices: int) -> None:
    """Check values and cross-field rules; raise `ConfigError` naming the key."""
    t, d = cfg.trainer, cfg.data
    _validate_objective(cfg.objective, t)
    _validate_optimizer(cfg.optimizer)
    _validate_trainer(t)
    _validate_data(d)
    from jaxcai import objectives

    check_objective = objectives.get(cfg.objective.name).validate
    if check_objective is not None:
        check_objective(cfg)
    try:
        mesh_shape = MeshConfig(**cfg.mesh).shape(n_devices)
    except ValueError as e:
        values = " ".join(f"mesh.{k}={v}" for k, v in cfg.mesh.items())
        raise ConfigError(f"config {values}: {e}") from e
    batch_shards = mesh_shape[0] * mesh_shape[1]
    micro = t.batch_size // t.grad_accum
    _check(
        micro % batch_shards == 0,
        "trainer.batch_size",
        t.batch_size,
        f"each of the {t.grad_accum} micro-batches ({micro}) must divide over the "
        f"data x fsdp = {batch_shards} batch shards of mesh {cfg.mesh}",
    )
    config = model_config(cfg.model)
    _check(
        d.max_len <= config.max_seq_len,
        "data.max_len",
        d.max_len,
        f"exceeds model.max_seq_len={config.max_seq_len}",
    )
