"""Hydra configs of every jaxcai command. This directory stays at the top of the
repository and ships inside the package as `jaxcai.configs` (see `pyproject.toml`), where
the entry points find it: `config_path="pkg://jaxcai.configs"`."""
