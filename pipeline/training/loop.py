"""The training loop and the whole study: tokenizer, data, two models, checkpoints, evaluation, plots.

Run folder layout (`sinkstream pretrain --out DIR`):

    DIR/study.json                 the StudyConfig (a resumed run reuses it; only `steps` may be raised)
    DIR/tokenizer/                 the BPE tokenizer (Hugging Face folder)
    DIR/data.json                  per-file training / held-out token counts
    DIR/<variant>/checkpoint/      model.safetensors, optimizer.safetensors, trainer.json (step, log)
    DIR/<variant>/model/           the final model + tokenizer, loadable with `--model DIR/<variant>/model`
    DIR/results.json               training probes, attention shares, streaming perplexities
    DIR/table.md, DIR/sink_token_*.png
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import structlog
import torch
from tqdm import tqdm

from pipeline.training import study
from pipeline.training.checkpoint import load_checkpoint, save_checkpoint
from pipeline.training.config import VARIANTS, StudyConfig, build_model, lr_at
from pipeline.training.data import TokenizedCorpus, load_sources
from pipeline.training.tokenizer import load_tokenizer, save_tokenizer, sink_id, train_tokenizer

log = structlog.get_logger(__name__)


def lm_loss(model: torch.nn.Module, ids: torch.Tensor, sink: int | None) -> torch.Tensor:
    """Mean next-token cross-entropy over targets ids[:, 1:] (B, L-1), for both variants.

    Vanilla: input ids (B, L). Sink: input [sink, ids] (B, L+1); the prediction made at the sink (of ids[0])
    is not scored, so both variants are trained and measured on exactly the same targets.
    """
    if sink is None:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]  # (B, L-1, V)
    else:
        inputs = torch.cat([torch.full((ids.shape[0], 1), sink, dtype=ids.dtype), ids], dim=1)  # (B, L+1)
        logits = model(input_ids=inputs, use_cache=False).logits[:, 1:-1]  # (B, L-1, V)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def probe_steps(config: StudyConfig) -> list[int]:
    """Steps (optimiser steps done) at which held-out loss and attention share are measured, 0 and last included."""
    if config.probes == 1:
        return [config.steps]
    return sorted({round(i * config.steps / (config.probes - 1)) for i in range(config.probes)})


def make_optimizer(model: torch.nn.Module, config: StudyConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


def train_variant(run: Path, variant: str, config: StudyConfig, corpus: TokenizedCorpus, tokenizer,
                  resume: bool, stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train one variant up to `config.steps` (or `stop_after`), checkpointing; return its trainer metadata.

    With `resume`, continues from `<run>/<variant>/checkpoint` (the batches and learning rates it then sees are
    exactly those an uninterrupted run would have seen). Without it, an existing checkpoint is an error.
    """
    sink = sink_id(tokenizer) if variant == "sink" else None
    folder = run / variant / "checkpoint"
    model = build_model(config, tokenizer)
    optimizer = make_optimizer(model, config)
    meta: dict[str, Any] = {"step": 0, "log": [], "probes": [], "train_seconds": 0.0}
    if folder.exists():
        if not resume:
            raise FileExistsError(
                f"{folder} already holds a checkpoint; pass --resume to continue it or pick a new --out"
            )
        meta = load_checkpoint(folder, model, optimizer)
        log.info("pretrain.resume", variant=variant, step=meta["step"])
    start = int(meta["step"])
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    probes = set(probe_steps(config))
    samples = corpus.heldout_samples(config.probe_samples, config.seq_len)
    model.train()

    def probe(step: int) -> None:
        if step in probes and all(p["step"] != step for p in meta["probes"]):
            meta["probes"].append({
                "step": step,
                "heldout_loss": study.heldout_loss(model, samples, sink),
                "attention": study.attention_share(model, samples, sink),
            })

    def checkpoint(step: int) -> None:
        meta_out = {k: v for k, v in meta.items() if k not in ("format", "step", "param_groups")}
        save_checkpoint(folder, model, optimizer, step, meta_out)

    probe(start)
    bar = tqdm(total=end, initial=start, desc=f"pretrain {variant}", unit="step", file=sys.stderr, disable=not progress)
    clock = time.perf_counter()
    for step in range(start, end):
        lr = lr_at(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = corpus.batch(config.seed, step, config.batch_size, config.seq_len)  # (B, L)
        loss = lm_loss(model, batch, sink)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        done = step + 1
        meta["log"].append({"step": done, "loss": float(loss.detach()), "lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        probe(done)
        if done % config.save_every == 0 or done == end:
            meta["train_seconds"] = meta.get("train_seconds", 0.0) + time.perf_counter() - clock
            clock = time.perf_counter()
            checkpoint(done)
    bar.close()
    if start == end and not folder.exists():
        checkpoint(end)
    meta["step"] = end
    if end == config.steps:
        export = run / variant / "model"
        model.save_pretrained(export)
        tokenizer.save_pretrained(export)
    return meta


def prepare(run: Path, config: StudyConfig, resume: bool) -> tuple[StudyConfig, TokenizedCorpus, Any]:
    """Load or create the run folder's config and tokenizer; tokenize the data."""
    run.mkdir(parents=True, exist_ok=True)
    config_path = run / "study.json"
    if config_path.exists():
        saved = StudyConfig.model_validate_json(config_path.read_text())
        if not resume:
            raise FileExistsError(f"{run} already holds a study (study.json); pass --resume or pick a new --out")
        # Only what training never reads may change on resume: the step budget (raised) and the evaluation.
        free = {k: getattr(config, k) for k in StudyConfig.model_fields if k == "steps" or k.startswith("eval_")}
        if saved.model_copy(update=free) != config:
            raise ValueError(f"{config_path} was made with other settings than asked for now; resume with the same "
                             "preset (only --steps and the --eval-* options may change)")
        if config.steps < saved.steps:
            raise ValueError(f"--steps {config.steps} is below the saved study's {saved.steps}")
    config_path.write_text(config.model_dump_json(indent=1))
    sources = load_sources(config.holdout, config.max_chars)
    tok_dir = run / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tokenizer = load_tokenizer(tok_dir)
    else:
        tokenizer = train_tokenizer([s.train_text for s in sources], config.vocab_size)
        save_tokenizer(tokenizer, tok_dir)
    corpus = TokenizedCorpus(sources, tokenizer)
    (run / "data.json").write_text(json.dumps(corpus.stats(), indent=1))
    return config, corpus, tokenizer


def evaluate(run: Path, config: StudyConfig, corpus: TokenizedCorpus, tokenizer, variants,
             progress: bool = True) -> dict[str, Any]:
    """Streaming perplexity through SinkCache and final attention shares for every trained variant."""
    from transformers import AutoModelForCausalLM

    from model.loader import wrap_model

    streams = {kind: corpus.heldout_stream(kind, config.eval_tokens) for kind in config.eval_kinds}
    samples = corpus.heldout_samples(config.probe_samples, config.seq_len)
    results: dict[str, Any] = {"config": config.model_dump(), "data": corpus.stats(), "streaming": {},
                               "attention": {}, "training": {}, "budget": {}}
    total = len(variants) * len(streams) * (len(config.eval_sinks) + 1)
    bar = tqdm(total=total, desc="pretrain eval", unit="run", file=sys.stderr, disable=not progress)
    for variant in variants:
        meta = json.loads((run / variant / "checkpoint" / "trainer.json").read_text())
        if meta["step"] != config.steps:
            raise RuntimeError(
                f"{variant} stopped at step {meta['step']} of {config.steps}; resume it before evaluating"
            )
        sink = sink_id(tokenizer) if variant == "sink" else None
        model = AutoModelForCausalLM.from_pretrained(run / variant / "model", dtype=torch.float32)
        results["attention"][variant] = study.attention_share(model, samples, sink)
        lm = wrap_model(model, tokenizer)  # sinkstream attention on the in-memory model (architecture: llama)
        results["streaming"][variant] = study.streaming_table(
            lm, streams, config.eval_sinks, config.eval_cache, config.eval_chunk, sink, progress=bar.update)
        results["training"][variant] = sorted(meta["probes"], key=lambda p: p["step"])
        losses = [entry["loss"] for entry in meta["log"]]
        results["budget"][variant] = {
            "steps": meta["step"], "train_seconds": meta.get("train_seconds"),
            "tokens_seen": meta["step"] * config.batch_size * config.seq_len,
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
    bar.close()
    return results


def run_study(run: Path, config: StudyConfig, resume: bool = False, stop_after: int | None = None,
              variants=VARIANTS, progress: bool = True) -> dict[str, Any] | None:
    """Train both variants (same data, same budget, same initial weights) and evaluate them.

    Returns the results (also written to `<run>/results.json`, `table.md` and the PNGs), or None when
    `stop_after` interrupted training before the last step.
    """
    config, corpus, tokenizer = prepare(run, config, resume)
    finished = True
    for variant in variants:
        meta = train_variant(run, variant, config, corpus, tokenizer, resume, stop_after, progress)
        finished &= meta["step"] == config.steps
    if not finished:
        return None
    results = evaluate(run, config, corpus, tokenizer, variants, progress)
    (run / "results.json").write_text(json.dumps(results, indent=1))
    (run / "table.md").write_text(study.markdown_table(results) + "\n\n" + study.attention_table(results) + "\n")
    study.plot_attention(results, run / "sink_token_attention.png")
    study.plot_training(results, run / "sink_token_training.png")
    study.plot_perplexity(results, run / "sink_token_perplexity.png")
    study.plot_heads(results, run / "sink_token_heads.png")
    return results
