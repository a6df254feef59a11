"""Distributed decode (streamdec.distributed): speed-up over one process, bytes exchanged per frame,
and a paper extrapolation to 8 GPUs at 720p.

    python benchmarks/distributed.py            # CPU, gloo: 2 ranks x 1 thread against 1 process x 1 thread

1. Measured (CPU, gloo): a mid-size random Wan 2.1 decoder (base width 48, the released is 96) decodes
   the same latents in one process with one thread, in one process with two threads (the same
   cores as two ranks), and on two ranks with one thread each (the frame split in two bands).
   Each run is a fresh set of processes, with a warm-up decode first; the time is rank 0's, between
   barriers, and frames are taken as uint8 as a file sink takes them. Bytes sent are counted per
   rank and kind (halo rows, whole-frame all-gather, bands to rank 0).
2. Dry run (meta device): the same band hooks with the exchanges left out (`DryRunBands`) count the
   bytes each rank would send and the FLOPs it would compute, for any number of ranks and any size.
   It is checked against the measured counts of part 1 (they must be equal), then run for the
   released Wan 2.1 and Wan 2.2 decoders at 1280x720 on 8 ranks, in bf16, for a steady-state latent
   frame (4 video frames).
3. Paper: time per latent frame on 8 GPUs = the single-GPU time x (the busiest rank's FLOPs / one
   GPU's) + the busiest rank's bytes / link bandwidth + messages x latency (no overlap of compute and
   communication assumed), for NVLink and PCIe (assumptions in `LINKS`), from published single-GPU
   times (`SINGLE_GPU`).

Results: docs/benchmarks/distributed-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _harness import ROOT, machine, save_results

BENCH = dict(base_dim=48, latent=(24, 40), frames=4)  # 192x320 video, 13 frames
# Assumed links, per GPU and direction, as achieved by NCCL point-to-point for MB-sized messages
LINKS = {
    "NVLink (H100/H200 SXM, NVLink 4 through NVSwitch: 450 GB/s per direction nominal)": dict(bytes_per_s=300e9, latency_s=10e-6),
    "PCIe 4.0 x16 (32 GB/s per direction nominal; GPUs behind shared switches)": dict(bytes_per_s=20e9, latency_s=20e-6),
    "PCIe 5.0 x16 (64 GB/s per direction nominal)": dict(bytes_per_s=40e9, latency_s=20e-6),
}  # fmt: skip
# Published single-GPU Wan decode times at 720p (shared/references/families-2026.md), per latent frame
SINGLE_GPU = {
    "wan2.1": ("fastvae, RTX PRO 6000, bf16, 1280x720x81 (21 latent frames): 2.78 s; diffusers eager 6.57 s",
               {"fastvae": 2.78 / 21, "diffusers eager": 6.57 / 21}),
    "wan2.2": ("TRT-LLM #17262, B200, diffusers bf16, 1280x704x121 (31 latent frames): 4.02 s",
               {"diffusers bf16 (704 rows)": 4.02 / 31}),
}  # fmt: skip


# ---------------------------------------------------------------------------- measured (part 1)


def save_model(folder: Path) -> None:
    """A mid-size random Wan 2.1 VAE (diffusers), random norm gains and biases."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.wan import random_wan

    random_wan(base_dim=BENCH["base_dim"]).save_pretrained(folder)


def worker(vae_path: str, threads: int, out: str) -> None:
    """One process of a measured run (alone, or a rank where WORLD_SIZE is set)."""
    import datetime

    import torch.distributed as dist

    import streamdec

    torch.set_num_threads(threads)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    group = None
    if ranks > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
        group = dist.group.WORLD
    vae = streamdec.load_vae(vae_path, device="cpu")
    z = torch.randn(16, BENCH["frames"], *BENCH["latent"], generator=torch.Generator().manual_seed(0))

    def decode(latents) -> dict:
        stream = streamdec.StreamDecoder(vae, group=group, frames_per_call=1)  # the same calls in every run
        if group is not None:
            dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        frames = len(stream.push(latents))
        bands = getattr(stream.stream, "bands", None)
        frames += len(stream.close())  # (closing ends with a barrier on every rank)
        return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                "sent": dict(bands.sent) if bands else {}, "frames": frames}  # fmt: skip

    decode(z[:, :1])  # warm-up: oneDNN's kernels, the allocator
    Path(out).write_text(json.dumps(decode(z)))
    if group is not None:
        dist.destroy_process_group()


