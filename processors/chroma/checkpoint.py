"""Loading and saving Chroma checkpoints in the released layout.

`load_model("tiny")` builds the seeded miniature; `load_model(folder)` reads config.json
and one or sharded safetensors; `load_model("org/name")` downloads from the Hugging Face
hub first. Every tensor is checked by name and shape before anything is copied.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.initialization import no_init_weights

from .config import ChromaConfig, ConfigError, preset_config, tiny_config
from .engine import ChromaEngine
from .modeling import ChromaModel
from .text import tokenizer_for

TINY_SEED = 1234

# File name -> in-memory name. Current transformers nests the thinker's text model
# and Mimi's SEANet stacks one level deeper than the released files do.
_FILE_TO_MEMORY = [
    (r"^thinker\.audio_tower\.", "thinker.model.audio_tower."),
    (r"^thinker\.visual\.", "thinker.model.visual."),
    (r"^thinker\.model\.(?!language_model\.|audio_tower\.|visual\.)", "thinker.model.language_model."),
    (r"^codec_model\.encoder\.layers\.", "codec_model.encoder.encoder_seanet.layers."),
    (r"^codec_model\.encoder_transformer\.", "codec_model.encoder.encoder_transformer."),
    (r"^codec_model\.downsample\.", "codec_model.encoder.downsample."),
    (r"^codec_model\.upsample\.", "codec_model.decoder.upsample."),
    (r"^codec_model\.decoder_transformer\.", "codec_model.decoder.decoder_transformer."),
    (r"^codec_model\.decoder\.layers\.", "codec_model.decoder.decoder_seanet.layers."),
]
_MEMORY_TO_FILE = [
    (r"^thinker\.model\.audio_tower\.", "thinker.audio_tower."),
    (r"^thinker\.model\.visual\.", "thinker.visual."),
    (r"^thinker\.model\.language_model\.", "thinker.model."),
    (r"^codec_model\.encoder\.encoder_seanet\.layers\.", "codec_model.encoder.layers."),
    (r"^codec_model\.encoder\.encoder_transformer\.", "codec_model.encoder_transformer."),
    (r"^codec_model\.encoder\.downsample\.", "codec_model.downsample."),
    (r"^codec_model\.decoder\.upsample\.", "codec_model.upsample."),
    (r"^codec_model\.decoder\.decoder_transformer\.", "codec_model.decoder_transformer."),
    (r"^codec_model\.decoder\.decoder_seanet\.layers\.", "codec_model.decoder.layers."),
]

# Tied tensors (file name -> the file name it mirrors); the released files omit them.
TIED = {
    "thinker.lm_head.weight": "thinker.model.embed_tokens.weight",
    "backbone.audio_embedding.embed_audio_tokens.weight": "decoder.audio_embedding.embed_audio_tokens.weight",
}


def _rename(name: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def file_name(memory_name: str) -> str:
    return _rename(memory_name, _MEMORY_TO_FILE)


def memory_name(file_name_: str) -> str:
    return _rename(file_name_, _FILE_TO_MEMORY)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: lists every offending tensor."""


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _expected_tensors(model: ChromaModel) -> dict[str, torch.Tensor]:
    """File name -> tensor, for every persistent parameter and buffer, ties removed."""
    out = {}
    for name, tensor in model.state_dict().items():
        fname = file_name(name)
        if fname not in TIED:
            out[fname] = tensor
    return out


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _construct(config: ChromaConfig, device: torch.device, dtype: torch.dtype) -> ChromaModel:
    """Allocate the model on its device in its dtype without initialising weights (they are
    overwritten next). Building under the default dtype, as transformers does, keeps the
    rotary tables in float32 while parameters and codec buffers take `dtype`."""
    with no_init_weights(), torch.device(device), _default_dtype(dtype):
        model = ChromaEngine(config)
    return model.requires_grad_(False)  # inference only: no autograd bookkeeping anywhere


