"""Reading VAE checkpoints and building a loaded VAE from them.

Sources: a torch pickle (.pth/.pt/.bin, read with weights_only=True and memory-mapped), a
.safetensors file, a diffusers model folder (config.json + weights), a diffusers pipeline folder
(its vae/ subfolder) or a live diffusers model object. Tensors are read one by one on demand,
so the encoder half of a full VAE checkpoint is never read where the format allows it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import families
from .errors import StreamdecError, one_line
from .families import LayoutError
from .hub import fetch_vae, is_hub_id
from .layers import compile_norms, prepare_layout
from .offload import MODES, attach
from .vae import VAE, check_max_vram, resolve_device, resolve_dtype

SHOW = 5  # how many offending keys an error message lists

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class CheckpointError(StreamdecError):
    """A checkpoint that cannot be read or does not form a decoder; the message says why."""


class TensorSource:
    """A checkpoint's tensors: names, shapes and dtypes up front, data on demand."""

    def __init__(self, description: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype],
                 get: Callable[[str], torch.Tensor], diffusers_config: dict | None = None):  # fmt: skip
        self.description = description
        self.shapes = shapes
        self.dtypes = dtypes
        self.get = get
        self.diffusers_config = diffusers_config


def open_checkpoint(src) -> TensorSource:
    if isinstance(src, nn.Module):
        return _from_module(src)
    if not isinstance(src, (str, os.PathLike)):
        raise CheckpointError(f"cannot load a VAE from a {type(src).__name__}; give a path or a diffusers model")
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"VAE checkpoint {path} does not exist")
    if path.is_dir():
        return _from_folder(path)
    if path.suffix.lower() == ".safetensors":
        return _from_safetensors([path], str(path))
    if path.suffix.lower() in (".pth", ".pt", ".bin", ".ckpt"):
        return _from_torch_file(path)
    raise CheckpointError(
        f"{path} has an unknown checkpoint type {path.suffix!r}; expected .pth, .pt, .safetensors or a diffusers folder"
    )


def _from_module(module: nn.Module) -> TensorSource:
    state = module.state_dict()
    config = dict(getattr(module, "config", {}) or {})
    return TensorSource(
        f"{type(module).__name__} object",
        {k: tuple(v.shape) for k, v in state.items()},
        {k: v.dtype for k, v in state.items()},
        state.__getitem__,
        config,
    )


def _from_safetensors(files: list[Path], description: str, config: dict | None = None) -> TensorSource:
    from safetensors import safe_open

    shapes, dtypes, where = {}, {}, {}
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt")
            for key in handle.keys():
                view = handle.get_slice(key)
                shapes[key] = tuple(view.get_shape())
                dtypes[key] = _SAFETENSORS_DTYPES.get(view.get_dtype(), torch.float32)
                where[key] = handle
        except Exception as err:
            raise CheckpointError(f"cannot read {file}: not a valid .safetensors file ({one_line(err)})") from None
    return TensorSource(description, shapes, dtypes, lambda key: where[key].get_tensor(key), config)


def _from_torch_file(path: Path) -> TensorSource:
    obj = _unwrap_training_checkpoint(read_torch_file(path, "checkpoint"))
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a dict of tensors)")
    return TensorSource(str(path), {k: tuple(v.shape) for k, v in obj.items()},
                        {k: v.dtype for k, v in obj.items()}, obj.__getitem__)  # fmt: skip


def _unwrap_training_checkpoint(obj):
    """The weights of a checkpoint saved by a training loop, as the references load them: an EMA
    copy first where there is one (Open-Sora-Plan: "ema_state_dict", names under "module."), else
    "state_dict" (Open-Sora-Plan nests the VAE's under "gen_model")."""
    if not isinstance(obj, dict):
        return obj
    ema = obj.get("ema_state_dict")
    if isinstance(ema, dict) and ema:
        return {k.replace("module.", ""): v for k, v in ema.items()}
    weights = obj.get("state_dict")
    if isinstance(weights, dict):
        return weights["gen_model"] if isinstance(weights.get("gen_model"), dict) else weights
    return obj


