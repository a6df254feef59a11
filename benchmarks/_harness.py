"""What the benchmarks share: the same full-size random-weight models for streamdec and diffusers,
the end-to-end latents -> mp4 job, time/memory measures, one fresh process per run, and results files.

Each benchmark script is run from this folder's parent (python benchmarks/NAME.py) and imports this.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3


def build_models(device: str, dtype: torch.dtype):
    """The same random full-size Wan 2.1 VAE for both: diffusers' object, and streamdec loading it."""
    from diffusers import AutoencoderKLWan

    import streamdec

    torch.manual_seed(0)
    reference = AutoencoderKLWan().eval()  # released sizes; weights random (no download here)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    ours = streamdec.load_vae(reference, device=device, dtype=dtype)
    reference = reference.to(device=device, dtype=dtype)
    return reference, ours


def latents_for(frames: int, size: tuple[int, int], device: str) -> torch.Tensor:
    t = (frames - 1) // 4 + 1
    return torch.randn(1, 16, t, *size, generator=torch.Generator().manual_seed(1)).to(device)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident memory in a thread; `.growth` = peak - start."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.growth = self.peak - self.start


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measured(device: str, work) -> dict:
    """Run `work()` (which returns a dict of results) and add its wall time, host RSS growth and,
    on CUDA, peak allocated device memory."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        start = time.perf_counter()
        result = work()
        sync(device)
        seconds = time.perf_counter() - start
    result.update(seconds=seconds, host_growth_bytes=rss.growth)
    if device.startswith("cuda"):
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def diffusers_frames(reference, z):
    """What diffusers users do: decode the whole video, then convert it to uint8 frames."""
    with torch.no_grad():
        video = reference.decode(z).sample
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 3, 0).cpu().numpy()


def traced_decode(model, z) -> tuple[int, int]:
    """Decode `z` (de-normalized) with `model`, a streamdec VAE (its `decode_frames`) or a diffusers
    model (its decode), counting the tensor bytes alive (streamdec.memory.MemoryTrace: activations,
    caches, output; weights built before are not counted). (frames, peak bytes)."""
    import streamdec
    from streamdec.memory import MemoryTrace

    trace = MemoryTrace()
    with trace:
        if isinstance(model, streamdec.VAE):
            count = sum(1 for _ in streamdec.decode_frames(model, z, normalized=False))
        else:
            count = len(diffusers_frames(model, z))
    return count, trace.peak


def latents_to_mp4(method: str, frames: int, size, device: str, dtype: str, memory_fraction: float | None,
           around=contextlib.nullcontext) -> dict:  # fmt: skip
    """One end-to-end latents -> mp4 run (streamdec's decode_to_file, or diffusers' decode then the same
    encoder); `around()` is entered for the job alone (models built)."""
    import streamdec
    from streamdec.sinks import VideoSink

    if memory_fraction:
        torch.cuda.set_per_process_memory_fraction(memory_fraction)
    reference, ours = build_models(device, streamdec.vae.resolve_dtype(dtype))
    z = latents_for(frames, size, device)
    if method == "streamdec":
        del reference  # each side holds only what it needs
    path = Path(tempfile.mkdtemp()) / "out.mp4"
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    error = None
    with PeakRSS() as rss, around():
        start = time.perf_counter()
        try:
            if method == "streamdec":
                written = streamdec.decode_to_file(ours, z, path, normalized=False, progress=False)
            else:
                video = diffusers_frames(reference, z)
                sink = VideoSink(path, video.shape[2], video.shape[1], fps=16)
                for frame in video:
                    sink.write(frame)
                sink.close()
                written = len(video)
        except torch.OutOfMemoryError as err:
            error, written = f"out of memory: {str(err).splitlines()[0][:120]}", 0
        sync(device)
        elapsed = time.perf_counter() - start
    result = {"method": method, "frames": frames, "written": written, "seconds": elapsed,
              "host_growth_bytes": rss.growth, "error": error}  # fmt: skip
    if device.startswith("cuda"):
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def run_in_process(cmd: list[str], **identity) -> dict:
    """Run one benchmark worker in a fresh process: the JSON it prints last, or `identity` with the
    error it died of (so one failed size does not end the whole benchmark)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {**identity, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def save_results(results: dict, out: str, name: str) -> Path:
    """Write `results` to <out>/<name>-<device type>.json."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{results['device'].split(':')[0]}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return path


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    text = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}"
    if device.startswith("cuda"):
        text = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / GIB:.0f} GiB), " + text
    return text


def summary(run: dict) -> str:
    if run.get("error"):
        return f"FAILED ({run['error']})"
    text = f"{run['seconds']:7.2f} s, host +{run['host_growth_bytes'] / 2**20:7.1f} MiB"
    if "gpu_peak_bytes" in run:
        text += f", GPU peak {run['gpu_peak_bytes'] / GIB:6.2f} GiB"
    return text
