"""jaxcai: Constitutional AI research in JAX/Flax.

Modules: `model_config`, `model`, `sharding`, `hf`, `tokenizer`, `chat`, `sample`
(foundation); `losses`, `objectives`, `train`, `trainer`, `hooks`, `loop`, `checkpoint`,
`metrics`, `config`, `data` (training); `cai`, `evals`, `streams` (the Constitutional AI
pipeline). `docs/architecture.md` maps where each concept lives; the README documents
the public API.
"""

__version__ = "0.1.0"
