"""streamdec against diffusers on the same full-size random-weight Wan 2.1 decoder, in one run.

    python benchmarks/decode.py                 # CPU, small frames, a few minutes
    python benchmarks/decode.py --device cuda   # 480p and 720p, fp32 and bf16, a 24 GB card emulated

Measures, for each method and video length:
- end-to-end latents -> mp4 time. streamdec: `decode_to_file` (decoding and encoding overlap in
  two threads). diffusers: `AutoencoderKLWan.decode`, then every frame to uint8 and into the
  same PyAV encoder with the same settings, as diffusers users do (sequential).
- peak host memory growth during the run (RSS sampled every 2 ms, minus RSS before it), and on
  CUDA the peak `torch.cuda.max_memory_allocated`;
and once per configuration: decode-only throughput (frames/s, ratio streamdec/diffusers) and the
fraction of the machine's measured matmul FLOP/s that streamdec's decoding reaches (decoder FLOPs
counted with torch.utils.flop_counter).

Each (method, length) runs in a fresh process so memory peaks do not leak between runs. Results
go to docs/benchmarks/decode-<device>.json and PNG plots beside it (plots need matplotlib:
`pip install -e ".[plots]"`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from _harness import (
    GIB,
    ROOT,
    build_models,
    diffusers_frames,
    latents_for,
    latents_to_mp4,
    machine,
    run_in_process,
    save_results,
    summary,
    sync,
)

# ---------------------------------------------------------------------------- in-process measures


def throughput(frames: int, size, device: str, dtype: str, repeats: int = 2) -> dict:
    """Decode-only frames/s for both methods, and streamdec's share of the machine's matmul peak."""
    import streamdec

    reference, ours = build_models(device, streamdec.vae.resolve_dtype(dtype))
    z = latents_for(frames, size, device)

    def timed(fn):
        fn()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - start)
        return best

    ours_s = timed(lambda: sum(1 for _ in streamdec.decode_frames(ours, z, normalized=False)))
    theirs_s = timed(lambda: diffusers_frames(reference, z))
    n = 1 + 4 * (z.shape[2] - 1)
    flops = decoder_flops(ours, z)
    peak = matmul_flops_per_second(device, ours.dtype)
    return {
        "frames": n, "streamdec_fps": n / ours_s, "diffusers_fps": n / theirs_s,
        "ratio": theirs_s / ours_s, "decoder_flops": flops, "matmul_peak_flops": peak,
        "streamdec_flops_fraction": flops / ours_s / peak, "diffusers_flops_fraction": flops / theirs_s / peak,
    }  # fmt: skip


def decoder_flops(vae, z) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    import streamdec

    with FlopCounterMode(display=False) as counter:
        for _ in streamdec.decode_frames(vae, z, normalized=False):
            pass
    return counter.get_total_flops()


def matmul_flops_per_second(device: str, dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device.startswith("cuda") and count % 20:
            continue
        sync(device)
    sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start)


# ---------------------------------------------------------------------------- driver


def configurations(device: str) -> list[dict]:
    if device == "cpu":
        return [{"name": "cpu-48x64-fp32", "size": (6, 8), "dtype": "fp32"}]
    return [
        {"name": f"{res}-{dtype}", "size": size, "dtype": dtype}
        for res, size in (("480p", (60, 104)), ("720p", (90, 160)))
        for dtype in ("fp32", "bf16")
    ]


def run_worker_process(method, frames, config, device, fraction) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(frames), "--size", "x".join(map(str, config["size"])),
           "--dtype", config["dtype"], "--device", device]  # fmt: skip
    if fraction:
        cmd += ["--memory-fraction", str(fraction)]
    return run_in_process(cmd, method=method, frames=frames)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", default="17,41,81,161,321", help="video lengths in frames")
    parser.add_argument("--card-gib", type=float, default=24.0, help="GPU memory to emulate (CUDA only)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "FRAMES"), help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--memory-fraction", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        size = tuple(int(s) for s in args.size.split("x"))
        print(json.dumps(latents_to_mp4(args.worker[0], int(args.worker[1]), size, args.device, args.dtype,
                                args.memory_fraction)))  # fmt: skip
        return

    lengths = [int(n) for n in args.lengths.split(",")]
    fraction = None
    if args.device.startswith("cuda"):
        fraction = min(1.0, args.card_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
    results = {"machine": machine(args.device), "device": args.device, "configs": []}
    for config in configurations(args.device):
        print(f"== {config['name']}", flush=True)
        runs = []
        for frames in lengths:
            for method in ("streamdec", "diffusers"):
                run = run_worker_process(method, frames, config, args.device, fraction)
                runs.append(run)
                print(f"   {method:9s} {frames:4d} frames: " + summary(run), flush=True)
        speed = throughput(lengths[min(2, len(lengths) - 1)], config["size"], args.device, config["dtype"])
        print(f"   decode-only {speed['frames']} frames: streamdec {speed['streamdec_fps']:.2f} fps, "
              f"diffusers {speed['diffusers_fps']:.2f} fps, ratio {speed['ratio']:.2f}x; "
              f"{100 * speed['streamdec_flops_fraction']:.1f}% of matmul peak", flush=True)  # fmt: skip
        results["configs"].append({**config, "runs": runs, "throughput": speed})

    plot(results, save_results(results, args.out, "decode").parent)


def plot(results: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[plots]')")
        return
    device = results["device"].split(":")[0]
    panels = [("host_growth_bytes", "peak host memory growth (MiB)", 2**20), ("seconds", "latents -> mp4 time (s)", 1)]
    if device == "cuda":
        panels.insert(1, ("gpu_peak_bytes", "peak GPU memory (GiB)", GIB))
    for config in results["configs"]:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
        for ax, (key, label, unit) in zip(axes, panels):
            for method, style in (("streamdec", "o-"), ("diffusers", "s--")):
                runs = [r for r in config["runs"] if r["method"] == method and not r.get("error")]
                ax.plot([r["frames"] for r in runs], [r[key] / unit for r in runs], style, label=method)
            ax.set_xlabel("video length (frames)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"Wan 2.1 decode, {config['name']} — {results['machine']}", fontsize=9)
        fig.tight_layout()
        path = out / f"decode-{config['name']}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
