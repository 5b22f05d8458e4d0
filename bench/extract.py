"""Benchmark: end-to-end extraction vs the bare encoder forward, measured in one run.

    python bench/extract.py                      # synthetic 512x512x200 scans + ../shared/data if present
    python bench/extract.py --scans 4 --seeds-per-scan 8 --device cuda --precision bf16
    python bench/extract.py --suffix .nii --no-shared    # uncompressed scans: reading costs almost nothing
    python bench/extract.py --suffix dicom --no-shared   # DICOM series folders (one file per slice)
    python bench/extract.py --threads 1 --num-workers 1  # encoder on one core, the loader on the other

Prints seeds/s end to end (reading, patching, forward), bare-forward patches/s with the same model,
batch size and threads, their ratio, and peak resident memory; writes the figures as JSON to bench/out/.
These are marginal rates: the encoder is loaded once, before the timed calls. A whole call pays a
fixed cost on top (resolving and hashing the weights, building the encoder, starting the loader, the
first forward): ``whole_call`` times ``fmcib.extract_features(csv, weights=folder)`` in fresh processes,
imports included (what a command-line call pays), for one seed and for the whole synthetic table, with a
breakdown of the fixed cost by phase, the weights digest cold (first run on a file) and warm (cached).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import fmcib
from fmcib.datasets import make_synthetic_ct, write_dicom_series
from fmcib.models import create_model, resolve_device

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def peak_rss_gb() -> float:
    """Peak resident memory of this process and its finished children (GB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) * 1024 / 1e9  # Linux reports KiB


def environment(device: torch.device) -> dict[str, str]:
    """Machine, threads, device and versions, recorded with every benchmark result."""
    gpu = f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""
    return {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {device}{gpu}",
            "torch": torch.__version__, "fmcib": fmcib.__version__}


def report(results: dict[str, object], name: str, device: torch.device) -> None:
    """Print the results and keep a JSON copy in bench/out/."""
    text = json.dumps(results, indent=1)
    print(text)
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / f"{name}-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text)