def measure(vae_path: Path, ranks: int, threads: int, work: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads)}
    if ranks > 1:
        env["WORLD_SIZE"] = str(ranks)
    outs = [work / f"r{ranks}t{threads}-{r}.json" for r in range(ranks)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(vae_path), str(threads), str(out)],
                              env={**env, "RANK": str(r)}) for r, out in enumerate(outs)]  # fmt: skip
    if any(p.wait() for p in procs):
        raise SystemExit(f"a worker of the {ranks}-rank run failed")
    per_rank = [json.loads(out.read_text()) for out in outs]
    return {"ranks": ranks, "threads_per_rank": threads, "seconds": per_rank[0]["seconds"],
            "cpu_seconds_per_rank": [r["cpu_seconds"] for r in per_rank], "load_average_after": os.getloadavg(),
            "frames": per_rank[0]["frames"], "sent_bytes_per_rank": [r["sent"] for r in per_rank]}  # fmt: skip


# ---------------------------------------------------------------------------- dry run (part 2)


def dry_run(family_name: str, config, latent: tuple[int, int], ranks: int, latent_frames: int, dtype: torch.dtype,
            steady_only: bool) -> dict:  # fmt: skip
    """Every rank's bytes sent (by kind) and FLOPs, and one process's FLOPs, decoding `latent_frames`
    latent frames on the meta device (`steady_only`: counting the last one only)."""
    from torch.utils.flop_counter import FlopCounterMode

    from streamdec.distributed import BandHooks, Bands, BandStream, split_rows
    from streamdec.families import by_name
    from streamdec.plan import Plan

    class DryRunBands(Bands):
        """Bands whose exchanges do nothing (tensors on the meta device have no data to send)."""

        def _run(self, ops):
            pass

        def _all_gather(self, parts, mine):
            pass

        def barrier(self):
            pass

        def agree(self, what, values, device):
            pass

    family = by_name(family_name)
    with torch.device("meta"):
        decoder = family.build(config).to(dtype).eval().requires_grad_(False)
    rows = split_rows(latent[0], ranks) if ranks > 1 else [latent[0]]

    def run(rank: int | None) -> tuple[dict, int]:
        stream = family.open_stream(decoder, Plan())
        bands = None
        if rank is not None:
            bands = DryRunBands(rows, rank)
            stream = BandStream(stream, BandHooks(decoder, family_name, bands), exact=False)
        flops = 0
        with torch.inference_mode():
            for t in range(latent_frames):
                if steady_only and t == latent_frames - 1 and bands is not None:
                    bands.sent.clear()  # count the last latent frame only
                counter = FlopCounterMode(display=False)
                with counter:
                    for _ in stream.push(torch.empty(1, config.z_dim, 1, *latent, device="meta", dtype=dtype)):
                        pass
                flops = flops + counter.get_total_flops() if not steady_only else counter.get_total_flops()
            list(stream.close())
        return (dict(bands.sent) if bands is not None else {}), flops

    single_flops = run(None)[1]
    per_rank = [run(r) for r in range(ranks)] if ranks > 1 else []
    return {"rows": rows, "single_flops": single_flops, "sent_bytes_per_rank": [s for s, _ in per_rank],
            "flops_per_rank": [f for _, f in per_rank]}  # fmt: skip


def messages_per_latent_frame(family_name: str, config) -> int:
    """Point-to-point messages an interior rank sends and receives per decoder call: 2 per neighbour
    per halo-exchanging conv, plus one all-gather and one band to rank 0."""
    from streamdec.distributed import BandHooks
    from streamdec.families import by_name

    with torch.device("meta"):
        decoder = by_name(family_name).build(config)
    return 4 * len(BandHooks(decoder, family_name, None).halos) + 2


def paper(family_name: str, config, latent: tuple[int, int], ranks: int = 8) -> dict:
    dry = dry_run(family_name, config, latent, ranks, latent_frames=3, dtype=torch.bfloat16, steady_only=True)
    busiest = max(range(ranks), key=lambda r: dry["flops_per_rank"][r])
    compute_share = dry["flops_per_rank"][busiest] / dry["single_flops"]
    sent = [sum(s.values()) for s in dry["sent_bytes_per_rank"]]
    # rank 0 also receives every other band of the output: its link carries that too
    output_in = sum(s.get("output", 0) for s in dry["sent_bytes_per_rank"])
    link_bytes = max(max(sent), sent[0] + output_in)
    messages = messages_per_latent_frame(family_name, config)
    source, single = SINGLE_GPU[family_name]
    estimates = {}
    for link, spec in LINKS.items():
        comm = link_bytes / spec["bytes_per_s"] + messages * spec["latency_s"]
        estimates[link] = {
            name: {
                "single_gpu_s_per_latent_frame": t1,
                "comm_s_per_latent_frame": comm,
                "ranks_s_per_latent_frame": t1 * compute_share + comm,
                "speedup": t1 / (t1 * compute_share + comm),
            }
            for name, t1 in single.items()
        }
    from streamdec.families import by_name

    h, w = latent
    ratio = by_name(family_name).spatial_ratio
    return {
        "family": family_name, "video": f"{w * ratio}x{h * ratio}", "latent": list(latent), "ranks": ranks, "dtype": "bf16",
        "bands": dry["rows"], "per_latent_frame": "steady state: 4 video frames",
        "bytes_sent_per_rank": dry["sent_bytes_per_rank"], "busiest_link_bytes": link_bytes,
        "busiest_link_bytes_per_video_frame": link_bytes / 4, "messages_per_rank": messages,
        "single_gpu_flops": dry["single_flops"], "flops_per_rank": dry["flops_per_rank"],
        "busiest_rank_compute_share": compute_share, "ideal_compute_share": 1 / ranks,
        "single_gpu_source": source, "estimates": estimates,
    }  # fmt: skip


