"""Sampling and scoring with the KV cache: batched, jitted, sharded, exactly reproducible.

`generate` decodes with continuous batching by default: `batch_size` slots share one
preallocated cache whose rows each keep their own length; when a sequence ends (stop id,
stop string or its length budget) the decode loop hands back to the host, which prefills
the next waiting prompts into the free slots and resumes, so slots never decode padding
for finished sequences while prompts wait. Each decode step reads only a window of the
cache (a quarter-octave bucket of the longest running row, `continuous.window_bucket`),
not the whole preallocated length. `continuous=False` is the static sampler: prompts
left-padded `batch_size` at a time, each batch prefilled in one pass and decoded to its
longest sequence over the whole cache. Both give the same outputs.

The device code is one compiled `lax.while_loop` over the cache either way. Sampling
rules (greedy, temperature, top-k, top-p) and stop ids are traced values, so changing
them never recompiles; shapes are padded to a few buckets (batch sizes and prompt lengths
of powers of two, cache windows of quarter octaves) so a long pipeline compiles a handful
of programs.

Every sequence draws its randomness from its own key, `fold_in(fold_in(key(seed),
prompt index), sample index)` (or the caller's per-prompt `seeds`), folded with its own
step, so a sample never depends on which other prompts share its batch or its slot, on
padding or on the mesh. Log-probs are the model's own (`log_softmax` of the raw logits,
before temperature or filtering), so they equal a forward pass over the generated text.

Stop token ids end a sequence on device; stop strings need text, so with `stop_strings`
the decode loop returns every `stop_check_every` tokens and the host reads the text; a
sequence's text is read at the same steps by either sampler (every `stop_check_every`
tokens after its first, and at its end), so where it is cut does not depend on batching.

`score` sums the log-probs of continuations given prompts; `choose` turns them into
normalised probabilities over a set of options (the AI-feedback labeller's primitive).
`generate_chat` samples answers in a chat format (every CAI stage goes through it).

Modules: `filters` (top-k/top-p, one token per row), `batching` (prompt cutting,
padding, shape buckets, mesh placement), `device` (the static sampler's compiled prefill
and decode loop), `slots` (continuous batching's compiled fill and decode loop),
`continuous` (its host loop: refills and cache windows), `stops` (stop ids and strings
on the host), `decoding` (`generate`), `scoring` (`score`, `choose`), `chat`
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
