"""Checkpoint layouts: key mappings, family detection, lazy reads and the errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import save_file

import streamdec
from streamdec import checkpoints as ckpt
from streamdec.checkpoints import CheckpointError
from streamdec.families import detect
from streamdec.families.wan import WanConfig, WanDecoder, diffusers_to_official, official_to_diffusers

from helpers.wan import official_state_dict

KEYS_FILE = Path(__file__).parent / "data" / "wan21_keys.txt"  # the released Wan2.1_VAE.pth


def released_official_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in KEYS_FILE.read_text().splitlines():
        name, shape = line.split("\t")
        shapes[name] = tuple(int(s) for s in shape.strip("[]").split(","))
    return shapes


def test_official_layout_is_what_diffusers_converts(wan_model):
    """Our official-layout fixture, converted by diffusers' own single-file converter, gives back
    exactly the diffusers state dict: the official names we write are the real ones."""
    converted = convert_wan_vae_to_diffusers(official_state_dict(wan_model))
    state = wan_model.state_dict()
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)


def test_key_mappings_round_trip(wan_model):
    diffusers_keys = [k for k in wan_model.state_dict() if k.startswith(("decoder.", "post_quant_conv."))]
    to_official = diffusers_to_official(diffusers_keys)
    back = official_to_diffusers(to_official.values())
    assert {back[to_official[k]] for k in diffusers_keys} == set(diffusers_keys)
    assert all(back[to_official[k]] == k for k in diffusers_keys)


def test_released_checkpoint_keys_map_onto_the_decoder():
    """All 108 decoder-side tensors of the released 194-tensor Wan2.1_VAE.pth, shapes included."""
    official = released_official_shapes()
    assert len(official) == 194
    renames = official_to_diffusers(official)
    assert len(renames) == 108
    with torch.device("meta"):
        decoder = WanDecoder(WanConfig())
    expected = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert {new: official[old] for old, new in renames.items()} == expected
    assert diffusers_to_official(expected.keys()) == {v: k for k, v in renames.items()}
    assert sum(v.numel() for v in decoder.state_dict().values()) == pytest.approx(73.3e6, rel=0.01)


def test_config_read_off_released_shapes():
    official = released_official_shapes()
    family, layout = detect(official)
    assert (family.name, layout) == ("wan2.1", "official")
    shapes = {new: official[old] for old, new in official_to_diffusers(official).items()}
    assert family.config(shapes, None) == WanConfig()


def test_detection(wan_model):
    family, layout = detect(wan_model.state_dict())
    assert (family.name, layout) == ("wan2.1", "diffusers")
    family, layout = detect(official_state_dict(wan_model))
    assert (family.name, layout) == ("wan2.1", "official")


def test_encoder_tensors_are_not_read(checkpoints, monkeypatch):
    read = []
    real_open = ckpt.open_checkpoint

    def spying_open(src):
        source = real_open(src)
        get = source.get
        source.get = lambda key: (read.append(key), get(key))[1]
        return source

    monkeypatch.setattr(ckpt, "open_checkpoint", spying_open)
    streamdec.load_vae(checkpoints["official-safetensors"], device="cpu")
    assert read and not [k for k in read if k.startswith(("encoder.", "conv1."))]


# ---------------------------------------------------------------------------- bad checkpoints


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def save_official(tmp_path, state, name="vae.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_missing_tensors(wan_model, tmp_path):
    state = official_state_dict(wan_model)
    del state["decoder.head.2.weight"], state["decoder.middle.1.proj.bias"]
    with pytest.raises(CheckpointError) as err:
        streamdec.load_vae(save_official(tmp_path, state), device="cpu")
    text = one_line(err)
    assert "lacks 2 decoder tensors" in text and "decoder.head.2.weight" in text and "decoder.middle.1.proj.bias" in text


def test_unexpected_tensors(wan_model, tmp_path):
    state = official_state_dict(wan_model)
    state["decoder.middle.1.extra.weight"] = torch.zeros(3)
    state["decoder.upsamples.0.residual.9.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        streamdec.load_vae(save_official(tmp_path, state), device="cpu")
    text = one_line(err)
    assert "2 tensors no such decoder has" in text and "decoder.middle.1.extra.weight" in text


def test_misshaped_tensors(wan_model, tmp_path):
    state = official_state_dict(wan_model)
    state["decoder.middle.1.to_qkv.weight"] = torch.zeros(5, 32, 1, 1)
    with pytest.raises(CheckpointError) as err:
        streamdec.load_vae(save_official(tmp_path, state), device="cpu")
    text = one_line(err)
    assert "wrong shape" in text and "decoder.middle.1.to_qkv.weight is [5, 32, 1, 1], expected [96, 32, 1, 1]" in text


def test_missing_in_diffusers_layout_named_as_diffusers(wan_model, tmp_path):
    state = {k: v for k, v in wan_model.state_dict().items() if k != "decoder.conv_out.bias"}
    save_file(state, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"diffusers layout\) lacks 1 decoder tensors: decoder\.conv_out\.bias"):
        streamdec.load_vae(tmp_path / "vae.safetensors", device="cpu")


def test_not_a_vae(tmp_path):
    path = save_official(tmp_path, {"model.layers.0.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError) as err:
        streamdec.load_vae(path, device="cpu")
    assert "not a VAE checkpoint streamdec knows" in one_line(err) and "Wan 2.1 VAE" in str(err.value)


def test_missing_up_path_tensor_named_by_its_official_number(wan_model, tmp_path):
    """The official numbering is flat over the up path, so the name is found from all the layers."""
    state = official_state_dict(wan_model)
    del state["decoder.upsamples.9.residual.6.weight"]
    with pytest.raises(CheckpointError, match=r"lacks 1 decoder tensors: decoder\.upsamples\.9\.residual\.6\.weight$"):
        streamdec.load_vae(save_official(tmp_path, state), device="cpu")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_files(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError) as err:
        streamdec.load_vae(path, device="cpu")
    assert "cannot read" in one_line(err) and str(path) in str(err.value)


def test_pickled_objects_are_refused(tmp_path):
    path = save_official(tmp_path, {"weights": torch.zeros(2), "path": Path("x")})
    with pytest.raises(CheckpointError) as err:
        streamdec.load_vae(path, device="cpu")
    assert "not loaded for safety" in one_line(err)


def test_not_a_state_dict(tmp_path):
    path = save_official(tmp_path, [torch.zeros(2)])
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        streamdec.load_vae(path, device="cpu")


def test_missing_path_and_bad_folders(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        streamdec.load_vae(tmp_path / "nope.pth", device="cpu")
    with pytest.raises(CheckpointError, match="without config.json"):
        streamdec.load_vae(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors"):
        streamdec.load_vae(tmp_path, device="cpu")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        streamdec.load_vae(tmp_path / "notes.txt", device="cpu")


def test_bad_arguments(checkpoints):
    with pytest.raises(ValueError, match="unsupported dtype"):
        streamdec.load_vae(checkpoints["official-pth"], device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="unknown device"):
        streamdec.load_vae(checkpoints["official-pth"], device="gpu0")
    with pytest.raises(CheckpointError, match="cannot load a VAE from a int"):
        streamdec.load_vae(3, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="this machine has no CUDA GPU"):
            streamdec.load_vae(checkpoints["official-pth"], device="cuda")
