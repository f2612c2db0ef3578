"""Train the tokenizer that ships with jaxcai.

    python scripts/train_tokenizer.py            # rewrites jaxcai/assets/tokenizer.model
    python scripts/train_tokenizer.py --vocab-size 2048 --out /tmp/my.model my_text.txt

Trains a byte-fallback BPE sentencepiece model (1024 pieces by default, the `tiny`
model preset's vocabulary) on `jaxcai/assets/tokenizer_corpus.txt`, text written for
this project. Training is single-threaded and deterministic for the same input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxcai.tokenizer import Tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "jaxcai" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", default=[str(ASSETS / "tokenizer_corpus.txt")])
    parser.add_argument("--out", default=str(ASSETS / "tokenizer.model"))
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    args = parser.parse_args()
    tok = Tokenizer.train(
        args.files, args.out, vocab_size=args.vocab_size, model_type=args.model_type
    )
    text = Path(args.files[0]).read_text(encoding="utf-8")
    n_tokens = len(tok.encode(text))
    print(
        f"wrote {args.out}: {tok.vocab_size} pieces, {len(text) / n_tokens:.2f} chars/token "
        f"on {args.files[0]}"
    )


if __name__ == "__main__":
    main()
