"""Benchmark: a fine-tuning step (forward + backward + SGD update of every layer) against the bare forward.

    python bench/finetune.py                                   # resnet10_3d.random, batch 8, CPU
    python bench/finetune.py --model resnet50_3d.random --device cuda --batch-size 32 --precision bf16

Both are measured in one process on the same random patches (after a warm-up), interleaved ``--repeats``
times, median kept: samples/s of each, their ratio, and peak memory (CUDA: ``max_memory_allocated``;
CPU: the process's peak resident set).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time

import numpy as np
import torch

from fmcib.models import create_model, resolve_device
from fmcib.models.heads import new_head
from fmcib.training import Classifier

from extract import environment, report  # noqa: E402  (bench/ is the working folder of these scripts)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def timed(fn, batches: int, device: torch.device) -> float:
    """Seconds for ``batches`` calls of ``fn`` (device synchronised)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet10_3d.random")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = p.parse_args()
    device = resolve_device(args.device)
    encoder = create_model(args.model, pretrained=False, device=device)
    contract, d = encoder.fmcib_config.preprocess, encoder.fmcib_config.num_features
    model = Classifier(encoder, new_head(d, 2)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.rand(args.batch_size, *contract.input_shape, device=device) * 0.4 + 0.2
    y = torch.randint(0, 2, (args.batch_size,), device=device)

    def forward() -> None:
        model.eval()
        with torch.inference_mode(), autocast(device, args.precision):
            model.encoder(x)

    def train_step() -> None:
        model.train()
        with autocast(device, args.precision):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rates: dict[str, list[float]] = {"forward": [], "train_step": []}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.repeats):
        for name, fn in (("forward", forward), ("train_step", train_step)):
            rates[name].append(args.batch_size * args.batches / timed(fn, args.batches, device))
    fwd, step = float(np.median(rates["forward"])), float(np.median(rates["train_step"]))
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    report({**environment(device), "model": args.model, "patch": contract.describe(), "batch_size": args.batch_size,
            "precision": args.precision, "forward_samples_per_s": round(fwd, 2),
            "train_step_samples_per_s": round(step, 2), "train_step_vs_forward": round(step / fwd, 3),
            "peak_memory_gib": round(peak, 2), "peak_memory_kind": "cuda allocated" if device.type == "cuda"
            else "process max RSS"}, "finetune", device)


if __name__ == "__main__":
    main()
