"""Hugging Face Hub ids: resolved through huggingface_hub itself against a real cache on disk (its
layout: refs, snapshots), offline; only the VAE's files are taken; a missing id is one line."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import streamdec
from streamdec.hub import HubError, is_hub_id

from helpers.wan import official_state_dict

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LATENTS = torch.randn(16, 2, 4, 6, generator=torch.Generator().manual_seed(71))


def cached_repo(cache, repo_id: str, files: dict, ref: str = "main", commit: str = COMMIT):
    """A Hub repository in huggingface_hub's cache layout: refs/<ref> names the commit whose snapshot
    holds `files` (name -> bytes or a callable writing the path)."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    for name, content in files.items():
        path = root / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        content(path) if callable(content) else path.write_bytes(content)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory, wan_model):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    garbage = b"not needed: never read"
    cached_repo(cache, "org/wan-diffusers", {
        "model_index.json": b'{"_class_name": "WanPipeline"}',
        "vae/config.json": lambda p: wan_model.save_pretrained(p.parent),
        "transformer/diffusion_pytorch_model.safetensors": garbage,
        "text_encoder/model.safetensors": garbage,
    })  # fmt: skip
    official = {"Wan2.1_VAE.pth": lambda p: torch.save(official_state_dict(wan_model), p),
                "models_t5_umt5-xxl-enc-bf16.pth": garbage, "diffusion_pytorch_model.safetensors": garbage}
    cached_repo(cache, "org/wan-official", official)
    cached_repo(cache, "org/wan-official", {"weights/my_vae.safetensors": lambda p: save_file(
        {k: v.contiguous() for k, v in official_state_dict(wan_model).items()}, p)}, ref="v2", commit="f" * 40)  # fmt: skip
    cached_repo(cache, "org/two-vaes", {"a_vae.pth": garbage, "b_vae.pth": garbage})
    return cache


@pytest.fixture
def offline(cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def expected(checkpoints):
    return list(streamdec.decode_frames(streamdec.load_vae(checkpoints["official-pth"], device="cpu"), LATENTS))


def frames_equal(vae, expected) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(streamdec.decode_frames(vae, LATENTS), expected, strict=True))


@pytest.mark.parametrize("repo, found", [("org/wan-diffusers", "vae"), ("org/wan-official", "Wan2.1_VAE.pth")])
def test_hub_ids_resolve_to_the_vae_only(offline, expected, repo, found):
    vae = streamdec.load_vae(repo, device="cpu")
    assert vae.family == "wan2.1" and vae.source.endswith(found)
    assert frames_equal(vae, expected)


def test_subfolder_and_revision(offline, expected):
    vae = streamdec.load_vae("org/wan-official", device="cpu", subfolder="weights/my_vae.safetensors", revision="v2")
    assert vae.source.endswith("my_vae.safetensors") and frames_equal(vae, expected)


@pytest.mark.parametrize("repo, kwargs, message", [
    ("org/nothing-here", {}, "cannot reach the Hugging Face Hub for org/nothing-here .* not in the local cache"),
    ("org/two-vaes", {}, "holds several VAE files .*choose one with subfolder"),
    ("org/wan-official", {"subfolder": "nope"}, "org/wan-official has no 'nope'"),
])  # fmt: skip
def test_hub_failures_are_one_line(offline, repo, kwargs, message):
    with pytest.raises(HubError, match=message) as err:
        streamdec.load_vae(repo, device="cpu", **kwargs)
    assert "\n" not in str(err.value)


def test_no_network_falls_back_to_the_cache(cache, monkeypatch, expected):
    from huggingface_hub import HfApi, constants

    def unreachable(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(HfApi, "list_repo_files", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the downloads themselves stay offline too
    assert frames_equal(streamdec.load_vae("org/wan-official", device="cpu"), expected)
    with pytest.raises(HubError, match=r"cannot reach the Hugging Face Hub for org/other \(.*Name or service"):
        streamdec.load_vae("org/other", device="cpu")


def test_local_paths_are_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "vae.pth").write_bytes(b"")
    assert not is_hub_id("org/vae.pth") and is_hub_id("Wan-AI/Wan2.1-T2V-14B") and not is_hub_id("a/b/c")


def test_cli_with_a_hub_id_offline(cache, expected, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    np.save(tmp_path / "z.npy", LATENTS.numpy())

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "streamdec", *args], env=env, capture_output=True, timeout=300)

    info = cli("info", "org/wan-diffusers")
    assert info.returncode == 0 and b"wan2.1" in info.stdout, info.stderr
    out = tmp_path / "hub.mkv"
    assert cli("decode", tmp_path / "z.npy", "--vae", "org/wan-official", "-o", out, "--codec", "ffv1",
               "--quiet").returncode == 0  # fmt: skip
    import av

    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert all(np.array_equal(a, b) for a, b in zip(frames, expected, strict=True))
    missing = cli("info", "org/missing")
    err = missing.stderr.decode().strip()
    assert missing.returncode == 1 and len(err.splitlines()) == 1 and "not in the local cache" in err, err
