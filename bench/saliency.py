"""Benchmark: smooth guided backpropagation on the full-size encoder, against its bare forward.

    python bench/saliency.py                 # CPU, 5 noisy samples
    python bench/saliency.py --device cuda --n-samples 25

Prints seconds per saliency map (``n_samples`` forward+backward passes of one patch), seconds per
noisy sample as a multiple of one bare forward of one patch, and peak resident memory (and peak GPU
memory on CUDA); writes the figures as JSON to bench/out/.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fmcib.models import create_model, resolve_device
from fmcib.saliency import EncoderWithHead, smooth_guided_backprop

from extract import environment, peak_rss_gb, report  # noqa: E402  (bench/ is the working folder of these scripts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-samples", type=int, default=5)
    p.add_argument("--device", default=None)
    args = p.parse_args()

    device = resolve_device(args.device)
    encoder = create_model("resnet50_3d.random", pretrained=False, device=device)
    scorer = EncoderWithHead(encoder, torch.nn.Linear(4096, 1).to(device)).eval()
    patch = np.random.default_rng(0).random((50, 50, 50), dtype=np.float32)
    x = torch.from_numpy(patch)[None, None].to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        scorer(x)
        sync()
        t = time.perf_counter()
        for _ in range(3):
            scorer(x)
        sync()
        forward_s = (time.perf_counter() - t) / 3
    smooth_guided_backprop(scorer, patch, n_samples=1)  # warm-up
    sync()
    t = time.perf_counter()
    smooth_guided_backprop(scorer, patch, n_samples=args.n_samples)
    sync()
    map_s = time.perf_counter() - t
    results: dict[str, object] = {
        **environment(device), "n_samples": args.n_samples,
        "seconds_per_map": round(map_s, 3), "seconds_per_map_at_25_samples": round(map_s / args.n_samples * 25, 2),
        "bare_forward_seconds_per_patch": round(forward_s, 4),
        "sample_cost_in_bare_forwards": round(map_s / args.n_samples / forward_s, 2),
        "peak_rss_gb": round(peak_rss_gb(), 2),
    }
    if device.type == "cuda":
        results["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    report(results, "saliency", device)


if __name__ == "__main__":
    main()
