"""Decode speed on the CPU, streamdec against diffusers on the same full-size random-weight Wan 2.1
and Wan 2.2 decoders, fp32 and bf16, in one run.

    python benchmarks/cpu_speed.py                       # 192x192 and 256x256, 9 frames, a few minutes idle
    python benchmarks/cpu_speed.py --sizes 192 --rounds 3

For each decoder, dtype and frame size, the methods take turns (round 1: each method once, round 2:
each again, ...), so a machine whose load drifts slows them alike; each ratio is the median over
rounds of diffusers' time over the method's in that round. Methods:
- diffusers: `AutoencoderKLWan.decode`, frames to uint8 (what diffusers users do);
- streamdec: `decode_frames` with its defaults (channels-last, fused norm + SiLU in eager PyTorch,
  latent frames per call chosen by the frame size: one at these sizes);
- streamdec --compile: the norm + SiLU kernels made by torch.compile (compiled before timing).

Also measured: the machine's convolution and matmul rates (the ceiling; "share" is the decoder's
FLOPs, counted by torch.utils.flop_counter, over the time, over the conv3d rate), and in bf16 the
error of each method against diffusers' fp32 output (max abs and PSNR over [-1, 1]). Results go to
docs/benchmarks/cpu-speed-cpu.json and a plot beside it (plots need matplotlib:
`pip install -e ".[plots]"`).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import subprocess
import time

import torch

from _harness import ROOT, diffusers_frames, save_results

WAN22_DIFFUSERS = dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12,
                       out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16)  # fmt: skip


def reference_model(version: str):
    """diffusers' AutoencoderKLWan of the released size, random weights and norm gains."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    from streamdec.families.wan import WAN22_MEAN, WAN22_STD

    wan22 = dict(WAN22_DIFFUSERS, latents_mean=list(WAN22_MEAN), latents_std=list(WAN22_STD))
    model = AutoencoderKLWan(**(wan22 if version == "2.2" else {})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def machine_rates(dtype: torch.dtype) -> dict:
    """FLOP/s of a large channels-last 3x3x3 convolution (192 channels, 96x96, 8 frames out) and of a
    4096^2 matmul: what this machine does at best in `dtype`."""

    def best(fn, flops, repeats=3):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return flops / min(times)

    x = torch.randn(1, 192, 10, 96, 96, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(192, 192, 3, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    return {
        "conv3d_flops": best(lambda: torch.nn.functional.conv3d(x, w, padding=(0, 1, 1)), 2 * 192 * 192 * 27 * 8 * 96 * 96),
        "matmul_flops": best(lambda: a @ b, 2 * 4096**3),
    }


def decoder_flops(reference, z) -> int:
    """The decoder's FLOPs for `z`, counted on diffusers' decode of the same network (streamdec's fp32
    convolutions call oneDNN directly, which the counter does not see)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        reference.decode(z)
    return counter.get_total_flops()


def error(video: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = (video.float().clamp(-1, 1) - reference.clamp(-1, 1)).abs()
    mse = diff.square().mean().item()
    return {"max_abs": diff.max().item(), "psnr_db": 10 * math.log10(4 / mse) if mse else float("inf")}


def measure(version: str, dtype_name: str, size: int, frames: int, rounds: int) -> dict:
    import streamdec

    dtype = streamdec.vae.resolve_dtype(dtype_name)
    reference = reference_model(version)
    ratio = 16 if version == "2.2" else 8
    channels = reference.config.z_dim
    latent = size // ratio
    z = torch.randn(1, channels, (frames - 1) // 4 + 1, latent, latent, generator=torch.Generator().manual_seed(1))
    ours = streamdec.load_vae(reference, device="cpu", dtype=dtype)
    compiled = streamdec.load_vae(reference, device="cpu", dtype=dtype, compile=True)
    fp32_video = None
    if dtype != torch.float32:  # the error against the fp32 reference, before the model is cast
        with torch.no_grad():
            fp32_video = reference.decode(z).sample[0]
    reference = reference.to(dtype)
    zd = z.to(dtype)

    def frames_of(vae):
        return lambda: sum(1 for _ in streamdec.decode_frames(vae, z, normalized=False))

    runs = {"diffusers": lambda: diffusers_frames(reference, zd), "streamdec": frames_of(ours),
            "streamdec --compile": frames_of(compiled)}
    start = time.perf_counter()
    runs["streamdec --compile"]()  # compiles; the first run of each is a warm-up
    compile_seconds = time.perf_counter() - start
    for name, run in runs.items():
        if name != "streamdec --compile":
            run()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    n = 1 + 4 * (z.shape[2] - 1)
    flops = decoder_flops(reference, zd)
    rates = machine_rates(dtype)
    result = {"version": version, "dtype": dtype_name, "size": size, "frames": n, "decoder_flops": flops,
              "frames_per_call": streamdec.plan.calls_for(ours, z.shape[-2:]), "compile_seconds": compile_seconds,
              **rates, "methods": {}}  # fmt: skip
    for name, ts in times.items():
        result["methods"][name] = {
            "seconds_per_frame": min(ts) / n,
            "speedup_vs_diffusers": statistics.median(d / t for d, t in zip(times["diffusers"], ts)),
            "conv3d_share": flops / min(ts) / rates["conv3d_flops"],
        }
    if fp32_video is not None:
        with torch.no_grad():
            theirs = reference.decode(zd).sample[0]
        result["methods"]["diffusers"]["error_vs_fp32"] = error(theirs, fp32_video)
        for name, vae in (("streamdec", ours), ("streamdec --compile", compiled)):
            video = torch.stack(list(streamdec.decode_frames(vae, z, normalized=False, as_tensor=True)), dim=1)
            result["methods"][name]["error_vs_fp32"] = error(video, fp32_video)
    return result


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{torch.get_num_threads()} threads on {name}, torch {torch.__version__}"


def plot(results: dict, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot (pip install -e '.[plots]')")
        return
    runs = results["runs"]
    versions = sorted({r["version"] for r in runs})
    fig, axes = plt.subplots(1, len(versions), figsize=(5 * len(versions), 3.6), squeeze=False)
    for ax, version in zip(axes[0], versions):
        for dtype, style in (("fp32", "-"), ("bf16", "--")):
            mine = sorted((r for r in runs if r["version"] == version and r["dtype"] == dtype), key=lambda r: r["size"])
            for method, color in (("diffusers", "tab:gray"), ("streamdec", "tab:blue"), ("streamdec --compile", "tab:green")):
                ax.plot([r["size"] for r in mine], [r["methods"][method]["seconds_per_frame"] for r in mine], style,
                        color=color, marker="o", label=f"{method} {dtype}")  # fmt: skip
        ax.set_title(f"Wan {version} decoder, full size, CPU")
        ax.set_xlabel("frame side (px)")
        ax.set_ylabel("seconds per frame")
        ax.legend(fontsize=7)
    fig.suptitle(results["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[192, 256], help="frame sides in pixels")
    parser.add_argument("--versions", nargs="+", default=["2.1", "2.2"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    args = parser.parse_args()
    results = {"device": "cpu", "machine": cpu_name(), "runs": []}
    for version in args.versions:
        for dtype in args.dtypes:
            for size in args.sizes:
                run = measure(version, dtype, size, args.frames, args.rounds)
                results["runs"].append(run)
                line = ", ".join(f"{name} {m['seconds_per_frame']:.3f} s/frame ({m['speedup_vs_diffusers']:.2f}x, "
                                 f"{m['conv3d_share']:.0%} of conv3d)" for name, m in run["methods"].items())  # fmt: skip
                print(f"Wan {version} {dtype} {size}px: {line}", flush=True)
                path = save_results(results, args.out, "cpu-speed")  # after each: a stopped run keeps its rows
    plot(results, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