# ---------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return
    from streamdec.families.wan import WAN22, WanConfig

    work = Path(tempfile.mkdtemp())
    save_model(work / "vae")
    h, w = BENCH["latent"]
    runs = []
    for ranks, threads in [(1, 1), (1, 2), (2, 1)]:
        runs.append(measure(work / "vae", ranks, threads, work))
        print(f"{ranks} process(es) x {threads} thread(s): {runs[-1]['seconds']:.2f} s", flush=True)
    one, two_threads, two_ranks = runs
    video_frames = two_ranks["frames"]
    dry = dry_run("wan2.1", WanConfig(base_dim=BENCH["base_dim"]), (h, w), 2, BENCH["frames"], torch.float32,
                  steady_only=False)  # fmt: skip
    measured_sent = two_ranks["sent_bytes_per_rank"]
    assert dry["sent_bytes_per_rank"] == measured_sent, (dry["sent_bytes_per_rank"], measured_sent)
    results = {
        "machine": machine("cpu"), "device": "cpu", "backend": "gloo",
        "measured": {
            "model": f"Wan 2.1 decoder, base width {BENCH['base_dim']} (released: 96), random weights, fp32",
            "video": f"{w * 8}x{h * 8}, {video_frames} frames ({BENCH['frames']} latent frames)",
            "runs": runs,
            "speedup_2_ranks_vs_1_process_1_thread": one["seconds"] / two_ranks["seconds"],
            "speedup_2_ranks_vs_1_process_2_threads": two_threads["seconds"] / two_ranks["seconds"],
            # wall times suffer when other work shares the cores (see load_average_after); the CPU
            # seconds of the busiest rank are what its wall time would be on a core of its own
            "speedup_cpu_seconds_2_ranks_vs_1_process_1_thread": one["cpu_seconds_per_rank"][0]
            / max(two_ranks["cpu_seconds_per_rank"]),
            "bytes_sent_per_video_frame_per_rank": [{k: v / video_frames for k, v in s.items()} for s in measured_sent],
            "dry_run_bytes_equal_measured": True,
            "compute_share_of_busiest_rank": max(dry["flops_per_rank"]) / dry["single_flops"],
        },
        "paper_8_gpus_720p": [paper("wan2.1", WanConfig(), (90, 160)), paper("wan2.2", WAN22, (45, 80))],
        "links_assumed": {k: v for k, v in LINKS.items()},
        "not_modelled": "overlap of communication with compute (none is done: each exchange waits), the copies "
                        "that grow each conv's input by its halo rows and crop its output (memory-bound, about "
                        "two activation copies per 3x3 conv), NCCL's own launch costs, and rank 0's encoding",
    }  # fmt: skip
    save_results(results, args.out, "distributed")
    m = results["measured"]
    print(f"speed-up, 2 ranks x 1 thread vs 1 process x 1 thread: {m['speedup_2_ranks_vs_1_process_1_thread']:.2f}x "
          f"(vs 1 process x 2 threads: {m['speedup_2_ranks_vs_1_process_2_threads']:.2f}x); in CPU seconds of the "
          f"busiest rank: {m['speedup_cpu_seconds_2_ranks_vs_1_process_1_thread']:.2f}x")  # fmt: skip
    for p in results["paper_8_gpus_720p"]:
        print(f"{p['family']} {p['video']} on 8 GPUs: {p['busiest_link_bytes_per_video_frame'] / 2**20:.1f} MiB per video "
              f"frame on the busiest link, compute share {p['busiest_rank_compute_share']:.3f} (ideal 0.125)")  # fmt: skip
        for link, by_source in p["estimates"].items():
            for name, e in by_source.items():
                print(f"   {link.split(' (')[0]:14s} from {name}: {e['speedup']:.2f}x")


if __name__ == "__main__":
    main()
