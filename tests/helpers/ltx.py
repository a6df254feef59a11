"""LTX-2 and LTX-Video VAEs for the tests: diffusers' AutoencoderKLLTX2Video / AutoencoderKLLTXVideo (the
references) with small random weights, and their weights under the official names (ltx-core, LTX-Video,
ComfyUI: the decoder's blocks in one flat list under `vae.`), written out from diffusers' conversion
scripts (scripts/convert_ltx2_to_diffusers.py, convert_ltx_to_diffusers.py) in the other direction."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLLTX2Video, AutoencoderKLLTXVideo

# widths halve block by block, as diffusers' channel arithmetic needs; small layer counts
LTX2_SMALL = dict(latent_channels=8, block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                  decoder_block_out_channels=(8, 16, 32), decoder_layers_per_block=(1, 1, 1, 2),
                  decoder_causal=False, spatial_compression_ratio=32, temporal_compression_ratio=8)  # fmt: skip
LTX2_RELEASED_COUNTS = dict(LTX2_SMALL, decoder_layers_per_block=(5, 5, 5, 5))
# LTX-Video 0.9.5-0.9.8: LTX-2's shape, zero padding, timestep conditioning
LTXV095_SMALL = dict(latent_channels=8, block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                     decoder_block_out_channels=(8, 16, 32), decoder_layers_per_block=(1, 1, 1, 2),
                     decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(False,) * 4,
                     upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=True)  # fmt: skip
LTXV091_SMALL = dict(LTXV095_SMALL, decoder_inject_noise=(True, True, True, False))
# LTX-Video 0.9.0: width-changing blocks, no residual upsampling, no timestep
LTXV090_SMALL = dict(latent_channels=8, block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                     decoder_block_out_channels=(8, 8, 16, 16), decoder_layers_per_block=(1, 1, 1, 1, 2),
                     decoder_spatio_temporal_scaling=(True, True, True, False))  # fmt: skip


def randomize(model):
    """Random biases, statistics, noise scales and timestep tables (the norms have no gains)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "per_channel_scale" in name or "scale_shift_table" in name:
                p.copy_(0.2 * torch.randn_like(p))
            elif name.endswith("norm3.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
        model.latents_mean.copy_(0.1 * torch.randn_like(model.latents_mean))
        model.latents_std.copy_(1 + 0.3 * torch.rand_like(model.latents_std))
    return model.eval()


def random_ltx2(seed: int = 0, **sizes) -> AutoencoderKLLTX2Video:
    torch.manual_seed(seed)
    return randomize(AutoencoderKLLTX2Video(**{**LTX2_SMALL, **sizes}))


def random_ltx_video(seed: int = 0, base: dict = LTXV095_SMALL, **sizes) -> AutoencoderKLLTXVideo:
    torch.manual_seed(seed)
    return randomize(AutoencoderKLLTXVideo(**{**base, **sizes}))


def official_state_dict(model, prefix: str = "vae.", beside: bool = True) -> dict[str, torch.Tensor]:
    """The VAE's weights as the official and ComfyUI single files hold them: the decoder's blocks in
    one flat list (`up_blocks.N`, `res_blocks`), the statistics as per_channel_statistics, all under
    `prefix`; with `beside`, some transformer (and LTX-2: audio VAE) tensors next to it."""
    ltx2 = isinstance(model, AutoencoderKLLTX2Video)
    flat = {"mid_block.": "up_blocks.0."}
    n = 1
    for i, block in enumerate(model.decoder.up_blocks):
        for part in ("conv_in", "upsamplers.0"):
            if part == "conv_in" and block.conv_in is not None or part != "conv_in" and block.upsamplers is not None:
                flat[f"up_blocks.{i}.{part}."] = f"up_blocks.{n}."
                n += 1
        flat[f"up_blocks.{i}.resnets."] = f"up_blocks.{n}.res_blocks."
        flat[f"up_blocks.{i}.time_embedder."] = f"up_blocks.{n}.time_embedder."
        n += 1
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("decoder."):
            rest = key[len("decoder.") :].replace("mid_block.resnets.", "mid_block.res_blocks.")
            for old, new in sorted(flat.items(), key=lambda kv: -len(kv[0])):
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            for old, new in (
                ("time_embedder.", "last_time_embedder."),
                ("scale_shift_table", "last_scale_shift_table"),
            ):
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
            rest = rest.replace("norm3.", "norm3.norm.").replace("conv_shortcut.conv.", "conv_shortcut.")
            key = "decoder." + rest
        elif key == "latents_mean":
            key = "per_channel_statistics.mean-of-means"
        elif key == "latents_std":
            key = "per_channel_statistics.std-of-means"
        out[prefix + key] = value.clone().contiguous()
    out[prefix + "per_channel_statistics.channel"] = torch.arange(model.config.latent_channels)
    out[prefix + "per_channel_statistics.mean-of-stds"] = torch.ones(model.config.latent_channels)
    if beside:
        out["model.diffusion_model.patchify_proj.weight"] = torch.randn(4, 8)
        if ltx2:
            out["audio_vae.per_channel_statistics.mean-of-means"] = torch.zeros(8)
            out["vocoder.conv_pre.weight"] = torch.randn(4, 4, 3)
    return out


def denormalize(model, z: torch.Tensor) -> torch.Tensor:
    """The pipelines' de-normalization: z * std / scaling_factor + mean."""
    shape = (1, -1, 1, 1, 1)
    return z * model.latents_std.view(shape) / model.config.scaling_factor + model.latents_mean.view(shape)


def reference(model, z: torch.Tensor, timestep: float | None = None, tiling: dict | None = None) -> torch.Tensor:
    """diffusers' decode of normalized latents (1, C, T, h, w) -> (3, F, H, W), clamped as frames are."""
    model.use_tiling = False
    if tiling is not None:
        model.enable_tiling(**tiling)
    temb = None if timestep is None else torch.tensor([timestep])
    with torch.no_grad():
        video = model.decode(denormalize(model, z), temb).sample
    model.use_tiling = False
    return video[0].clamp(-1, 1)
