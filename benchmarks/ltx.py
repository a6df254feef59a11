"""LTX-2 and LTX-Video: streamdec's lookahead stream next to diffusers' whole-clip decode
(`AutoencoderKLLTX2Video.decode`, `AutoencoderKLLTXVideo.decode`) on the same full-size random-weight
decoders: LTX-2 as released (528 M decoder parameters; the class defaults with `decoder_causal=False`
and the 32x / 8x compression ratios, as diffusers' scripts/convert_ltx2_to_diffusers.py writes its
config: the class default `decoder_causal=True` is not the released decoder), LTX-Video with the
class defaults, which are the released 0.9.0 (239 M). LTX-Video 0.9.5-0.9.8 has LTX-2's decoder shape.

    python benchmarks/ltx.py                   # both parts (CPU, ~10 minutes)
    python benchmarks/ltx.py --skip-time       # the memory part only (deterministic, ~1 minute)

1. Device memory against length, traced on the meta device in bf16 (shapes, no data; weights
   included): diffusers' `decode` of the whole clip at 704x480 and 1280x704 (latents 15x22 and
   22x40), and streamdec's stream over the same whole clip, pushed one latent frame at a time and
   closed, each piece turned into uint8 frames (as memory.py traces it for `max_vram` plans, but
   the full length rather than the steady state). Deterministic.
2. Time and traced tensor memory against length on this machine (small frames, fp32), each run a
   fresh process, every frame turned into uint8 as a user writing a video would. The tensor memory is
   MemoryTrace's peak (every tensor storage alive at once, weights excluded): deterministic, unlike
   the time, which on a shared machine varies from run to run.

Results: docs/benchmarks/ltx-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from _harness import GIB, ROOT, machine, run_in_process, save_results, traced_decode

FAMILIES = {
    # streamdec family: (diffusers class, the released config as diffusers writes it, label)
    "ltx2": ("AutoencoderKLLTX2Video",
             {"decoder_causal": False, "spatial_compression_ratio": 32, "temporal_compression_ratio": 8},
             "LTX-2"),
    "ltx-video": ("AutoencoderKLLTXVideo", {}, "LTX-Video 0.9.0"),
}  # fmt: skip
LATENT_CHANNELS = 128
SIZES = {"480p": (15, 22), "720p": (22, 40)}  # latent pixels: 704x480 and 1280x704 at 32x
LENGTHS = (41, 121, 257)  # video frames, 1 + 8k: 6, 16 and 33 latent frames
SMALL = (4, 6)  # latent pixels of the time part: 128x192 frames
TIME_LENGTHS = (17, 57)  # 3 and 8 latent frames (both below the lookahead of 22: all of it is flushed at close)


def latent_frames(frames: int) -> int:
    return (frames - 1) // 8 + 1


def diffusers_model(family: str, device: str):
    import diffusers

    name, config, _ = FAMILIES[family]
    with torch.device(device):
        return getattr(diffusers, name)(**config).eval()


def randomize(model):
    """Random biases, LayerNorm gains and latent statistics, as the tests' LTX models have (the RMS
    norms have no parameters); conv weights keep their random initialisation."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif name.endswith("norm3.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
        model.latents_mean.copy_(0.1 * torch.randn_like(model.latents_mean))
        model.latents_std.copy_(1 + 0.3 * torch.rand_like(model.latents_std))
    return model


def decoder_weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith("decoder."))


def meta_vae(family_name: str, dtype: torch.dtype):
    """streamdec's VAE for a released-size decoder on the meta device, estimated as for a GPU."""
    from streamdec.families import by_name
    from streamdec.vae import VAE

    family = by_name(family_name)
    name = FAMILIES[family_name][0]
    model = diffusers_model(family_name, "meta")
    tensors = model.state_dict()
    names = family.rename_map(tensors.keys(), family.detect_layout(tensors.keys()))  # diffusers' -> streamdec's
    shapes = {new: tuple(tensors[old].shape) for old, new in names.items()}
    ltx_config = family.config(shapes, {"_class_name": name, **dict(model.config)})
    with torch.device("meta"):
        decoder = family.build(ltx_config).to(dtype)
    vae = VAE(family, ltx_config, decoder, torch.device("meta"), dtype, dtype, f"random full-size {family_name}")
    vae.device = torch.device("cuda")  # as on a GPU
    return vae


def diffusers_peak(family_name: str, size, frames: int, dtype: torch.dtype) -> int:
    from streamdec.memory import MemoryTrace

    model = diffusers_model(family_name, "meta").to(dtype)
    trace = MemoryTrace(device="meta")
    with torch.no_grad(), trace:
        z = torch.empty(1, LATENT_CHANNELS, latent_frames(frames), *size, device="meta", dtype=dtype)
        video = model.decode(z).sample
        del video, z
    return trace.peak + decoder_weight_bytes(model)


