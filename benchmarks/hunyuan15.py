"""HunyuanVideo-1.5: streamdec's carried stream next to diffusers' `AutoencoderKLHunyuanVideo15.decode`
(the whole clip in one call) on the same full-size random-weight decoder (871 M parameters).

    python benchmarks/hunyuan15.py              # both parts below (CPU, ~10 minutes)
    python benchmarks/hunyuan15.py --device cuda --lengths 33,121   # the time part on a GPU, 480p

1. Device memory against length, traced on the meta device in bf16 (shapes, no data; weights
   included): diffusers' whole-clip decode at 480p and 720p for 33, 121 and 481 frames, and
   streamdec's stream with the attention's keys and values parked on the host (as on a GPU), plus
   what those keys and values hold on the host at the end.
2. Time and host memory against length (CPU: 64x96 frames, fp32), each run a fresh process, every
   frame turned into uint8 as a user writing a video would; streamdec with one latent frame per
   decoder call (its default) and with four (`frames_per_call=4`).

Results: docs/benchmarks/hunyuan15-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from _harness import GIB, ROOT, diffusers_frames, machine, measured, run_in_process, save_results, summary

SIZES = {"480p": (30, 52), "720p": (45, 80)}  # latent pixels: 480x832 and 720x1280 at 16x
LENGTHS = (33, 121, 481)


def meta_vae(dtype: torch.dtype):
    """streamdec's VAE for a released-size decoder on the meta device, estimated as for a GPU."""
    from streamdec.families import by_name
    from streamdec.families.hunyuan15 import Hunyuan15Config
    from streamdec.vae import VAE

    family, config = by_name("hunyuanvideo1.5"), Hunyuan15Config()
    with torch.device("meta"):
        decoder = family.build(config).to(dtype)
    vae = VAE(family, config, decoder, torch.device("meta"), dtype, dtype, "random full-size HunyuanVideo-1.5")
    vae.device = torch.device("cuda")  # keys, values and tile caches parked on the host
    return vae


def diffusers_peak(size, frames: int, dtype: torch.dtype) -> int:
    from diffusers import AutoencoderKLHunyuanVideo15

    from streamdec.memory import MemoryTrace

    with torch.device("meta"):
        model = AutoencoderKLHunyuanVideo15()
    model = model.to(dtype).eval()
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith("decoder."))
    trace = MemoryTrace(device="meta")
    with torch.no_grad(), trace:
        z = torch.empty(1, 32, (frames - 1) // 4 + 1, *size, device="meta", dtype=dtype)
        video = model.decode(z).sample
        del video, z
    return trace.peak + weights


def device_memory(dtype: torch.dtype) -> list[dict]:
    from streamdec import memory

    vae = meta_vae(dtype)
    channels = vae.config.block_out_channels[-1]
    rows = []
    for name, size in SIZES.items():
        ours = memory.estimate_peak(vae, size)
        kv_per_latent = 2 * size[0] * size[1] * channels * torch.finfo(dtype).bits // 8
        for frames in LENGTHS:
            start = time.perf_counter()
            theirs = diffusers_peak(size, frames, dtype)
            latents = (frames - 1) // 4 + 1
            row = {"resolution": name, "frames": frames, "diffusers_gib": round(theirs / GIB, 2),
                   "streamdec_gib": round(ours / GIB, 2), "host_keys_values_gib": round(latents * kv_per_latent / GIB, 3),
                   "trace_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
            rows.append(row)
            print(f"   {name} {frames:4d} frames: diffusers {row['diffusers_gib']:8.2f} GiB, streamdec "
                  f"{row['streamdec_gib']:6.2f} GiB (+ {row['host_keys_values_gib']:.3f} GiB of keys and values on "
                  f"the host)", flush=True)  # fmt: skip
    return rows


def build_models(device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKLHunyuanVideo15

    import streamdec

    torch.manual_seed(0)
    reference = AutoencoderKLHunyuanVideo15().eval()  # released sizes; weights random (no download here)
    ours = streamdec.load_vae(reference, device=device, dtype=dtype)
    return reference.to(device=device, dtype=dtype), ours


def run(method: str, frames: int, size, device: str, dtype: str) -> dict:
    import streamdec

    reference, ours = build_models(device, streamdec.vae.resolve_dtype(dtype))
    z = torch.randn(1, 32, (frames - 1) // 4 + 1, *size, generator=torch.Generator().manual_seed(1))
    z = z.to(device=device, dtype=ours.dtype)

    def work() -> dict:
        if method.startswith("streamdec"):
            per_call = int(method.partition("-")[2] or 1)
            count = sum(1 for _ in streamdec.decode_frames(ours, z, normalized=False, frames_per_call=per_call))
        else:
            count = len(diffusers_frames(reference, z))
        return {"method": method, "frames": count}

    return measured(device, work)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", help="video lengths in frames (1 + 4k) for the time part")
    parser.add_argument("--skip-memory", action="store_true", help="only the time part (keeps the last memory part)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        method, frames, h, w, dtype = args.worker
        print(json.dumps(run(method, int(frames), (int(h), int(w)), args.device, dtype)))
        return

    results = {"machine": machine(args.device), "device": args.device}
    if args.skip_memory:
        previous = ROOT / "docs" / "benchmarks" / f"hunyuan15-{args.device.split(':')[0]}.json"
        if previous.exists():
            results["device_memory"] = json.loads(previous.read_text()).get("device_memory")
    else:
        print("== device memory, traced on the meta device, bf16", flush=True)
        results["device_memory"] = device_memory(torch.bfloat16)
    cpu = args.device == "cpu"
    size, dtype = ((4, 6), "fp32") if cpu else ((30, 52), "bf16")
    lengths = [int(n) for n in (args.lengths or ("9,17,33" if cpu else "33,121")).split(",")]
    results.update(size=size, dtype=dtype, runs=[])
    print(f"== time, latents {size[0]}x{size[1]} -> {size[0] * 16}x{size[1] * 16}, {dtype}", flush=True)
    for frames in lengths:
        for method in ("streamdec", "streamdec-4", "diffusers"):
            cmd = [sys.executable, __file__, "--device", args.device, "--worker", method, str(frames), *map(str, size),
                   dtype]  # fmt: skip
            run_ = run_in_process(cmd, method=method, frames=frames)
            results["runs"].append(run_)
            print(f"   {frames:4d} frames {method:11s}: " + summary(run_), flush=True)
    save_results(results, args.out, "hunyuan15")


if __name__ == "__main__":
    main()
