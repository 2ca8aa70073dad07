"""LoRA adaptation on text the user declares normal (`sinkstream adapt`, issue 18 item 2).

The model's surprise is relative to what it was pre-trained on (web English); a log line that is routine for
*this* system but rare on the web scores high. A small LoRA adapter (`peft`, Hu et al. 2021) trained on this
system's normal text moves the reference: after it, "surprising" means "unlike this system's normal".

Data: the text is tokenized as one stream (lines joined with newlines, as the service sees them) and cut into
blocks of `block` tokens; the last `holdout` share of the blocks (at least one) is held out and never trained on.
Training: AdamW on the LoRA matrices only (the base weights are frozen), next-token cross-entropy, a fixed number
of steps over shuffled blocks (seeded: the same text, settings and base model give the same adapter on the same
machine). The held-out loss (mean NLL per token, nats) is measured before and after.

The result is a peft adapter folder (`adapter_config.json`, `adapter_model.safetensors`) plus `adapt.json`
(settings, losses, the adapter's fingerprint = `model.loader.adapter_fingerprint`). `model.adapter: FOLDER`
merges it into the weights when the service starts (`model.loader.merge_adapter`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch

from model.loader import LoadedModel, adapter_fingerprint
from model.row_stable import plain_linears
from model.tokens import encode_text

log = structlog.get_logger(__name__)


@dataclass
class AdaptConfig:
    """What `sinkstream adapt` trains; the defaults fit a few CPU minutes on SmolLM2-135M."""

    steps: int = 100
    batch: int = 2
    block: int = 128
    lr: float = 1e-3
    rank: int = 8
    alpha: int = 16
    # Module names to adapt; empty = peft's default for the architecture (q_proj, v_proj on Llama).
    targets: list[str] = field(default_factory=list)
    holdout: float = 0.1
    seed: int = 0


def token_blocks(tokenizer: Any, lines: Sequence[str], block: int) -> torch.Tensor:
    """The lines as one token stream (each ends with a newline), cut into (N, block) blocks; the tail is dropped."""
    ids: list[int] = []
    for line in lines:
        ids.extend(encode_text(tokenizer, line.rstrip("\n") + "\n"))  # data, never control tokens
    n = len(ids) // block
    if n < 2:
        raise ValueError(f"expected at least {2 * block} tokens of normal text (two blocks of {block}: one to "
                         f"train on, one held out), got {len(ids)}")
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)


def split_blocks(blocks: torch.Tensor, holdout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the last `holdout` share of the blocks, at least one, never trained on."""
    n_held = min(len(blocks) - 1, max(1, round(len(blocks) * holdout)))
    return blocks[: len(blocks) - n_held], blocks[len(blocks) - n_held:]


def _loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def mean_loss(model: torch.nn.Module, blocks: torch.Tensor, batch: int, device: torch.device) -> float:
    """Mean next-token NLL (nats) over all targets of `blocks` (every block has the same number of targets)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch):
        part = blocks[i : i + batch].to(device)
        total += float(_loss(model, part)) * len(part)
    model.train(was_training)
    return total / len(blocks)


def train_adapter(
    lm: LoadedModel,
    lines: Sequence[str],
    cfg: AdaptConfig,
    out: Path,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train a LoRA adapter on `lines` and write it to `out`; returns the report also saved as `out/adapt.json`.

    `lm.model` is wrapped for training and unwrapped afterwards (its base weights are unchanged: the adapter is
    not merged here). `progress(step, loss)` is called after every step.
    """
    from peft import LoraConfig, get_peft_model

    if lm.adapter is not None:
        raise ValueError(f"expected a base model without an adapter, got one with adapter {lm.adapter} merged in")
    if lm.tokenizer is None:
        raise ValueError("expected a model with a tokenizer, got one without")
    train, held = split_blocks(token_blocks(lm.tokenizer, lines, cfg.block), cfg.holdout)
    model = lm.model
    previous_attn = model.config._attn_implementation
    model.set_attn_implementation("sdpa")  # a plain causal forward for training (no sink cache involved)
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=cfg.targets or None,
                      bias="none", task_type="CAUSAL_LM")
    plain = plain_linears(model)  # peft adapts nn.Linear: the bf16 row blocks step aside while training
    plain.__enter__()
    peft_model = get_peft_model(model, lora)
    try:
        before = mean_loss(peft_model, held, cfg.batch, lm.device)  # LoRA's B starts at 0: the base model's loss
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(train), generator=gen)
        peft_model.train()
        started = time.perf_counter()
        losses: list[float] = []
        cursor = 0
        for step in range(cfg.steps):
            if cursor + cfg.batch > len(order):
                order, cursor = torch.randperm(len(train), generator=gen), 0
            idx = order[cursor : cursor + cfg.batch]
            cursor += cfg.batch
            lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.steps // 10))  # linear warm-up over the first 10 %
            for group in opt.param_groups:
                group["lr"] = lr
            loss = _loss(peft_model, train[idx].to(lm.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, losses[-1])
        train_s = time.perf_counter() - started
        after = mean_loss(peft_model, held, cfg.batch, lm.device)
        out.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(out))
    finally:
        peft_model.unload()  # removes the LoRA layers; the base weights were never changed
        plain.__exit__(None, None, None)
        model.set_attn_implementation(previous_attn)
        model.eval()
    report = {
        "base_fingerprint": lm.fingerprint,
        "adapter_fingerprint": adapter_fingerprint(out),
        "config": asdict(cfg),
        "lines": len(lines),
        "train_blocks": len(train),
        "held_out_blocks": len(held),
        "train_tokens_seen": cfg.steps * cfg.batch * cfg.block,
        "held_out_loss_before": round(before, 4),
        "held_out_loss_after": round(after, 4),
        "held_out_ppl_before": round(math.exp(before), 3),
        "held_out_ppl_after": round(math.exp(after), 3),
        "train_loss_first": round(losses[0], 4) if losses else None,
        "train_loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 4) if losses else None,
        "train_s": round(train_s, 1),
        "threads": torch.get_num_threads(),
    }
    (out / "adapt.json").write_text(json.dumps(report, indent=1))
    log.info("adapt.done", out=str(out), **{k: v for k, v in report.items() if k != "config"})
    return report
