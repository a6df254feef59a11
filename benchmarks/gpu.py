"""Everything the GPU figures need, in one run of at most ~6 minutes on one GPU (run by gpu_suite.sh).

    python benchmarks/gpu.py                 # CUDA: full sizes, bf16
    python benchmarks/gpu.py --dry-run       # the same plumbing on the CPU at tiny sizes (no figures)

On the same random full-size Wan 2.1 weights, bf16 (sections in this order, each skipped, and said
so, once the run's time budget would be passed):

- speed: time per frame at 480p and 720p x 81 frames, latents -> host uint8 frames: streamdec's
  decode_frames, diffusers' eager `decode` + the same conversion, fastvae's `FastVAEDecoder.decode`
  + the same conversion (if fastvae is importable); peak `max_memory_allocated` of each.
- memory: the same at 321 frames, 720p: streamdec's peak must not grow with length; diffusers and
  fastvae where they fit.
- offload: streamdec's offload "model" and "block" against resident weights (time, peak).
- tiling: exact tiles (32 and 16 latent px) against untiled at 720p (time, peak, max uint8 difference).
- overlap: decode_to_file (decoding and encoding overlap) against decoding to nothing and encoding
  alone, and diffusers' decode-then-encode; needs PyAV.
- host: the device -> host path alone: a pinned allocation + stream sync per piece (before) against
  streamdec.frames' host ring, synchronous and with the wait deferred by one piece.
- user cases, each in a fresh process under a 24 GiB card emulated with
  `torch.cuda.set_per_process_memory_fraction`: Open-Sora-Plan's CausalVAE at 65x512x512 and
  the HunyuanVideo VAE of Open-Sora 2.0 at 720p x 129, streamdec (max_vram=24) against the reference.

Results: docs/benchmarks/gpu-<device name>.json (dry run: a temporary folder) and one summary table.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _harness import GIB, ROOT, PeakRSS, build_models, latents_for, machine, sync

WAN_SIZES = {"480p": (60, 104), "720p": (90, 160)}  # latent pixels: 480x832 and 720x1280
DRY_SIZES = {"480p": (4, 6), "720p": (4, 8)}


class Run:
    """What the sections share: device, sizes, the time budget, models built once, the results."""

    def __init__(self, args):
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.cuda = self.device == "cuda"
        self.dtype = torch.bfloat16
        self.sizes = DRY_SIZES if self.dry else WAN_SIZES
        self.frames = 5 if self.dry else 81  # the speed section's length
        self.long = 9 if self.dry else 321  # the memory section's
        self.warm = 1 if self.dry else 5  # a warm-up decode's frames (kernels, allocator, cuDNN plans)
        self.card_gib = args.card_gib
        self.budget = args.budget
        self.start = time.perf_counter()
        self.results = {"machine": machine(self.device), "device": self.device, "dry_run": self.dry,
                        "dtype": "bf16", "sections": {}, "skipped": {}}  # fmt: skip
        self._models = self._methods = None

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def models(self):
        """diffusers' AutoencoderKLWan and streamdec's VAE of the same weights, both on the device."""
        if self._models is None:
            self._models = build_models(self.device, self.dtype)
        return self._models


def measure(run: Run, fn, **row) -> dict:
    """Run fn() once; its wall time, host RSS growth and on CUDA peak device memory (absolute, and
    over what was allocated before: the run's own working memory). An OOM is a result, not a crash."""
    gc.collect()
    if run.cuda:
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    try:
        with PeakRSS() as rss:
            start = time.perf_counter()
            extra = fn() or {}
            sync(run.device)
            seconds = time.perf_counter() - start
    except torch.OutOfMemoryError as err:
        return {**row, "error": f"out of memory: {str(err).splitlines()[0][:100]}"}
    row.update(extra, seconds=seconds, host_growth_bytes=rss.growth)
    if "frames" in row and row["frames"]:
        row["seconds_per_frame"] = seconds / row["frames"]
    if run.cuda:
        row["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
        row["gpu_peak_over_start_bytes"] = row["gpu_peak_bytes"] - before
    return row


def host_frames(video) -> int:
    """diffusers/fastvae output -> host uint8 frames, as streamdec hands them out; the count."""
    from streamdec.frames import to_uint8

    return len(to_uint8(video).cpu().numpy())


def video_frames(latent_frames: int) -> int:
    return 1 + 4 * (latent_frames - 1)


# ---------------------------------------------------------------------------- Wan 2.1 sections


def methods(run: Run) -> dict:
    """name -> decode(z) returning the number of host frames, all on the same weights."""
    import streamdec

    if run._methods is not None:
        return run._methods
    reference, ours = run.models()
    found = run._methods = {
        "streamdec": lambda z: sum(1 for _ in streamdec.decode_frames(ours, z, normalized=False)),
        "diffusers": lambda z: _no_grad(lambda: host_frames(reference.decode(z.to(run.dtype)).sample)),
    }
    fast = fastvae_decoder(run, reference)
    if callable(fast):
        found["fastvae"] = lambda z: _no_grad(lambda: host_frames(fast.decode(z.to(run.dtype))))
    else:
        run.results["fastvae"] = fast
    return found


def fastvae_decoder(run: Run, reference):
    """fastvae's decoder of the same weights, or why there is none."""
    if not run.cuda:
        return "skipped: fastvae's Triton kernels need CUDA"
    try:
        from fastvae import FastVAEDecoder

        return FastVAEDecoder.from_vae(reference).to(device=run.device, dtype=run.dtype).eval()
    except Exception as err:  # not installed, or refuses this GPU: the rest still runs
        return f"skipped: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def section_speed(run: Run) -> list[dict]:
    rows = []
    for name, decode in methods(run).items():
        for res, size in run.sizes.items():
            if run.left() < 0:
                rows.append({"method": name, "resolution": res, "frames": run.frames, "error": "skipped: out of time"})
                continue
            decode(latents_for(run.warm, size, run.device))
            z = latents_for(run.frames, size, run.device)
            rows.append(measure(run, lambda: {"frames": decode(z)}, method=name, resolution=res, frames=run.frames))
            show(rows[-1])
    return rows


def section_memory(run: Run) -> list[dict]:
    """Peak at `long` frames next to the speed section's at `frames` (720p): flat for streamdec."""
    res, size = "720p", run.sizes["720p"]
    short = {r["method"]: r for r in run.results["sections"].get("speed", []) if r.get("resolution") == res}
    rows = []
    for name, decode in methods(run).items():
        for frames in (run.frames, run.long):
            if frames == run.frames and name in short:
                continue
            if run.left() < 0:
                rows.append({"method": name, "frames": frames, "error": "skipped: out of time"})
                continue
            z = latents_for(frames, size, run.device)
            rows.append(measure(run, lambda: {"frames": decode(z)}, method=name, resolution=res, frames=frames))
            show(rows[-1])
        row = rows[-1]
        base = short.get(name) or next((r for r in rows if r["method"] == name and r["frames"] == run.frames), None)
        if base and "gpu_peak_over_start_bytes" in base and "gpu_peak_over_start_bytes" in row:
            row["growth_bytes_vs_short"] = row["gpu_peak_over_start_bytes"] - base["gpu_peak_over_start_bytes"]
    return rows


def section_offload(run: Run) -> list[dict]:
    import streamdec

    reference, _ = build_models("cpu", run.dtype)  # weights rest on the host; each mode moves its own
    res, size = "720p", run.sizes["720p"]
    frames = 5 if run.dry else 17
    rows = []
    for mode in ("none", "model", "block"):
        vae = streamdec.load_vae(reference, device=run.device, dtype=run.dtype, offload=mode)
        z = latents_for(frames, size, run.device)
        sum(1 for _ in streamdec.decode_frames(vae, latents_for(run.warm, size, run.device), normalized=False))

        def work():
            count = sum(1 for _ in streamdec.decode_frames(vae, z, normalized=False))
            resident = vae.offloader.peak_resident_bytes if vae.offloader else None
            return {"frames": count, "peak_resident_weight_bytes": resident}

        rows.append(measure(run, work, method=f"streamdec offload={mode}", resolution=res, frames=frames))
        show(rows[-1])
    return cost_against_first(rows, "cost_vs_resident")


def cost_against_first(rows: list[dict], name: str) -> list[dict]:
    """Each row's time over the first row's, as `name`, where both have one."""
    base = rows[0].get("seconds")
    for row in rows:
        if base and row.get("seconds"):
            row[name] = row["seconds"] / base
    return rows


def section_tiling(run: Run) -> list[dict]:
    import numpy as np

    import streamdec

    _, ours = run.models()
    res, size = "720p", run.sizes["720p"]
    frames = 5 if run.dry else 17
    tiles = (4,) if run.dry else (32, 16)
    z = latents_for(frames, size, run.device)
    rows, untiled = [], None
    for tile in (None, *tiles):
        sum(
            1
            for _ in streamdec.decode_frames(ours, latents_for(run.warm, size, run.device), normalized=False, tile=tile)
        )
        kept = []

        def work():
            kept.extend(streamdec.decode_frames(ours, z, normalized=False, tile=tile))
            return {"frames": len(kept)}

        row = measure(run, work, method=f"streamdec tile={tile or 'none'}", resolution=res, frames=frames)
        if kept:
            video = np.stack(kept)
            untiled = video if tile is None else untiled
            row["max_uint8_difference_vs_untiled"] = int(np.abs(video.astype(np.int16) - untiled).max())
        rows.append(row)
        show(row)
    return cost_against_first(rows, "cost_vs_untiled")


def section_overlap(run: Run) -> list[dict]:
    try:
        import av  # noqa: F401
    except ImportError:
        raise Skip("PyAV is not installed")
    import streamdec
    from streamdec.sinks import VideoSink

    reference, ours = run.models()
    res, size = "480p", run.sizes["480p"]
    z = latents_for(run.frames, size, run.device)
    folder = Path(tempfile.mkdtemp())
    sum(1 for _ in streamdec.decode_frames(ours, latents_for(run.warm, size, run.device), normalized=False))
    rows = [measure(run, lambda: {"frames": sum(1 for _ in streamdec.decode_frames(ours, z, normalized=False))},
                    method="streamdec decode only", resolution=res, frames=run.frames)]  # fmt: skip
    frames = list(streamdec.decode_frames(ours, z, normalized=False))  # for the encoder alone

    def encode_only():
        sink = VideoSink(folder / "encode.mp4", frames[0].shape[1], frames[0].shape[0], fps=16)
        for frame in frames:
            sink.write(frame)
        sink.close()
        return {"frames": len(frames)}

    def diffusers_then_encode():
        with torch.no_grad():
            video = reference.decode(z.to(run.dtype)).sample
        from streamdec.frames import to_uint8

        host = to_uint8(video).cpu().numpy()
        sink = VideoSink(folder / "diffusers.mp4", host.shape[2], host.shape[1], fps=16)
        for frame in host:
            sink.write(frame)
        sink.close()
        return {"frames": len(host)}

    rows.append(measure(run, encode_only, method="encode only (libx264)", resolution=res, frames=run.frames))
    frames.clear()
    rows.append(measure(run, lambda: {"frames": streamdec.decode_to_file(ours, z, folder / "ours.mp4", normalized=False,
                                                                          progress=False)},
                        method="streamdec decode_to_file", resolution=res, frames=run.frames))  # fmt: skip
    rows.append(measure(run, diffusers_then_encode, method="diffusers decode, then encode", resolution=res,
                        frames=run.frames))  # fmt: skip
    for row in rows:
        show(row)
    decode, encode, both = (rows[i].get("seconds") for i in range(3))
    if decode and encode and both:  # 1.0: fully overlapped, the time of the slower of the two alone
        rows[2]["vs_ideal_overlap"] = both / max(decode, encode)
        rows[2]["vs_one_after_other"] = both / (decode + encode)
    return rows


def section_host(run: Run) -> list[dict]:
    """The device -> host path alone, on pieces of 4 720p frames behind GPU work standing in for a
    decoder's (on the CPU, in a dry run: unpinned, tiny, only the plumbing)."""
    from streamdec.frames import HostRing, to_uint8

    pieces, (h, w), n = (4, (48, 64), 64) if run.dry else (24, (720, 1280), 4096)
    video = torch.rand(1, 3, 4, h, w, device=run.device, dtype=run.dtype) * 2 - 1
    a = torch.randn(n, n, device=run.device, dtype=run.dtype)
    ring = HostRing(pin=run.cuda)

    def gpu_work():  # a few ms of matmuls on an H200
        for _ in range(8):
            torch.mm(a, a)

    def before():  # what streamdec did: a pinned allocation and a stream sync per piece
        for _ in range(pieces):
            gpu_work()
            x = to_uint8(video)
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=run.cuda)
            host.copy_(x, non_blocking=run.cuda)
            sync(run.device)
            list(host.numpy())
        return {"frames": 4 * pieces}

    def at_once():  # the ring, waiting on each piece's event right after its copy
        for _ in range(pieces):
            gpu_work()
            ring.copy(to_uint8(video)).frames()
        return {"frames": 4 * pieces}

    def deferred():  # the next piece's work queued before the host waits for this one's copy
        pending = None
        for _ in range(pieces):
            gpu_work()
            piece = ring.copy(to_uint8(video))
            if pending is not None:
                pending.frames()
            pending = piece
        pending.frames()
        return {"frames": 4 * pieces}

    rows = []
    for name, fn in (("pin_memory + stream sync per piece", before), ("host ring, event wait", at_once),
                     ("host ring, wait deferred one piece", deferred)):  # fmt: skip
        fn()
        rows.append(measure(run, fn, method=name, resolution=f"{h}p", frames=4 * pieces))
        show(rows[-1])
    rows[-1]["ring_allocations"] = ring.allocations
    return rows


# ---------------------------------------------------------------------------- user cases (fresh processes)

USER_CASES = {
    # name: (builder, latent size, video frames, dry-run size, dry-run frames, reference methods)
    "opensora-plan-causalvae-65x512x512": ("causalvae", (64, 64), 65, (4, 4), 5, ("reference untiled",)),
    "opensora2-hunyuan-720p-129": ("hunyuan", (90, 160), 129, (2, 4), 5, ("diffusers", "diffusers enable_tiling")),
}


def section_user_cases(run: Run) -> list[dict]:
    rows = []
    for case, (_, size, frames, dry_size, dry_frames, references) in USER_CASES.items():
        for method in ("streamdec", *references):
            if run.left() < 20:
                rows.append({"case": case, "method": method, "error": "skipped: out of time"})
                continue
            cmd = [sys.executable, __file__, "--worker", case, method, "--card-gib", str(run.card_gib)]
            cmd += ["--dry-run"] if run.dry else []
            rows.append({"case": case, "method": method, "card_gib": run.card_gib if run.cuda else None,
                         **in_process(cmd, timeout=run.left() - 5)})  # fmt: skip
            show(rows[-1])
    return rows


def in_process(cmd: list[str], timeout: float) -> dict:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s (the run's time budget)"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def user_case_worker(run: Run, case: str, method: str) -> dict:
    """One user case in this (fresh) process, under the emulated card."""
    import streamdec

    builder, size, frames, dry_size, dry_frames, _ = USER_CASES[case]
    size, frames = (dry_size, dry_frames) if run.dry else (size, frames)
    if run.cuda:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, run.card_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
        )
    if builder == "causalvae":
        from opensora_plan import build

        vae, reference = build("causalvae", run.device, run.dtype), None
    else:
        from hunyuan import build_models as build_hunyuan

        reference, vae = build_hunyuan(run.device, run.dtype)
        if method == "diffusers enable_tiling":
            reference.enable_tiling()
    z = torch.randn(1, vae.latent_channels, (frames - 1) // 4 + 1, *size, generator=torch.Generator().manual_seed(1))
    z = z.to(run.device)
    if method == "streamdec":
        del reference
        max_vram = run.card_gib  # on the CPU too, in a dry run: the plan's plumbing

        def work():
            return {"frames": sum(1 for _ in streamdec.decode_frames(vae, z, normalized=False, max_vram=max_vram))}
    elif builder == "causalvae":  # the reference's untiled decode: the whole latent through the decoder

        def work():
            with torch.inference_mode():
                return {"frames": host_frames(vae.decoder(z.to(run.dtype)))}
    else:
        del vae

        def work():
            return {"frames": _no_grad(lambda: host_frames(reference.decode(z.to(run.dtype)).sample))}

    return measure(run, work, case=case, method=method, frames=frames, latent_size=list(size))


# ---------------------------------------------------------------------------- driver


class Skip(Exception):
    """A section that cannot run here, and why."""


SECTIONS = [
    # name, function, seconds it is expected to take on an H200 (a section is skipped unless that is left)
    ("speed", section_speed, 60),
    ("memory", section_memory, 60),
    ("offload", section_offload, 25),
    ("tiling", section_tiling, 20),
    ("overlap", section_overlap, 25),
    ("host", section_host, 5),
    ("user cases", section_user_cases, 60),
]


def show(row: dict) -> None:
    print("   " + line(row), flush=True)


def line(row: dict) -> str:
    name = " ".join(str(row[k]) for k in ("case", "method", "resolution") if row.get(k))
    if row.get("error"):
        return f"{name:52s} {row.get('frames', ''):>4} frames  {row['error']}"
    text = f"{name:52s} {row.get('frames', ''):>4} frames  {row['seconds']:7.2f} s"
    if row.get("seconds_per_frame"):
        text += f"  {1000 * row['seconds_per_frame']:8.1f} ms/frame"
    if "gpu_peak_bytes" in row:
        text += f"  peak {row['gpu_peak_bytes'] / GIB:6.2f} GiB (+{row['gpu_peak_over_start_bytes'] / GIB:.2f})"
    else:
        text += f"  host +{row['host_growth_bytes'] / 2**20:.0f} MiB"
    for key in ("growth_bytes_vs_short",):
        if key in row:
            text += f"  growth {row[key] / 2**20:+.0f} MiB"
    for key in ("cost_vs_resident", "cost_vs_untiled", "vs_ideal_overlap", "vs_one_after_other", "ring_allocations"):
        if key in row:
            text += f"  {key} {row[key]:.2f}" if isinstance(row[key], float) else f"  {key} {row[key]}"
    if "max_uint8_difference_vs_untiled" in row:
        text += f"  max diff {row['max_uint8_difference_vs_untiled']}"
    return text


def summary_table(results: dict) -> str:
    lines = [
        f"== streamdec GPU suite: {results['machine']}, bf16"
        + (" (DRY RUN: tiny sizes, CPU)" if results["dry_run"] else "")
    ]
    speed = results["sections"].get("speed", [])
    for res in ("480p", "720p"):
        by = {r["method"]: r for r in speed if r.get("resolution") == res and r.get("seconds_per_frame")}
        if "diffusers" in by:
            ratios = ", ".join(
                f"{m} {by['diffusers']['seconds'] / r['seconds']:.2f}x" for m, r in by.items() if m != "diffusers"
            )
            lines.append(f"   {res}: against diffusers eager: {ratios}")
    for section, rows in results["sections"].items():
        lines.append(f"-- {section}")
        lines += ["   " + line(r) for r in rows]
    for section, why in results["skipped"].items():
        lines.append(f"-- {section}: SKIPPED ({why})")
    if isinstance(results.get("fastvae"), str):
        lines.append(f"-- fastvae: {results['fastvae']}")
    return "\n".join(lines)


def device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: test the plumbing, measure nothing")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds this script may take in all")
    parser.add_argument("--card-gib", type=float, default=24.0, help="the card the user cases emulate (GiB)")
    parser.add_argument("--sections", help="comma-separated subset of: " + ", ".join(s[0] for s in SECTIONS))
    parser.add_argument("--out", help="results folder (default: docs/benchmarks; dry run: a temporary folder)")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --dry-run to test the plumbing on the CPU")
    run = Run(args)
    if args.worker:
        print(json.dumps(user_case_worker(run, *args.worker)))
        return

    wanted = set(args.sections.split(",")) if args.sections else {s[0] for s in SECTIONS}
    out = Path(args.out or (tempfile.mkdtemp(prefix="streamdec-gpu-dry-") if run.dry else ROOT / "docs" / "benchmarks"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-{'dry-run-cpu' if run.dry else device_slug()}.json"
    for name, section, expected in SECTIONS:
        if name not in wanted:
            continue
        expected = 1 if run.dry else expected
        if run.left() < expected:
            run.results["skipped"][name] = (
                f"{run.left():.0f} s of the {run.budget:.0f} s budget left, it needs ~{expected} s"
            )
            print(f"== {name}: SKIPPED ({run.results['skipped'][name]})", flush=True)
            continue
        print(f"== {name} ({run.left():.0f} s left)", flush=True)
        start = time.perf_counter()
        try:
            run.results["sections"][name] = section(run)
        except Skip as why:
            run.results["skipped"][name] = str(why)
            print(f"   SKIPPED ({why})", flush=True)
        except Exception as err:  # one broken section must not lose the others' figures
            run.results["skipped"][name] = f"failed: {type(err).__name__}: {err}"[:300]
            print(f"   FAILED ({type(err).__name__}: {err})", flush=True)
        print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
        run.results["seconds"] = time.perf_counter() - run.start
        path.write_text(json.dumps(run.results, indent=1))  # after each section: a killed run keeps what it had

    print(summary_table(run.results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
