"""Memory against video length, counted exactly: the bytes of every torch tensor alive, at the peak.

    python benchmarks/tensor_memory.py     # CPU, 48x64 frames, 17 to 321 frames (minutes)

RSS (benchmarks/decode.py) moves by tens of MiB between runs as the allocators warm up, which
hides a small video's growth. Here the same end-to-end job as decode.py's (latents -> mp4:
streamdec's `decode_to_file`; diffusers' `decode`, uint8 frames, the same PyAV encoder) runs under
streamdec.memory.MemoryTrace, which counts the storage bytes of every tensor the job makes while
it is alive: caches, activations, the decoded video, frames waiting for the encoder (the weights,
built before, are left out). Its peak
against length shows what each side keeps, with no allocator noise. (Memory outside torch tensors,
such as the encoder's, is not counted; it is the same on both sides.) Each run is a fresh process.
Results: docs/benchmarks/tensor-memory-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import sys

from _harness import ROOT, latents_to_mp4, machine, run_in_process, save_results

LENGTHS = (17, 41, 81, 161, 321)


def run(method: str, frames: int, size, dtype: str) -> dict:
    from streamdec.memory import MemoryTrace

    trace = MemoryTrace()  # counts what the job allocates, not the weights built before it
    result = latents_to_mp4(method, frames, size, "cpu", dtype, None, around=lambda: trace)
    return {**result, "tensor_peak_bytes": trace.peak}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="6x8", help="latent height x width (frames are 8x larger)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = tuple(int(s) for s in args.size.split("x"))
    if args.worker:
        method, frames = args.worker
        print(json.dumps(run(method, int(frames), size, "fp32")))
        return

    results = {"machine": machine("cpu"), "device": "cpu", "size": size, "dtype": "fp32", "runs": []}
    for method in ("streamdec", "diffusers"):
        for frames in LENGTHS:
            cmd = [sys.executable, __file__, "--size", args.size, "--worker", method, str(frames)]
            run_ = run_in_process(cmd, method=method, frames=frames)
            results["runs"].append(run_)
            peak = run_.get("tensor_peak_bytes")
            print(f"   {method:9s} {frames:4d} frames: " + (f"{peak / 2**20:9.2f} MiB" if peak else str(run_)), flush=True)
    growth = {}
    for method in ("streamdec", "diffusers"):
        peaks = [r["tensor_peak_bytes"] for r in results["runs"] if r["method"] == method and "tensor_peak_bytes" in r]
        growth[method] = peaks[-1] - peaks[0] if len(peaks) == len(LENGTHS) else None
    results["growth_bytes"] = growth
    if growth["diffusers"]:
        results["growth_ratio"] = growth["streamdec"] / growth["diffusers"]
        print(f"growth {LENGTHS[0]} -> {LENGTHS[-1]} frames: streamdec {growth['streamdec'] / 2**20:+.2f} MiB, "
              f"diffusers {growth['diffusers'] / 2**20:+.2f} MiB, ratio {results['growth_ratio']:.2%}")  # fmt: skip
    save_results(results, args.out, "tensor-memory")


if __name__ == "__main__":
    main()
