"""Open-Sora-Plan VAEs for the tests: the weights the official code decoded (tests/data/osp), written in
the layouts the models were released in."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from .osp_weights import DATA, read_keys, seeded_weights

SEEDS = {"wfvae": 1, "causalvae_v12": 2, "causalvae_v11": 3}


def reference(name: str) -> dict:
    return torch.load(DATA / f"{name}.pt", weights_only=True)


def official_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The whole model's tensors (encoder and fixed wavelet kernels too), as the official code has them."""
    ref = reference(name)
    return {**seeded_weights(read_keys(name), SEEDS[name]), **ref.get("constants", {})}


def config_json(name: str) -> dict:
    cls = "WFVAEModel" if name == "wfvae" else "CausalVAEModel"
    return {"_class_name": cls, **reference(name)["config"]}


def save_layouts(name: str, root) -> dict:
    """The layouts the models were released in: a folder with config.json and diffusers
    safetensors (WF-VAE on the hub), a folder with config.json and a training .ckpt holding an EMA
    copy under "module." (Open-Sora-Plan's loader takes the EMA), and bare weight files."""
    state = official_state_dict(name)
    paths = {}
    folder = root / f"{name}_folder"
    folder.mkdir()
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(config_json(name)))
    paths["folder"] = folder
    ckpt_folder = root / f"{name}_ckpt_folder"
    ckpt_folder.mkdir()
    ema = {f"module.{k}": v for k, v in state.items()}
    stale = {k: torch.zeros_like(v) for k, v in state.items()}  # the non-EMA weights, to be passed over
    torch.save({"ema_state_dict": ema, "state_dict": {"gen_model": stale}}, ckpt_folder / "model.ckpt")
    (ckpt_folder / "config.json").write_text(json.dumps(config_json(name)))
    paths["ckpt_folder"] = ckpt_folder
    torch.save({"state_dict": {"gen_model": state}}, root / f"{name}.ckpt")
    paths["ckpt"] = root / f"{name}.ckpt"
    save_file(state, root / f"{name}.safetensors")
    paths["safetensors"] = root / f"{name}.safetensors"
    return paths
