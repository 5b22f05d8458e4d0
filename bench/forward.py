"""Benchmark: the encoder's bare forward in its variants, and its FLOP rate against the CPU's peak.

    python bench/forward.py                       # resnet50_3d.random, batch 8, CPU
    python bench/forward.py --device cuda --batch-size 32

Variants, measured interleaved in one process (default, channels_last_3d, bf16 autocast, then again,
``--repeats`` times; the median of each is kept): patches/s, and the cosine of each variant's features
to the default fp32 forward on the same patches (the agreement that matters for extracted features).
On a CPU, bf16 autocast is timed on one patch, once: without native bf16 instructions it takes tens of
seconds per patch.
The FLOPs of one patch are counted with ``torch.utils.flop_counter`` (a multiply-add counts 2); the
CPU peak is cores x clock x FP32 FLOPs per cycle (32 with AVX2 + FMA, 64 with AVX-512), read from
/proc/cpuinfo unless ``--peak-gflops`` gives it.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

from fmcib.models import create_model, resolve_device

from extract import environment, report  # noqa: E402  (bench/ is the working folder of these scripts)

VARIANTS = ("fp32", "fp32_channels_last_3d", "bf16_autocast")


def cpu_peak_gflops() -> tuple[float, str]:
    """FP32 peak of the cores torch uses (GFLOP/s) and how it was derived; NaN when unknown."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return float("nan"), "unknown (no /proc/cpuinfo)"
    flags = set(re.search(r"^flags\s*:(.*)$", info, re.M).group(1).split())
    mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M).group(1))
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16
    cores = torch.get_num_threads()
    return cores * mhz / 1e3 * per_cycle, f"{cores} cores x {mhz / 1e3:.2f} GHz x {per_cycle} FP32 FLOP/cycle"


def flops_per_patch(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """FLOPs of one forward of one patch (multiply-add = 2), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, *shape, device=device))
    return float(counter.get_total_flops())


def run_variant(model: torch.nn.Module, x: torch.Tensor, variant: str, batches: int) -> tuple[float, torch.Tensor]:
    """Patches/s of one variant over ``batches`` batches (after one warm-up) and its features of ``x``."""
    device = x.device
    fmt = torch.channels_last_3d if variant == "fp32_channels_last_3d" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    inp = x.contiguous(memory_format=fmt)

    def step() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                     enabled=variant == "bf16_autocast"):
            out = model(inp).float()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    features = step()
    t = time.perf_counter()
    for _ in range(batches):
        step()
    return batches * x.shape[0] / (time.perf_counter() - t), features.cpu()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50_3d.random")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=4, help="timed batches per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--peak-gflops", type=float, default=None, help="the device's FP32 peak, if known")
    args = p.parse_args()
    device = resolve_device(args.device)
    model = create_model(args.model, pretrained=False, device=device)
    contract = model.fmcib_config.preprocess
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, *contract.input_shape, device=device) * 0.4 + 0.2  # CT-like range (HU -400..800)
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    reference = None
    cosines: dict[str, float] = {}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            if variant == "bf16_autocast" and device.type == "cpu":
                if rates[variant]:
                    continue  # tens of seconds per patch on CPUs without native bf16: one patch, once
                rate, feats = run_variant(model, x[:1], variant, 1)
                feats = torch.cat([feats, torch.full((len(x) - 1, feats.shape[1]), float("nan"))])
                rates[variant].append(rate)
                cosines[variant] = torch.nn.functional.cosine_similarity(feats[:1], reference[:1], dim=1).item()
                print(f"{variant}: {rate:.3f} patches/s (one patch)", flush=True)
                continue
            rate, feats = run_variant(model, x, variant, args.batches)
            rates[variant].append(rate)
            print(f"{variant}: {rate:.3f} patches/s", flush=True)
            if variant == "fp32":
                reference = feats
            else:
                cos = torch.nn.functional.cosine_similarity(feats, reference, dim=1).min().item()
                cosines[variant] = min(cosines.get(variant, 1.0), cos)
    flops = flops_per_patch(model.to(memory_format=torch.contiguous_format), contract.input_shape)
    peak, how = (args.peak_gflops, "given") if args.peak_gflops else (
        cpu_peak_gflops() if device.type == "cpu" else (float("nan"), "unknown"))
    median = {v: float(np.median(r)) for v, r in rates.items()}
    results: dict[str, object] = {**environment(device), "model": args.model, "batch_size": args.batch_size,
                                  "patch": contract.describe(), "gflop_per_patch": round(flops / 1e9, 2)}
    for v in VARIANTS:
        results[v] = {"patches_per_s": round(median[v], 3), "all_repeats": [round(r, 3) for r in rates[v]],
                      "vs_fp32": round(median[v] / median["fp32"], 3),
                      "achieved_gflops": round(median[v] * flops / 1e9, 1)}
        if v in cosines:
            results[v]["min_cosine_to_fp32"] = cosines[v]
    results["peak_gflops"] = round(peak, 1)
    results["peak_derivation"] = how
    results["fp32_share_of_peak"] = round(median["fp32"] * flops / 1e9 / peak, 3) if peak == peak else None
    report(results, "forward", device)


if __name__ == "__main__":
    main()
