"""The ComfyUI node, against objects built the way ComfyUI builds them (ComfyUI itself cannot be
installed here): a VAE wrapper whose `first_stage_model` is a module holding the weights under
ComfyUI's names (the official Wan layout of wan_2.1_vae.safetensors), `{"samples": tensor}` latents
in the VAE's own space, and ComfyUI's `folder_paths` for the output folder."""

from __future__ import annotations

import os
import re
import sys
import types
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch import nn

from helpers.wan import denormalize, official_state_dict, reference_decode

sys.path.insert(0, str(Path(__file__).parents[1] / "comfyui"))
from streamdec_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402


def comfy_module(state: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree with exactly these parameter names, as ComfyUI's WanVAE has after loading."""
    root = nn.Module()
    for key, value in state.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    return root


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """ComfyUI's folder_paths, as it names saved files: PREFIX_00001_.ext in the output folder."""
    output = tmp_path / "output"
    output.mkdir()

    def get_save_image_path(prefix, output_dir, width=0, height=0):
        subfolder, name = os.path.split(os.path.normpath(prefix))
        folder = os.path.join(output_dir, subfolder)
        os.makedirs(folder, exist_ok=True)
        taken = [int(m.group(1)) for f in os.listdir(folder) if (m := re.fullmatch(rf"{re.escape(name)}_(\d+)_\..*", f))]
        return folder, name, max(taken, default=0) + 1, subfolder, prefix

    folder_paths = types.SimpleNamespace(get_output_directory=lambda: str(output), get_save_image_path=get_save_image_path)
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    return output


@pytest.fixture(scope="module")
def comfy_vae(wan_model):
    return types.SimpleNamespace(first_stage_model=comfy_module(official_state_dict(wan_model)),
                                 device=torch.device("cpu"), vae_dtype=torch.float32)  # fmt: skip


def test_the_node_is_registered():
    assert NODE_DISPLAY_NAME_MAPPINGS == {"StreamDecodeToVideo": "Stream decode to video"}
    spec = NODE_CLASS_MAPPINGS["StreamDecodeToVideo"].INPUT_TYPES()["required"]
    assert spec["samples"] == ("LATENT",) and spec["vae"] == ("VAE",)


def test_the_node_streams_a_latent_into_a_video_file(comfy, comfy_vae, wan_model, latents):
    raw = denormalize(wan_model, latents[None])  # ComfyUI's LATENT: the VAE's own latents
    node = NODE_CLASS_MAPPINGS["StreamDecodeToVideo"]()
    out = node.decode({"samples": raw}, comfy_vae, "clips/wan", 16.0, "mkv", "ffv1", 18)
    path = Path(out["result"][0])
    assert path == comfy / "clips" / "wan_00001_.mkv" and out["ui"]["images"][0]["subfolder"] == "clips"
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.int16)
    expected = ((reference_decode(wan_model, raw)[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 3, 0).numpy()
    assert frames.shape == expected.shape == (17, 40, 56, 3) and np.abs(frames - expected).max() <= 1
    preview = out["result"][1]
    assert preview.shape == (1, 40, 56, 3) and torch.allclose(preview[0] * 255, torch.from_numpy(frames[0]).float())
    second = node.decode({"samples": raw[:, :, :2]}, comfy_vae, "clips/wan", 16.0, "mp4", "libx264", 18)
    assert Path(second["result"][0]).name == "wan_00002_.mp4"  # never over an earlier file


def test_a_batch_of_videos_gives_a_file_each(comfy, comfy_vae, wan_model, latents):
    raw = denormalize(wan_model, latents[None]).expand(2, -1, -1, -1, -1)
    out = NODE_CLASS_MAPPINGS["StreamDecodeToVideo"]().decode({"samples": raw}, comfy_vae, "batch", 8.0, "mp4", "libx264", 20)
    assert [f["filename"] for f in out["ui"]["images"]] == ["batch_00001_.mp4", "batch_00002_.mp4"]