def build_tiny(
    seed: int = TINY_SEED, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> ChromaModel:
    """The seeded random miniature. It produces noise, not speech."""
    model = _construct(tiny_config(), torch.device(device), dtype)
    with torch.no_grad():
        _randomise(model, seed)
    model.source = "tiny"
    model.tokenizer = tokenizer_for(model.config, None)
    return model.eval()


def build_random_4b(seed: int = TINY_SEED, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The released model's dimensions with random weights: real compute, noise out (for timing)."""
    device = torch.device(device)
    model = _construct(preset_config("random-4b"), device, dtype)
    with torch.no_grad():
        _randomise(model, seed, on_device=True)
    model.source = "random-4b"
    model.tokenizer = tokenizer_for(model.config, None)
    return model.eval()


def _randomise(model: ChromaModel, seed: int, on_device: bool = False) -> None:
    """Give every tensor a non-trivial value so tests notice a wrong wire (the transformers
    inits leave layer scales near zero and the codec's codebooks empty). `on_device` draws on the
    model's device (fast for billions of values; the tiny preset draws on the CPU, the same everywhere)."""
    device = model.device if on_device else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda shape: torch.randn(shape, generator=gen, device=device)  # noqa: E731
    rand = lambda shape: torch.rand(shape, generator=gen, device=device)  # noqa: E731
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or name.endswith("codebook.initialized"):
            tensor.fill_(1)
            continue
        if name.endswith("cluster_usage"):
            tensor.copy_(rand(tensor.shape) + 0.5)
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight") or "layer_norm" in name:
            tensor.copy_(1.0 + 0.1 * randn(tensor.shape))
        elif name.endswith("layer_scale.scale"):
            tensor.copy_(0.3 + 0.1 * rand(tensor.shape))
        else:
            fan_in = tensor.shape[-1] if tensor.dim() > 1 else 16
            if tensor.dim() == 3 and "codebook_head" not in name:  # conv [out, in, k]
                fan_in = tensor.shape[1] * tensor.shape[2]
            if "codebook_head" in name:
                fan_in = tensor.shape[1]
            tensor.copy_(randn(tensor.shape) / max(fan_in, 1) ** 0.5)
    model.tie_weights()


def save_model(model: ChromaModel, folder: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write config.json and safetensors in the released layout (tied tensors omitted)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    tensors = {k: v.detach().contiguous().cpu() for k, v in _expected_tensors(model).items()}
    if max_shard_bytes is None:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shard files that are not there: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files (expected model.safetensors or shards)")
    return files


def _resolve(source: str) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint folder (config.json + safetensors), got a file")
        return path
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return _download(source)
    raise CheckpointError(f"{source}: no such folder, and not a Hugging Face id of the form 'org/name'")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    logger.info(f"Downloading {repo_id} from the Hugging Face hub (cached after the first time)")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))
    except Exception as exc:
        raise CheckpointError(f"{repo_id}: could not download from the Hugging Face hub: {exc}") from exc


def load_model(
    source: str | Path = "tiny", device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> ChromaModel:
    """Load a Chroma model from a preset ("tiny", "random-4b"), a checkpoint folder or a Hugging Face id.

    Defaults: CUDA with bf16 when CUDA is present, else CPU float32."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if str(source) == "tiny":
        return build_tiny(device=device, dtype=dtype)
    if str(source) == "random-4b":
        return build_random_4b(device=device, dtype=dtype)
    folder = _resolve(str(source))
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: not a Chroma checkpoint (no config.json)")
    try:
        config = ChromaConfig.from_file(folder / "config.json")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    started = time.perf_counter()
    model = _construct(config, device, dtype)
    expected = _expected_tensors(model)
    files = _weight_files(folder)
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                found[name] = (f, tuple(handle.get_slice(name).get_shape()))
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - set(TIED))
    misshaped = sorted(
        f"{name}: file {list(shape)}, model {list(expected[name].shape)}"
        for name, (_, shape) in found.items()
        if name in expected and tuple(expected[name].shape) != shape
    )
    misshaped += sorted(
        f"{name}: file {list(found[name][1])}, model {list(expected[target].shape)}"
        for name, target in TIED.items()
        if name in found and target in expected and tuple(expected[target].shape) != found[name][1]
    )
    if missing or unexpected or misshaped:
        parts = [f"{folder}: checkpoint does not fit the Chroma model described by its config.json"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + "; ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(parts))

    memory = model.state_dict()
    total = len(expected)
    done = 0
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                if name in TIED:
                    continue  # the tie below makes it the same tensor as its target
                target = memory[memory_name(name)]
                with torch.no_grad():
                    target.copy_(handle.get_tensor(name).to(target.dtype))
                done += 1
        logger.info(f"Loaded {f.name}: {done}/{total} tensors")
    model.tie_weights()
    model.eval()
    model.source = str(source)
    model.tokenizer = tokenizer_for(config, folder)
    logger.info(f"Chroma model from {source} ready on {device} ({dtype}) in {time.perf_counter() - started:.1f} s")
    return model
