"""Train the tiny Wan 2.1-architecture VAE meant for `streamdec demo`, on generated video.

    python tools/train_demo_vae.py --out demo_vae   # ~17 minutes on a busy 2-core CPU

STATUS: not yet good enough to ship, so `streamdec demo` still decodes random weights. On a busy
2-core CPU, 450 steps (14 minutes) reach only ~11.6 dB PSNR on the demo clip (blurry colour fields,
unreadable text); the demo needs >= 28 dB. Found so far: a
peak learning rate of 3e-4 or more stalls at the mean colour, 1e-4 learns but slowly; clips of 5
frames generalize poorly to the demo's 17 latent frames (the PSNR falls along the clip). It needs
far more steps (a GPU for minutes, or hours of CPU) and probably longer training clips.

The model is diffusers' AutoencoderKLWan with the released block structure at 1/6 of the width
(base_dim 16 instead of 96, 16 latent channels), so streamdec's real Wan loader and decoder run
it unchanged. The data is demo_scene.Scene (beside this script): 5-frame clips of 64x64 cut at random times and
places, from the demo clip itself (--demo-share, default all: the shipped model is fitted to
the demo) or from variations of its scene (seeds 1 and up: new text, places, speeds, shifted
colours). At the end the demo clip's 65 frames are encoded
into the shipped latents, and the reconstruction PSNR of the shipped (fp16) decoder is measured on
them and on a variation never trained on, and written to training.json beside the weights.

Loss: L1 of the reconstruction, plus a small KL of the normalized posterior (released Wan 2.1
latent statistics) to N(0, 1), so the shipped latents are on the unit scale a diffusion model
gives. The posterior mean is decoded (no sampling noise: the training is short). Seeded: the same
command on the same machine and library versions gives the same weights.

Writes (OUT, default ./demo_vae/):
    wan21_demo_vae.safetensors   decoder + post_quant_conv, official Wan 2.1 names (conv2., decoder.*), fp16
    demo_latents.safetensors     "latents": (16, 17, 24, 32) normalized latents of demo_clip(), fp16
    training.json                settings, wall time, loss curve, PSNR of the shipped decoder on the demo clip
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from demo_scene import CLIP_FRAMES, CLIP_HEIGHT, CLIP_WIDTH, DEMO_SEED, Scene, demo_clip
from safetensors.torch import save_file

from streamdec.families.wan import WAN21_MEAN, WAN21_STD, diffusers_to_official

MEAN = torch.tensor(WAN21_MEAN).view(1, -1, 1, 1, 1)
STD = torch.tensor(WAN21_STD).view(1, -1, 1, 1, 1)
HELD_OUT_SEED = 1_000_003  # a second unseen scene, for the PSNR on new content


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=5, help="frames per training clip (1 + 4k)")
    p.add_argument("--crop", default="64x64", help="training window, HxW pixels")
    p.add_argument("--width", type=int, default=16, help="base_dim (the released model: 96)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (3e-4 and above stalled at the mean colour)")
    p.add_argument("--kl", type=float, default=3e-4, help="weight of the KL term")
    p.add_argument("--demo-share", type=float, default=1.0, help="share of training clips cut from the demo clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a busy CPU, 2 threads waiting on each other ran 4x slower)")
    p.add_argument("--out", type=Path, default=Path("demo_vae"), help="folder for the weights, latents and training.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    crop = tuple(int(s) for s in args.crop.split("x"))

    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed + 1)
    model = diffusers.AutoencoderKLWan(base_dim=args.width, z_dim=16)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, args.steps // 25)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    )
    start, curve = time.time(), []
    for step in range(args.steps):
        x = torch.stack([random_clip(data, args.frames, crop, args.demo_share) for _ in range(args.batch)])
        mu, logvar = encode(model, x)
        y = decode(model, mu)
        rec = (y - x).abs().mean()
        kl = kl_to_unit(mu, logvar)
        loss = rec + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        curve.append(rec.item())
        if step % 25 == 0 or step == args.steps - 1:
            recent = sum(curve[-25:]) / len(curve[-25:])
            elapsed = time.time() - start
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            print(f"step {step:4d}  L1 {recent:.4f}  kl {kl.item():.3f}  lr {schedule.get_last_lr()[0]:.2e}  "
                  f"{elapsed / 60:.1f} min, ~{eta / 60:.1f} left", flush=True)  # fmt: skip
    train_minutes = (time.time() - start) / 60

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    decoder = shipped_decoder(model)  # fp16-rounded, as shipped
    with torch.no_grad():
        clip = demo_clip(DEMO_SEED)[None]
        latents = ((encode(model, clip)[0] - MEAN) / STD)[0].half()
        demo_psnr = psnr(decode(decoder, latents[None].float() * STD + MEAN), clip)
        held = Scene.from_seed(HELD_OUT_SEED).render(torch.arange(17))[None]
        held_psnr = psnr(decode(decoder, encode(model, held)[0]), held)
    official = diffusers_to_official(k for k in decoder.state_dict() if k.startswith(("decoder.", "post_quant_conv.")))
    weights = {new: decoder.state_dict()[old].half().contiguous() for old, new in official.items()}
    save_file(weights, args.out / "wan21_demo_vae.safetensors", metadata={"format": "pt"})
    save_file({"latents": latents.contiguous()}, args.out / "demo_latents.safetensors")
    record = {
        "what": "tiny Wan 2.1-architecture VAE trained on demo_scene.Scene clips (tools/train_demo_vae.py)",
        "architecture": {"base_dim": args.width, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2},
        "command": "python tools/train_demo_vae.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "decoder_parameters": sum(v.numel() for v in weights.values()),
        "train_minutes": round(train_minutes, 1),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "l1_every_25_steps": [round(sum(curve[i : i + 25]) / len(curve[i : i + 25]), 4) for i in range(0, len(curve), 25)],
        "psnr_db": {
            "demo_clip": round(demo_psnr, 2),  # the shipped latents through the shipped fp16 decoder
            "held_out_scene": round(held_psnr, 2),
        },
        "psnr_note": "192x256 frames (demo clip: 65, held-out scene: 17), pixels in [0, 1], output clamped as diffusers does",
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"trained {train_minutes:.1f} min; PSNR demo clip {demo_psnr:.2f} dB, held-out scene {held_psnr:.2f} dB; "
          f"wrote {args.out}", flush=True)  # fmt: skip


def random_clip(g: torch.Generator, frames: int, crop: tuple[int, int], demo_share: float) -> torch.Tensor:
    """A training clip cut at a random time and place: with probability `demo_share` from the
    demo's own 65 frames, else from a variation of its scene (Scene.from_seed); a third of the
    windows take the top edge, where the text scrolls."""
    if torch.rand((), generator=g) < demo_share:
        seed, start = DEMO_SEED, int(torch.randint(0, CLIP_FRAMES - frames + 1, (), generator=g))
    else:
        seed, start = int(torch.randint(1, 2**31 - 1, (), generator=g)), int(torch.randint(0, 400, (), generator=g))
    h, w = crop
    top = 0 if torch.rand((), generator=g) < 1 / 3 else int(torch.randint(0, CLIP_HEIGHT - h + 1, (), generator=g))
    left = int(torch.randint(0, CLIP_WIDTH - w + 1, (), generator=g))
    return Scene.from_seed(seed).render(torch.arange(start, start + frames), top, left, h, w)


def encode(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior's mean and log-variance (de-normalized latent space), with gradients."""
    h = model._encode(x)
    mu, logvar = h.chunk(2, dim=1)
    return mu, logvar.clamp(-30, 20)