def streamdec_peak(vae, size, frames: int) -> int:
    """The stream over the whole clip on the meta device (one latent frame per push, then closed),
    weights included: not capped at the steady state as the max_vram estimate is."""
    from streamdec.memory import traced_peak, weight_bytes
    from streamdec.plan import Plan

    t = latent_frames(frames)
    return traced_peak(vae, size, t, Plan(latent_frames=t)) + weight_bytes(vae, "none")


def device_memory(dtype: torch.dtype) -> list[dict]:
    from streamdec import memory

    rows = []
    for name in FAMILIES:
        vae = meta_vae(name, dtype)
        for resolution, size in SIZES.items():
            start = time.perf_counter()
            plan_estimate = memory.estimate_peak(vae, size)  # what max_vram plans see (steady state)
            print(f"   {name} {resolution}: max_vram plan estimate {plan_estimate / GIB:.2f} GiB "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)  # fmt: skip
            for frames in LENGTHS:
                start = time.perf_counter()
                theirs = diffusers_peak(name, size, frames, dtype)
                ours = streamdec_peak(vae, size, frames)
                row = {"family": name, "resolution": resolution, "video": f"{size[1] * 32}x{size[0] * 32}",
                       "frames": frames, "latent_frames": latent_frames(frames),
                       "diffusers_gib": round(theirs / GIB, 2), "streamdec_gib": round(ours / GIB, 2),
                       "streamdec_plan_estimate_gib": round(plan_estimate / GIB, 2),
                       "trace_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
                rows.append(row)
                print(f"   {name} {resolution} {frames:4d} frames: diffusers {row['diffusers_gib']:7.2f} GiB, "
                      f"streamdec {row['streamdec_gib']:6.2f} GiB ({row['trace_seconds']} s)", flush=True)  # fmt: skip
    return rows


def run(family_name: str, method: str, frames: int) -> dict:
    """One timed decode in this process: time and the traced peak of tensor memory (weights excluded)."""
    import streamdec

    torch.manual_seed(0)
    reference = randomize(diffusers_model(family_name, "cpu"))  # released sizes; weights random (no download here)
    ours = streamdec.load_vae(reference, device="cpu")
    if method == "streamdec":
        del reference
    else:
        del ours
    z = torch.randn(1, LATENT_CHANNELS, latent_frames(frames), *SMALL, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    count, peak = traced_decode(ours if method == "streamdec" else reference, z)  # the side this process kept
    return {"family": family_name, "method": method, "frames": count, "seconds": round(time.perf_counter() - start, 2),
            "traced_peak_mib": round(peak / 2**20, 2)}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        family, method, frames = args.worker
        print(json.dumps(run(family, method, int(frames))))
        return

    results = {"machine": machine("cpu") + "; shared with other jobs while measured (times vary run to run)",
               "device": "cpu",
               "models": {name: f"{label}: diffusers {cls}({', '.join(f'{k}={v}' for k, v in config.items())}), "
                                "random weights" for name, (cls, config, label) in FAMILIES.items()}}  # fmt: skip
    print("== device memory, traced on the meta device, bf16", flush=True)
    results["device_memory"] = device_memory(torch.bfloat16)
    if not args.skip_time:
        results.update(
            size=SMALL,
            dtype="fp32",
            runs=[],
            note=(
                "streamdec runs the decoder once per latent frame pushed and once per temporal conv at close() "
                "(the end of the clip goes through conv by conv), each conv seeing one frame's worth; diffusers runs "
                "each conv once over the whole clip. At this frame size a conv call costs mostly its fixed part (on this "
                "machine one 1024-channel kernel-3 conv took ~120 ms for one output frame of 4x5 pixels, ~150 ms for "
                "eight), so streamdec's time here is set by its call count, not by the decoder's arithmetic; it says "
                "nothing about 480p or a GPU"
            ),
        )
        print(
            f"== time and traced tensor memory, latents {SMALL[0]}x{SMALL[1]} -> {SMALL[0] * 32}x{SMALL[1] * 32}, fp32"
        )
        for family in FAMILIES:
            for frames in TIME_LENGTHS:
                for method in ("streamdec", "diffusers"):
                    cmd = [sys.executable, __file__, "--worker", family, method, str(frames)]
                    result = run_in_process(cmd, family=family, method=method, frames=frames)
                    results["runs"].append(result)
                    print(f"   {family} {frames:3d} frames {method:9s}: {result}", flush=True)
    save_results(results, args.out, "ltx")


if __name__ == "__main__":
    main()
