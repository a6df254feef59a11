"""Decode random-weight Open-Sora-Plan VAEs with the official code; the tests compare with the result.

Run once with checkouts of the reference repositories (not needed by the tests):

    python tests/data/osp/make_reference.py WF-VAE/ Open-Sora-Plan/

It was run with PKU-YuanGroup/WF-VAE @ d858bee and PKU-YuanGroup/Open-Sora-Plan @ f7fa604, torch
2.13 (CPU, fp32), einops and diffusers installed. For each model it writes `<name>_keys.txt` (the
official state dict's names and shapes) and `<name>.pt`: the config, the latents, the fixed
wavelet kernels, and the official decode of them. Of the video it keeps the means over rows and
over columns of every frame and every 4th pixel both ways, so a difference anywhere shows.
"""

import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for helpers
from helpers.osp_weights import is_constant, seeded_weights  # noqa: E402

WFVAE = dict(latent_dim=4, base_channels=8, encoder_num_resblocks=1, encoder_energy_flow_hidden_size=8,
             decoder_num_resblocks=2, decoder_energy_flow_hidden_size=8, attention_type="AttnBlock3DFix",
             use_attention=True, norm_type="layernorm", t_interpolation="trilinear", connect_res_layer_num=1,
             scale=[0.18215] * 4, shift=[0.0] * 4)  # fmt: skip
CAUSALVAE_V12 = dict(hidden_size=32, z_channels=4, embed_dim=4, hidden_size_mult=[1, 1, 1, 1], num_res_blocks=1,
                     encoder_attention="AttnBlock3DFix", decoder_attention="AttnBlock3DFix",
                     decoder_spatial_upsample=["", "SpatialUpsample2x", "Spatial2xTime2x3DUpsample",
                                               "Spatial2xTime2x3DUpsample"],
                     decoder_temporal_upsample=["", "", "", ""])  # fmt: skip
CAUSALVAE_V11 = dict(CAUSALVAE_V12, decoder_spatial_upsample=["", "SpatialUpsample2x", "SpatialUpsample2x",
                                                              "SpatialUpsample2x"],
                     decoder_temporal_upsample=["", "", "TimeUpsampleRes2x", "TimeUpsampleRes2x"])  # fmt: skip


def package(name: str, path: Path) -> None:
    """Make `name` importable from `path` without running its __init__ (which needs torchvision)."""
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module


def summary(video: torch.Tensor) -> dict:
    return {"shape": tuple(video.shape), "row_means": video.mean(dim=4), "column_means": video.mean(dim=3),
            "pixels": video[..., ::4, ::4].clone()}  # fmt: skip


def prepare(model, seed: int, name: str) -> dict:
    state = model.state_dict()
    (HERE / f"{name}_keys.txt").write_text(
        "".join(f"{k} {','.join(map(str, v.shape))}\n" for k, v in state.items())
    )
    weights = seeded_weights({k: tuple(v.shape) for k, v in state.items()}, seed)
    constants = {k: v.clone() for k, v in state.items() if is_constant(k)}
    model.load_state_dict({**weights, **constants}, strict=True)
    return constants


@torch.no_grad()
def main(wf_repo: Path, osp_repo: Path) -> None:
    torch.manual_seed(0)
    sys.path.insert(0, str(wf_repo))
    from causalvideovae.model.vae.modeling_wfvae import WFVAEModel

    model = WFVAEModel(**WFVAE).eval()
    constants = prepare(model, 1, "wfvae")
    z = torch.randn(1, 4, 6, 5, 6)
    video = model.decode(z / torch.tensor(WFVAE["scale"]).view(1, -1, 1, 1, 1)).sample  # one shot
    torch.save({"config": WFVAE, "latents": z, "constants": constants, **summary(video)}, HERE / "wfvae.pt")

    for name in ("opensora", "opensora.models", "opensora.models.causalvideovae"):
        package(name, osp_repo.joinpath(*name.split(".")))
    from opensora.models.causalvideovae.model.vae.modeling_causalvae import CausalVAEModel

    for name, config, seed in (("causalvae_v12", CAUSALVAE_V12, 2), ("causalvae_v11", CAUSALVAE_V11, 3)):
        model = CausalVAEModel(**config).eval()
        prepare(model, seed, name)
        z = torch.randn(1, 4, 11, 10, 9)
        # The tiled decode at a small tile (8 latent pixels), so it tiles these small frames. Its
        # blend and crop read `tile_sample_min_size`, which __init__ sets to the encoder's 512000 (no
        # blending limit, no crop: frames come out too large); the decoder's own tile size in pixels
        # is what they are meant to read, and what they read in v1.2.0.
        model.enable_tiling()
        model.tile_latent_min_size = 8
        model.tile_sample_min_size = 64
        video = model.decode(z / 0.18215)
        tiling = {"tile": 8, "overlap": model.tile_overlap_factor}
        torch.save({"config": config, "latents": z, "tiling": tiling, **summary(video)}, HERE / f"{name}.pt")
    for name in ("wfvae", "causalvae_v12", "causalvae_v11"):
        print(name, torch.load(HERE / f"{name}.pt")["shape"])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