def decode(model, z: torch.Tensor) -> torch.Tensor:
    """diffusers' decode (one latent frame per call, causal caches) without its final clamp, so
    that saturated pixels still get gradients."""
    model.clear_cache()
    x = model.post_quant_conv(z)
    out = []
    for i in range(z.shape[2]):
        model._conv_idx = [0]
        out.append(model.decoder(x[:, :, i : i + 1], feat_cache=model._feat_map, feat_idx=model._conv_idx,
                                 first_chunk=i == 0))  # fmt: skip
    model.clear_cache()
    return torch.cat(out, dim=2)


def kl_to_unit(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_n, var_n) || N(0, 1)) per latent element, in the normalized latent space."""
    mu_n, logvar_n = (mu - MEAN) / STD, logvar - 2 * STD.log()
    return 0.5 * (mu_n**2 + logvar_n.exp() - 1 - logvar_n).mean()


def shipped_decoder(model):
    """A copy of the model whose weights are rounded to fp16, as the shipped file stores them."""
    copy = diffusers.AutoencoderKLWan.from_config(model.config).eval()
    copy.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return copy


def psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    mse = F.mse_loss((video.clamp(-1, 1) + 1) / 2, (reference + 1) / 2).item()
    return 10 * math.log10(1 / mse)


if __name__ == "__main__":
    main()
