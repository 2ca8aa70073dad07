"""A small byte-level BPE tokenizer trained with the `tokenizers` library, saved with every run.

Byte-level, so every input (prose, logs, stray control bytes) encodes without unknown tokens. Two special
tokens: `<|endoftext|>` and the dedicated sink token `<|sink|>`, which only the sink-token model ever sees
in training. Both models of a study share one tokenizer, so their perplexities are per the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
SINK_TOKEN = "<|sink|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE of at most `vocab_size` tokens (specials included); return a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258 + 2:
        raise ValueError(f"vocab_size must be at least 260 (256 bytes + specials + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, SINK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return wrap(tok)


def wrap(tok):
    """A `PreTrainedTokenizerFast` around a `tokenizers.Tokenizer`, with the EOS and sink specials declared."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN)
    fast.add_special_tokens({"additional_special_tokens": [SINK_TOKEN]})
    if fast.convert_tokens_to_ids(SINK_TOKEN) != tok.token_to_id(SINK_TOKEN):
        raise RuntimeError(
            f"expected {SINK_TOKEN} to keep id {tok.token_to_id(SINK_TOKEN)}, "
            f"got {fast.convert_tokens_to_ids(SINK_TOKEN)}"
        )
    return fast


def save_tokenizer(tokenizer, path: Path) -> None:
    """Save as a Hugging Face tokenizer folder (loadable by `AutoTokenizer.from_pretrained`)."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"expected a saved tokenizer at {path}/tokenizer.json, found none")
    return AutoTokenizer.from_pretrained(path)


def sink_id(tokenizer) -> int:
    """Id of the dedicated sink token; ValueError if the tokenizer has none."""
    ids = tokenizer.convert_tokens_to_ids([SINK_TOKEN])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"expected the tokenizer to hold the special token {SINK_TOKEN!r}, it does not")
    return int(ids[0])
