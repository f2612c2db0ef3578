"""jaxcai: Constitutional AI research in JAX/Flax.

Modules: `model_config`, `model`, `sharding`, `hf`, `tokenizer`, `sample` (foundation);
`losses`, `train`, `loop`, `checkpoint`, `metrics`, `config`, `data` (training).
The README documents the public API.
"""

__version__ = "0.1.0"
