"""The "Stream decode to video" node.

ComfyUI's VAEDecode turns a whole video's latents into one IMAGE batch (every frame, in float32,
at once) before any save node sees it; long or large videos run out of memory there. This node
takes the LATENT and the VAE, reads the decoder's weights from the VAE object it is given
(`first_stage_model`, ComfyUI's key layout), and streams the frames into a video file in ComfyUI's
output folder with streamdec: memory flat in the video's length. It returns the file's path and a
one-frame preview (the file's first frame), never the full IMAGE batch.
"""

from __future__ import annotations

import os
import weakref

import numpy as np
import torch

LOSSLESS = ("ffv1", "libx264rgb")
_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ComfyUI decoder module -> streamdec VAE


class StreamDecodeToVideo:
    CATEGORY = "latent/video"
    FUNCTION = "decode"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("filename", "preview")
    DESCRIPTION = "Decodes a video latent frame by frame straight into a video file (streamdec): flat memory."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT",),
                "vae": ("VAE",),
                "filename_prefix": ("STRING", {"default": "streamdec/video"}),
                "fps": ("FLOAT", {"default": 16.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
                "container": (["mp4", "mkv", "webm"],),
                "codec": (["libx264", "libx265", "libsvtav1", "ffv1", "libx264rgb"],),
                "crf": ("INT", {"default": 18, "min": 0, "max": 63, "tooltip": "quality of lossy codecs; lower is better"}),
            },
            "optional": {
                "max_vram_gib": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4096.0, "step": 0.5,
                                           "tooltip": "device memory the decode may use; 0: no limit"}),  # fmt: skip
            },
        }

    def decode(self, samples, vae, filename_prefix, fps, container, codec, crf, max_vram_gib=0.0):
        import folder_paths  # ComfyUI's

        import streamdec

        latents = samples["samples"]  # (videos, C, T, h, w), already in the VAE's own space: ComfyUI
        if latents.dim() == 4:  # de-normalizes latents when sampling ends, before any VAE sees them
            latents = latents[None]
        decoder = _streamdec_vae(vae, max_vram_gib or None)
        ratio = decoder.spatial_ratio
        height, width = latents.shape[-2] * ratio, latents.shape[-1] * ratio
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), width, height
        )
        files = []
        for video in latents:
            path = os.path.join(folder, f"{name}_{counter:05}_.{container}")
            streamdec.decode_to_file(decoder, video, path, fps=fps, codec=codec, crf=None if codec in LOSSLESS else crf,
                                     normalized=False, progress=False)  # fmt: skip
            files.append({"filename": os.path.basename(path), "subfolder": subfolder, "type": "output"})
            counter += 1
        preview = _first_frame(os.path.join(folder, files[0]["filename"]))
        return {"ui": {"images": files, "animated": (True,)}, "result": (os.path.join(folder, files[0]["filename"]), preview)}


def _streamdec_vae(vae, max_vram):
    """streamdec's decoder for ComfyUI's VAE object, its weights read from `first_stage_model`, on
    its device and in its dtype; loaded once per model and budget."""
    import streamdec

    model = vae.first_stage_model
    loaded = _LOADED.setdefault(model, {})
    if max_vram not in loaded:
        device = getattr(vae, "device", None) or next(model.parameters()).device
        dtype = getattr(vae, "vae_dtype", None) or next(model.parameters()).dtype
        loaded[max_vram] = streamdec.load_vae(model, device=device, dtype=dtype, max_vram=max_vram)
    return loaded[max_vram]


def _first_frame(path: str) -> torch.Tensor:
    """The file's first frame as a ComfyUI IMAGE: (1, H, W, 3) float in [0, 1]."""
    import av

    with av.open(path) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    return torch.from_numpy(frame.astype(np.float32) / 255.0)[None]


NODE_CLASS_MAPPINGS = {"StreamDecodeToVideo": StreamDecodeToVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"StreamDecodeToVideo": "Stream decode to video"}
