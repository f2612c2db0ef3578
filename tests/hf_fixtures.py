"""Tokenizer directories in the shapes of real checkpoint families, built with the
`tokenizers` library (no downloads): byte-level BPE with the Llama-3 and Qwen2
pre-tokenizer patterns and their special tokens, and a byte-fallback BPE of the
Llama-2/Mistral kind. Each directory holds `tokenizer.json`, `tokenizer_config.json`
(with a chat template where the family has one) and `generation_config.json`."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "jaxcai" / "assets" / "tokenizer_corpus.txt"

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Chat templates in the shapes of the families' (written here, not copied).
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set rest = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- set rest = messages %}"
    "{%- endif %}"
    "{%- for m in rest %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
HEADER_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' + system + '<|eot_id|>' }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def _corpus_lines() -> list[str]:
    text = CORPUS.read_text(encoding="utf-8")
    extra = [
        "def main(x):\n    return {'a': [1, 2, 3]}\n",
        "日本語のテキストと中文文本 🌿🪴🙂",
        "It's, we're, they'll, I'd. 12345 67.89",
    ]
    return text.split("\n") + extra * 20


def _byte_level(pattern: str, special: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=_regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer)
    return tok


def _regex(pattern: str):
    from tokenizers import Regex

    return Regex(pattern)


def _write(path: Path, tok: Tokenizer, config: dict, generation: dict | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return path


def qwen2_dir(path: Path, *, template: str | None = CHATML_TEMPLATE) -> Path:
    """Qwen2/Qwen3 shape: byte-level BPE, NFC, no BOS, `<|im_start|>`/`<|im_end|>`."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = _byte_level(QWEN2_PATTERN, special, 700)
    tok.normalizer = normalizers.NFC()
    tok.add_special_tokens(special)
    tok.add_tokens(["<think>", "</think>"])
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
    }
    if template:
        config["chat_template"] = template
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    return _write(path, tok, config, {"eos_token_id": eos, "pad_token_id": eos[1]})


def llama3_dir(path: Path, *, template: str | None = HEADER_TEMPLATE) -> Path:
    """Llama-3 shape: byte-level BPE, BOS added by the post-processor, header-id turns."""
    special = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tok = _byte_level(LLAMA3_PATTERN, special, 720)
    tok.add_special_tokens(special)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": True,
        "model_max_length": 131072,
    }
    if template:
        config["chat_template"] = template
    ids = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    return _write(path, tok, config, {"bos_token_id": bos, "eos_token_id": ids})


def llama2_dir(path: Path, *, template: str | None = None) -> Path:
    """Llama-2/Mistral shape: byte-fallback BPE over `▁`-joined words, `<s>` BOS."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        show_progress=False,
        limit_alphabet=120,
    )
    tok.train_from_iterator(_corpus_lines(), trainer)
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
    }
    if template:
        config["chat_template"] = template
    return _write(path, tok, config, {"bos_token_id": bos, "eos_token_id": tok.token_to_id("</s>")})


def gemma_dir(path: Path, *, template: str | None = GEMMA_TEMPLATE) -> Path:
    """Gemma shape: byte-fallback BPE, `<bos>`, `<start_of_turn>`/`<end_of_turn>`."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=[*special, *byte_tokens],
        show_progress=False,
        limit_alphabet=120,
    )
    tok.train_from_iterator(_corpus_lines(), trainer)
    tok.add_special_tokens(special)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if template:
        config["chat_template"] = template
    eos = [tok.token_to_id("<eos>"), tok.token_to_id("<end_of_turn>")]
    return _write(path, tok, config, {"bos_token_id": bos, "eos_token_id": eos})


FAMILIES = {"qwen2": qwen2_dir, "llama3": llama3_dir, "llama2": llama2_dir, "gemma": gemma_dir}


def tiny_model_dir(path: Path, family: str, vocab_size: int, **overrides) -> Path:
    """A tiny random `transformers` model of `family` ("Qwen2", "Qwen3", ...) saved in
    `path` (beside a fixture tokenizer written there)."""
    import torch
    import transformers

    values = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    config = getattr(transformers, f"{family}Config")(**values)
    torch.manual_seed(0)
    getattr(transformers, f"{family}ForCausalLM")(config).save_pretrained(path)
    return path
