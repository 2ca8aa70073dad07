"""Training and held-out data: the Canterbury corpus texts and the Loghub 2k logs, split per file.

Every source file is split once, by characters at a line boundary: the first `1 - holdout` is training text,
the rest is held out (never trained on, and not seen by the tokenizer). Training samples are windows of a
fixed number of tokens at random offsets of a random training file (files drawn in proportion to their
size). The batch of step `s` depends only on (seed, s), so a resumed run draws exactly the batches an
uninterrupted run would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.evaluation.datasets import CANTERBURY_FILES, canterbury, loghub_dir
from pipeline.settings import sinkstream_home


@dataclass
class Source:
    name: str
    kind: str  # "prose" or "logs"
    train_text: str
    heldout_text: str


def split_text(text: str, holdout: float) -> tuple[str, str]:
    """(train, held-out): the last `holdout` fraction of `text`, starting at a line boundary, is held out."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    cut = int(len(text) * (1.0 - holdout))
    newline = text.find("\n", cut)
    cut = newline + 1 if 0 <= newline < len(text) - 1 else cut
    return text[:cut], text[cut:]


def load_sources(holdout: float = 0.1, max_chars: int | None = None, home: Path | None = None) -> list[Source]:
    """The four Canterbury texts (fetched once from the brotli sdist) and every Loghub `*_2k.log`, split.

    `max_chars` truncates each file first (the `--quick` harness test uses a small slice of every file).
    """
    out: list[Source] = []
    prose_dir = canterbury(home or sinkstream_home())
    files = [(prose_dir / name, "prose") for name in CANTERBURY_FILES]
    files += [(path, "logs") for path in sorted(loghub_dir().glob("*_2k.log"))]
    for path, kind in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if max_chars is not None:
            text = text[:max_chars]
        train, held = split_text(text, holdout)
        out.append(Source(path.name, kind, train, held))
    return out


class TokenizedCorpus:
    """Token ids of every source's training and held-out part, plus the deterministic batch sampler."""

    def __init__(self, sources: list[Source], tokenizer):
        self.sources = sources
        encode = lambda text: np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)  # noqa: E731
        self.train = [encode(s.train_text) for s in sources]
        self.heldout = [encode(s.heldout_text) for s in sources]

    def stats(self) -> dict:
        return {
            "files": [
                {"name": s.name, "kind": s.kind, "train_tokens": int(t.size), "heldout_tokens": int(h.size),
                 "train_chars": len(s.train_text), "heldout_chars": len(s.heldout_text)}
                for s, t, h in zip(self.sources, self.train, self.heldout)
            ],
            "train_tokens": int(sum(t.size for t in self.train)),
            "heldout_tokens": int(sum(h.size for h in self.heldout)),
        }

    def batch(self, seed: int, step: int, batch_size: int, length: int) -> torch.Tensor:
        """(batch_size, length) training windows for step `step`; a pure function of (seed, step)."""
        rng = np.random.default_rng([seed, step])
        usable = [i for i, t in enumerate(self.train) if t.size > length]
        if not usable:
            raise ValueError(f"no training file holds more than {length} tokens; lower the sample length")
        sizes = np.asarray([self.train[i].size - length for i in usable], dtype=np.float64)
        picks = rng.choice(len(usable), size=batch_size, p=sizes / sizes.sum())
        rows = []
        for p in picks:
            ids = self.train[usable[p]]
            start = int(rng.integers(0, ids.size - length + 1))
            rows.append(ids[start : start + length])
        return torch.from_numpy(np.stack(rows))  # (B, L)

    def heldout_samples(self, count: int, length: int, seed: int = 1234) -> torch.Tensor:
        """(count, length) held-out windows for attention measurements and validation loss, fixed by `seed`."""
        rng = np.random.default_rng(seed)
        usable = [h for h in self.heldout if h.size > length]
        if not usable:
            raise ValueError(f"no held-out part holds more than {length} tokens")
        rows = []
        for k in range(count):
            ids = usable[k % len(usable)]
            start = int(rng.integers(0, ids.size - length + 1))
            rows.append(ids[start : start + length])
        return torch.from_numpy(np.stack(rows))  # (N, L)

    def heldout_stream(self, kind: str, tokens: int) -> list[int]:
        """A held-out evaluation stream of `tokens` ids: equal slices of every held-out part of `kind`, in order.

        Each file contributes ceil(tokens / files) tokens from the start of its held-out part (fewer if the part
        is shorter), so the stream covers every file of that kind; it is then cut to `tokens`.
        """
        parts = [h for s, h in zip(self.sources, self.heldout) if s.kind == kind]
        if not parts:
            raise ValueError(f"expected held-out sources of kind {kind!r}, found none")
        share = -(-tokens // len(parts))
        ids = np.concatenate([p[:share] for p in parts])[:tokens]
        if ids.size < tokens:
            raise ValueError(f"held-out {kind} text holds {ids.size} tokens, fewer than the {tokens} asked for")
        return [int(i) for i in ids]
