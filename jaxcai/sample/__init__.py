"""Sampling and scoring with the KV cache: batched, jitted, sharded, exactly reproducible.

`generate` left-pads a batch of prompts, prefills them in one pass, then decodes inside
one compiled `lax.while_loop` over a preallocated cache, finishing early once every row
has stopped. Sampling rules (greedy, temperature, top-k, top-p) are traced values, so
changing them never recompiles; shapes are padded to a few buckets (batch sizes and
prompt lengths of powers of two) so a long pipeline compiles a handful of programs.

Every sequence draws its randomness from its own key, `fold_in(fold_in(key(seed),
prompt index), sample index)` (or the caller's per-prompt `seeds`), folded with the step,
so a sample never depends on which other prompts share its batch, on padding or on the
mesh. Log-probs are the model's own (`log_softmax` of the raw logits, before temperature
or filtering), so they equal a forward pass over the generated text.

Stop token ids end a sequence on device; stop strings need text, so with `stop_strings`
the decode loop runs in chunks of `stop_check_every` tokens and the host checks the text
between chunks (the compiled program is the same for every chunk).

`score` sums the log-probs of continuations given prompts; `choose` turns them into
normalised probabilities over a set of options (the AI-feedback labeller's primitive).
`generate_chat` samples answers in a chat format (every CAI stage goes through it).

Modules: `filters` (top-k/top-p, one token per row), `batching` (prompt cutting,
padding, shape buckets, mesh placement), `device` (the compiled prefill and decode
loop), `decoding` (`generate` on the host), `scoring` (`score`, `choose`), `chat`
(`generate_chat`, the transcript's end of turn).
"""

from jaxcai.sample.batching import SAMPLING_RULES, keep_end, left_pad
from jaxcai.sample.chat import HUMAN_TURN, STOP, ChatSamples, generate_chat
from jaxcai.sample.decoding import Generation, generate, greedy_generate
from jaxcai.sample.device import STOP_REASONS
from jaxcai.sample.device import decode_steps as _decode  # noqa: F401  (compiled programs,
from jaxcai.sample.device import prefill_step as _prefill  # noqa: F401  read by the tests)
from jaxcai.sample.filters import filter_logits, sample_tokens
from jaxcai.sample.scoring import choose, score

__all__ = [
    "HUMAN_TURN",
    "SAMPLING_RULES",
    "STOP",
    "STOP_REASONS",
    "ChatSamples",
    "Generation",
    "choose",
    "filter_logits",
    "generate",
    "generate_chat",
    "greedy_generate",
    "keep_end",
    "left_pad",
    "sample_tokens",
    "score",
]