def _from_folder(path: Path) -> TensorSource:
    if not (path / "config.json").is_file() and (path / "vae").is_dir():
        path = path / "vae"  # a diffusers pipeline folder
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is a folder without config.json; expected a diffusers VAE or pipeline folder")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {config_file}: {one_line(err)}") from None
    ckpts = sorted(path.glob("*.ckpt"))
    if ckpts:  # Open-Sora-Plan's VAE folders: config.json and a training checkpoint, which its loader prefers
        source = _from_torch_file(ckpts[-1])
        source.description, source.diffusers_config = str(path), config
        return source
    single = path / "diffusion_pytorch_model.safetensors"
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        return _from_safetensors([single], str(path), config)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"cannot read {index}: {one_line(err)}") from None
        return _from_safetensors([path / s for s in shards], str(path), config)
    if (path / "model.safetensors").is_file():  # huggingface_hub's PyTorchModelHubMixin (Kandinsky's KVAE-3D)
        return _from_safetensors([path / "model.safetensors"], str(path), config)
    if (path / "diffusion_pytorch_model.bin").is_file():
        source = _from_torch_file(path / "diffusion_pytorch_model.bin")
        source.description, source.diffusers_config = str(path), config
        return source
    raise CheckpointError(
        f"{path} has config.json but no diffusion_pytorch_model.safetensors (or .bin, .ckpt, model.safetensors) beside it"
    )


def read_torch_file(path: Path, what: str):
    """What a torch.save file holds, read safely: tensors and plain containers only (weights_only=True,
    memory-mapped where the file allows). Anything else is one clear CheckpointError: another kind of
    file, or pickled Python objects, which are refused for safety (they could run code when loaded)."""
    kind = _other_file_kind(path)
    if kind is not None:
        raise CheckpointError(f"cannot read {what} {path}: it is {kind}, not a torch file")
    try:
        with warnings.catch_warnings():  # torch warns about odd files; the error below says it once
            warnings.simplefilter("ignore")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):  # old, non-zip checkpoints cannot be memory-mapped
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        if "weights only load failed" in text.lower():  # the safe unpickler met something else
            named = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", text, re.IGNORECASE)
            detail = f"it names {named.group(1)}" if named else "data the safe loader cannot read"
            raise CheckpointError(
                f"{what} {path} is not loaded for safety: it holds pickled Python objects besides tensors ({detail}), "
                "which could run code when loaded; use a .safetensors copy, or save the tensors alone where it was made"
            ) from None
        raise CheckpointError(f"cannot read {what} {path}: not a valid torch file ({one_line(err)})") from None


def _other_file_kind(path: Path) -> str | None:
    """What `path` looks like when it is not a torch.save file (a zip archive, or a pickle)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if not head:
        return "an empty file"
    kinds = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
             b"\x93NUMPY": "a NumPy .npy file", b"\x1f\x8b": "gzip-compressed", b"\x1aE\xdf\xa3": "a Matroska video"}
    for magic, kind in kinds.items():
        if head.startswith(magic):
            return kind
    if head[4:8] == b"ftyp":
        return "an MP4 video"
    if len(head) > 9 and head[8:10] == b'{"':
        return "a .safetensors file (name it .safetensors)"
    if head.lstrip().lower().startswith((b"<!doctype", b"<html")):
        return "an HTML page (a failed download?)"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return None  # unknown: let torch say what it makes of it


def load_vae(src, device=None, dtype=None, offload: str | None = None, max_vram: float | None = None,
             subfolder: str | None = None, revision: str | None = None, compile: bool = False,
             **decode_options) -> VAE:  # fmt: skip
    """Load a VAE decoder from a checkpoint file, a diffusers folder, a diffusers model object or a
    Hugging Face Hub id ("org/name": only the VAE's files are fetched; `subfolder`, `revision` as
    diffusers takes them; see streamdec.hub).

    The family is detected from the tensor names. `device`: "cpu", "cuda", ... (default: CUDA if
    present); `dtype`: fp32 (default), bf16 or fp16; `offload`: "none" (weights on the device),
    "model" (there while a chunk decodes) or "block" (one block at a time, prefetched); see
    streamdec.offload. `max_vram`: GiB of device memory a decode may use at its peak; each video's
    decode then picks its offload mode (unless `offload` names one) and spatial tiling to stay
    under it, or refuses with the smallest budget that would do (see streamdec.memory).
    `compile`: run the norm + SiLU pairs as kernels torch.compile makes (streamdec.layers.compile_norms):
    a few seconds once, then faster, the same output to rounding.
    `decode_options`: options a family declares for its decodes (LTX: `decode_timestep`,
    `decode_noise_scale`, `seed`), the defaults of every decode with this VAE."""
    device, dtype, max_vram = resolve_device(device), resolve_dtype(dtype), check_max_vram(max_vram)
    offload = offload or ("auto" if max_vram is not None else "none")
    if offload == "auto" and max_vram is None:
        raise StreamdecError("offload='auto' lets max_vram choose the mode; give max_vram (GiB) or name a mode")
    if offload not in (*MODES, "auto"):
        raise StreamdecError(f"unknown offload mode {offload!r}; use one of {', '.join(MODES)}, or auto with max_vram")
    if is_hub_id(src):
        src = fetch_vae(src, subfolder, revision)
    elif subfolder and isinstance(src, (str, os.PathLike)):
        src = Path(src) / subfolder
    source = open_checkpoint(src)
    try:
        family, layout = families.detect(source.shapes)
        renames = family.rename_map(source.shapes, layout)
        shapes = {new: source.shapes[old] for old, new in renames.items()}
        config = family.config(shapes, source.diffusers_config)
        config = family.read_constants(config, layout, lambda key: source.get(key) if key in source.shapes else None)
        decode_options = family.check_decode_options(decode_options)
        with torch.device("meta"):
            decoder = family.build(config)
    except LayoutError as err:
        raise CheckpointError(f"{source.description}: {err}") from None
    _check_tensors(source, family, layout, renames, decoder)
    home = device if offload == "none" else torch.device("cpu")  # offloaded weights rest on the host
    weights = {new: source.get(old).to(device=home, dtype=dtype, copy=True) for old, new in renames.items()}
    decoder.load_state_dict(weights, strict=True, assign=True)
    decoder.eval().requires_grad_(False)
    prepare_layout(decoder, device)
    if compile:
        compile_norms(decoder)
    offloader = None
    if offload != "none":  # "auto": each stream's plan picks the mode of its chunks (outside them: none)
        offloader = attach(decoder, decoder.offload_blocks(), device, "none" if offload == "auto" else offload)
    stored = Counter(source.dtypes[old] for old in renames).most_common(1)[0][0]
    return VAE(family, config, decoder, device, dtype, stored, source.description, offloader, max_vram, offload,
               decode_options)


def _check_tensors(source: TensorSource, family, layout: str, renames: dict[str, str], decoder: nn.Module) -> None:
    expected = {name: tuple(t.shape) for name, t in decoder.state_dict().items()}
    by_name = {new: old for old, new in renames.items()}
    where = f"{source.description} ({family.title}, {layout} layout)"
    missing = sorted(set(expected) - set(by_name))
    if missing:
        names = family.source_name_map(layout, expected)
        raise CheckpointError(f"{where} lacks {len(missing)} decoder tensors: {_listing([names[m] for m in missing])}")
    unexpected = sorted(
        [old for old in source.shapes if old not in renames and not family.is_unused_key(old)]
        + [old for old, new in renames.items() if new not in expected]
    )
    if unexpected:
        raise CheckpointError(f"{where} has {len(unexpected)} tensors no such decoder has: {_listing(unexpected)}")
    misshaped = [
        f"{by_name[n]} is {list(source.shapes[by_name[n]])}, expected {list(s)}"
        for n, s in expected.items() if source.shapes[by_name[n]] != s
    ]  # fmt: skip
    if misshaped:
        raise CheckpointError(f"{where} has {len(misshaped)} tensors of the wrong shape: {_listing(misshaped)}")
    not_float = sorted(old for old in renames if not source.dtypes[old].is_floating_point)
    if not_float:
        raise CheckpointError(f"{where} has non-floating-point decoder tensors: {_listing(not_float)}")


def _listing(items: list[str]) -> str:
    more = f" and {len(items) - SHOW} more" if len(items) > SHOW else ""
    return "; ".join(items[:SHOW]) + more

