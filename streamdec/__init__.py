"""streamdec: stream video-diffusion latents through their VAE decoder, frame by frame.

    vae = streamdec.load_vae("Wan2.1_VAE.pth")
    for frame in streamdec.decode_frames(vae, latents):   # numpy uint8 (H, W, 3) RGB
        ...

The names below are imported on first use, so `import streamdec` (and the command line's start,
`--help`, or a Ctrl-C during it) does not wait for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "load_vae": "checkpoints", "CheckpointError": "checkpoints", "StreamdecError": "errors",
    "BudgetError": "memory", "SinkError": "sinks", "StreamDecoder": "stream", "decode_frames": "stream",
    "decode_to_file": "stream", "VAE": "vae",
}  # fmt: skip
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    try:  # a submodule, as `import streamdec; streamdec.offload` worked when everything was imported
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise  # the submodule exists but needs something missing
        raise AttributeError(f"module 'streamdec' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
