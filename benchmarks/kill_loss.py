"""Frames lost to SIGKILL: how much of a decode a killed process leaves in its file.

    python benchmarks/kill_loss.py              # mp4 and mkv; x264, x265, SVT-AV1, FFV1; default and --low-latency

Each run decodes the built-in demo's latents (random-weight Wan 2.1 decoder at width 16, 192x256
frames) into a file in a child process, which notes after every frame how many frames the decoder
has handed to the writer and how many the encoder has taken. The parent kills it with SIGKILL at a
random moment (2-8 s after the file appears), then counts the frames PyAV decodes from what is left:

    lost to the encoder = frames the encoder had taken - frames in the file
    lost in all         = frames the decoder had handed over - frames in the file

The second adds the frames still waiting in the writer's queue. Results: docs/benchmarks/kill-loss-cpu.json.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import ROOT, machine, save_results

CASES = [  # (extension, codec)
    ("mp4", "libx264"), ("mp4", "libx265"), ("mp4", "libsvtav1"),
    ("mkv", "libx264"), ("mkv", "libx265"), ("mkv", "libsvtav1"), ("mkv", "ffv1"),
]  # fmt: skip


def child(out: str, codec: str, low_latency: bool, progress: str) -> None:
    """Decode into `out`, writing "handed taken" to `progress` after every frame."""
    import torch

    import streamdec
    from streamdec import sinks
    from streamdec.demo import demo_latents, demo_vae

    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    counts = {"handed": 0, "taken": 0}

    def note():
        os.write(fd, f"{counts['handed']} {counts['taken']}\n".encode())

    class CountingWriter(sinks.FrameWriter):
        def put(self, frame):
            super().put(frame)
            counts["handed"] += 1
            note()

    real_write = sinks.VideoSink.write

    def counting_write(self, frame):
        real_write(self, frame)
        counts["taken"] += 1
        note()

    sinks.FrameWriter = CountingWriter  # decode_to_file takes it from sinks when it runs
    sinks.VideoSink.write = counting_write
    vae = demo_vae(16, device="cpu")
    latents = demo_latents(400, 24, 32, generator=torch.Generator().manual_seed(0))
    streamdec.decode_to_file(vae, latents, out, codec=codec, progress=False, low_latency=low_latency)


def frames_in(path: Path) -> int:
    import av

    count = 0
    try:
        with av.open(str(path)) as container:
            for _ in container.decode(video=0):
                count += 1
    except Exception:  # a cut-off last fragment: count what decoded before it
        pass
    return count


def one_kill(ext: str, codec: str, low_latency: bool, rng: random.Random) -> dict:
    folder = Path(tempfile.mkdtemp())
    out, progress = folder / f"out.{ext}", folder / "progress"
    cmd = [sys.executable, __file__, "--child", str(out), codec, str(int(low_latency)), str(progress)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.time()
    while not out.exists() and proc.poll() is None and time.time() - start < 120:
        time.sleep(0.02)
    time.sleep(rng.uniform(2, 8))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = progress.read_text().split("\n") if progress.exists() else []
    handed, taken = (int(n) for n in ([ln for ln in lines if ln][-1].split() if any(lines) else (0, 0)))
    kept = frames_in(out)
    return {"container": ext, "codec": codec, "low_latency": low_latency, "handed": handed, "taken": taken,
            "in_file": kept, "lost_to_encoder": taken - kept, "lost": handed - kept}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3, help="kills per case")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        out, codec, low, progress = args.child
        child(out, codec, low == "1", progress)
        return
    rng = random.Random(0)
    runs = []
    for ext, codec in CASES:
        for low_latency in (False, True):
            for _ in range(args.kills):
                run = one_kill(ext, codec, low_latency, rng)
                runs.append(run)
                print(f"{ext:4s} {codec:10s} {'low-latency' if low_latency else 'default':11s} handed {run['handed']:4d} "
                      f"taken {run['taken']:4d} in file {run['in_file']:4d}: lost {run['lost_to_encoder']:3d} to the "
                      f"encoder, {run['lost']:3d} in all", flush=True)  # fmt: skip
    save_results({"machine": machine("cpu"), "device": "cpu", "runs": runs}, args.out, "kill-loss")


if __name__ == "__main__":
    main()
