"""Resumable training checkpoints in safetensors: model weights, AdamW state and the step, no pickle.

Layout of `<variant>/checkpoint/`:
- `model.safetensors`: the model's state (tied embeddings stored once, `safetensors.torch.save_model`);
- `optimizer.safetensors`: AdamW's per-parameter tensors as `state.<param index>.<name>`;
- `trainer.json`: step, the optimiser's param groups (hyper-parameters) and the training log so far.
A checkpoint is written into a temporary folder and renamed into place, so a kill mid-save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

FORMAT = "sinkstream-train-checkpoint/1"


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    extra: dict[str, Any]) -> None:
    """Atomically replace `folder` with a checkpoint of `model`, `optimizer` and `step`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        state = optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        for index, entry in state["state"].items():
            for name, value in entry.items():
                value = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta = {"format": FORMAT, "step": step, "param_groups": state["param_groups"], **extra}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load weights and optimiser state from `folder` into `model`/`optimizer`; return trainer.json's content."""
    meta_path = folder / "trainer.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"expected a training checkpoint in {folder} (trainer.json), found none")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"expected checkpoint format {FORMAT!r} in {meta_path}, got {meta.get('format')!r}")
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=True)
    if missing or unexpected:  # strict=True raises first; this guards a future non-strict call
        raise ValueError(f"checkpoint {folder} does not match the model: missing {missing}, unexpected {unexpected}")
    flat = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta
