"""A dedicated sink token at the start of every stream (`cache.sink_token`; issue 13).

Xiao et al. 2023, section 3.3: a model pre-trained with one learnable placeholder token at the start of every
sample needs only that token as its attention sink when streaming (Table 3: 1 sink + window is then as good
as 4 sinks for a vanilla model). With `cache.sink_token` set, the session feeds that token into every NEW
stream's cache before the stream's first text token:

- it is never scored: the logits it produces are discarded, so the stream's first text token stays
  unscored exactly as without a sink token, and annotations cover the same tokens either way;
- it occupies cache position 0, so with `cache.sinks >= 1` it is kept forever as the stream's sink;
- it survives snapshots because it lives in the cache (snapshots hold the sink keys and values);
- `sinkstream-reset` builds a new cache, which is primed again.

`resolve_sink_token` turns the setting into an id once per process (the model's tokenizer maps a string);
`prime_sink_token` primes one cache.
"""

from __future__ import annotations

import torch

from model.sink_cache import SinkCache
from model.stepper import SinkModel


class SinkTokenError(ValueError):
    """`cache.sink_token` names no single token of the model; the message says what arrived."""


def resolve_sink_token(tokenizer, value: int | str | None, vocab_size: int) -> int | None:
    """The token id for `cache.sink_token`: an int is an id (checked against the vocabulary), a str must
    encode to exactly one token with `tokenizer` (special tokens such as `<|sink|>` included). None is off."""
    if value is None:
        return None
    if isinstance(value, bool):  # bool is an int subclass; `sink_token: true` in YAML is a mistake
        raise SinkTokenError(f"cache.sink_token: expected a token id or the token's text, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value < vocab_size:
            raise SinkTokenError(f"cache.sink_token: expected a token id in 0..{vocab_size - 1}, got {value}")
        return value
    if tokenizer is None:
        raise SinkTokenError(f"cache.sink_token {value!r} is text, but the model has no tokenizer to map it")
    ids = tokenizer(value, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise SinkTokenError(
            f"cache.sink_token: expected {value!r} to be exactly one token of the model's tokenizer, "
            f"it encodes to {len(ids)} tokens {ids}; use a special token of the model or give its id"
        )
    return int(ids[0])


def prime_sink_token(runner: SinkModel, cache: SinkCache, token_id: int) -> torch.Tensor:
    """Feed the sink token into a new, empty stream cache; return the logits it produced (vocab,).

    Callers discard those logits (the sink token is never scored, and neither is the stream's first text
    token, as without a sink token). Raises ValueError on a cache that has already seen tokens: the sink token
    only works as position 0 of a stream.
    """
    if cache.seen != 0:
        raise ValueError(f"prime_sink_token needs a new cache (0 tokens seen), got one that has seen {cache.seen}")
    return runner.step(cache, [token_id])[-1]