def bare_forward(model: torch.nn.Module, batch_size: int, n_patches: int, precision: str) -> float:
    """Patches/s of the encoder alone on random patches already in memory (after one warm-up batch)."""
    device = next(model.parameters()).device
    x = torch.rand(batch_size, *model.fmcib_config.preprocess.input_shape, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    def step() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model(x).float().cpu()
    step()
    batches = max(1, n_patches // batch_size)
    t = time.perf_counter()
    for _ in range(batches):
        step()
    return batches * batch_size / (time.perf_counter() - t)


def timed_extract(table: pd.DataFrame, model: torch.nn.Module, args: argparse.Namespace) -> float:
    t = time.perf_counter()
    out = fmcib.extract_features(table, model=model, batch_size=args.batch_size, num_workers=args.num_workers,
                                 precision=args.precision, progress=False)
    elapsed = time.perf_counter() - t
    assert len(out) == len(table), "every benchmark seed must succeed"
    return len(table) / elapsed


def compare(table: pd.DataFrame, model: torch.nn.Module, args: argparse.Namespace) -> dict[str, float]:
    """End-to-end vs bare forward, interleaved: bare, e2e, bare, e2e, ..., bare.

    Each repeat's ratio divides its end-to-end rate by the mean of the bare rates measured just before
    and just after it, so drifts in machine speed (shared CPUs) cancel; the median repeat is reported.
    """
    bare = [bare_forward(model, args.batch_size, len(table), args.precision)]
    e2e, ratios = [], []
    for _ in range(args.repeats):
        e2e.append(timed_extract(table, model, args))
        bare.append(bare_forward(model, args.batch_size, len(table), args.precision))
        ratios.append(e2e[-1] / ((bare[-2] + bare[-1]) / 2))
    mid = int(np.argsort(ratios)[len(ratios) // 2])
    return {"end_to_end_seeds_per_s": round(e2e[mid], 3),
            "bare_forward_patches_per_s": round((bare[mid] + bare[mid + 1]) / 2, 3),
            "ratio": round(ratios[mid], 3), "ratios_all_repeats": [round(r, 3) for r in ratios]}


_WHOLE_CALL = """
import json, sys, time
t = time.perf_counter()  # imports included: what a command-line call pays
import fmcib
out = fmcib.extract_features(sys.argv[1], weights=sys.argv[2], progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "rows": len(out)}))
"""

_PHASES = """
import json, sys, time
times, t = {}, time.perf_counter()
def lap(name):
    global t
    now = time.perf_counter(); times[name] = round(now - t, 3); t = now
import torch; lap("import_torch")
import SimpleITK, monai.networks.nets; lap("import_monai_simpleitk")
from fmcib.models import build_model, resolve_weights
resolved = resolve_weights(weights=sys.argv[1]); lap("resolve_config")
resolved.sha256; lap("weights_sha256")
model = build_model(resolved, device="cpu", memory_format=torch.channels_last_3d); lap("build_and_load")
x = torch.zeros(1, 1, 50, 50, 50).contiguous(memory_format=torch.channels_last_3d)
with torch.inference_mode():
    model(x); lap("first_forward_1_patch")
    model(x); lap("next_forward_1_patch")
print(json.dumps(times))
"""


def _fresh(code: str, *argv: str) -> dict[str, float]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def whole_call(table: pd.DataFrame, folder: Path, marginal_seeds_per_s: float, repeats: int) -> dict[str, object]:
    """Whole ``extract_features`` calls in fresh processes (weights loaded from ``folder``) and their fixed cost."""
    from fmcib.models import get_model_config
    from fmcib.models.architectures import build_architecture
    from fmcib.models.checkpoints import save_hub_layout

    cfg = get_model_config("resnet50_3d.fmcib")
    weights = folder / "weights"
    torch.manual_seed(0)
    save_hub_layout(cfg, build_architecture(cfg.architecture, cfg.model_args).state_dict(), weights)
    one, full = folder / "one.csv", folder / "all.csv"
    table.iloc[:1].to_csv(one, index=False)
    table.to_csv(full, index=False)
    cold = _fresh(_PHASES, str(weights))  # first use of this weights file: its digest is computed
    warm = [_fresh(_PHASES, str(weights)) for _ in range(repeats)]
    one_s = sorted(_fresh(_WHOLE_CALL, str(one), str(weights))["seconds"] for _ in range(repeats))
    full_s = sorted(_fresh(_WHOLE_CALL, str(full), str(weights))["seconds"] for _ in range(repeats))
    median = {k: float(np.median([w[k] for w in warm])) for k in warm[0]}
    return {"one_seed_call_s": round(one_s[len(one_s) // 2], 2),
            "fixed_cost_s": round(one_s[len(one_s) // 2] - 1 / marginal_seeds_per_s, 2),
            f"whole_call_{len(table)}_seeds_per_s": round(len(table) / full_s[len(full_s) // 2], 3),
            "marginal_seeds_per_s": round(marginal_seeds_per_s, 3),
            "phases_first_run_on_the_file_s": cold, "phases_s": median}


def synthetic_table(folder: Path, scans: int, seeds_per_scan: int, suffix: str = ".nii.gz") -> pd.DataFrame:
    frames = []
    for k in range(scans):
        case = make_synthetic_ct(size=(512, 512, 200), spacing=(0.7, 0.7, 1.25), n_lesions=seeds_per_scan,
                                 random_state=k)
        if suffix == "dicom":  # a series folder, one file per slice
            write_dicom_series(case.image, folder / f"scan{k}_dicom")
            frames.append(case.seeds.assign(image_path=str(folder / f"scan{k}_dicom")))
        else:
            frames.append(case.save(folder, f"scan{k}", suffix=suffix))
    return pd.concat(frames, ignore_index=True)[["image_path", "coordX", "coordY", "coordZ"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scans", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="interleaved end-to-end/bare measurements (median kept)")
    p.add_argument("--seeds-per-scan", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--suffix", default=".nii.gz", choices=[".nii.gz", ".nii", ".mha", ".nrrd", "dicom"],
                   help="file format of the synthetic scans (.nii.gz: compressed, the common case)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-shared", action="store_true", help="skip ../shared/data")
    p.add_argument("--no-whole-call", action="store_true", help="skip the whole-call / fixed-cost measurement")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    model = create_model("resnet50_3d.random", pretrained=False, device=device)
    results: dict[str, object] = {**environment(device), "batch_size": args.batch_size,
                                   "num_workers": args.num_workers, "precision": args.precision}
    with tempfile.TemporaryDirectory() as tmp:
        table = synthetic_table(Path(tmp), args.scans, args.seeds_per_scan, args.suffix)
        results["synthetic"] = {"scans": args.scans, "seeds": len(table), "scan": f"512x512x200 int16 {args.suffix}",
                                **compare(table, model, args)}
        if not args.no_whole_call and device.type == "cpu":
            results["whole_call"] = whole_call(table, Path(tmp), results["synthetic"]["end_to_end_seeds_per_s"],
                                               args.repeats)
    if not args.no_shared and (SHARED / "manifest.csv").is_file():
        manifest = pd.read_csv(SHARED / "manifest.csv")
        table = manifest[manifest.source == "ibsi_sts_ct"].assign(image_path=lambda d: str(SHARED) + "/" + d.image)
        table = table[["image_path", "coordX", "coordY", "coordZ"]].reset_index(drop=True)
        results["shared_sts"] = {"scans": len(table), "seeds": len(table), **compare(table, model, args)}
    results["peak_rss_gb"] = round(peak_rss_gb(), 2)
    report(results, "extract", device)


if __name__ == "__main__":
    main()
