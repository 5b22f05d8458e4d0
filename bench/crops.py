"""Benchmark: memory and time of reading training crops, in memory and in a crop store (fmcib.training.crops).

    python bench/crops.py                 # 32 synthetic scans, 4 lesions each, 50^3 patches + 10-voxel margin
    python bench/crops.py --scans 8       # quicker

Each case runs in a fresh process, one after the other; the peak resident memory it adds (getrusage's
maximum RSS, less the same process's maximum after its imports) and its seconds are printed with their
ratios to the in-memory read:
- ``reference``: the crops collected per scan in a list, then concatenated (fmcib before 2026-12-03);
- ``memory``: ``read_crops`` in memory (one array filled in place);
- ``store, first``: ``read_crops(store=DIR)``: reads the scans into the memory-mapped file;
- ``store, reused``: the same call again: the store matches, no scan is read.
Also printed: the process's resident memory at the end, while it holds the crops, split into anonymous
memory (its own) and file-backed pages (a store's, written or read: the operating system's file cache, which
other processes share and the system can reclaim). A reused store's crops are not touched here; training
touches them a batch at a time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("reference", "memory", "store, first", "store, reused")


def peak_mb() -> float:
    """This process's maximum resident memory so far, MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb() -> dict[str, float]:
    """This process's resident memory now, MB: anonymous (its own heap) and file-backed (mapped files, which
    the operating system can write back and reclaim); Linux only, empty elsewhere."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    fields = {line.split(":")[0]: line.split()[1] for line in lines if line.startswith(("RssAnon", "RssFile"))}
    return {f"{k[3:].lower()}_mb": round(int(v) / 1024, 1) for k, v in fields.items()}


def run_case(case: str, data: Path) -> dict[str, float]:
    """One case, in this process (called by the driver in a fresh one)."""
    import numpy as np
    import pandas as pd
    import torch

    from fmcib.preprocessing import PreprocessConfig
    from fmcib.scans import ScanDataset, plan_scans
    from fmcib.training import read_crops

    torch.set_num_threads(2)
    table = pd.read_csv(data / "seeds.csv")
    config = PreprocessConfig(patch_size=50, spacing_mm=1.0)
    margin = 10  # the paper's fine-tuning shifts
    baseline = peak_mb()
    started = time.perf_counter()
    if case == "reference":
        single = PreprocessConfig(**{**config.enlarged(margin).to_dict(), "channels": 1})
        parts = [item["patches"][:, 0] for item in ScanDataset(plan_scans(table), "lps", single)]
        crops = np.concatenate(parts)
        del parts
    else:
        store = data / "store" if case.startswith("store") else None
        _, crops, _ = read_crops(table, config, margin=margin, store=store)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "added_mb": round(peak_mb() - baseline, 1),
            "crops_mb": round(crops.nbytes / 2**20, 1), "crops": len(crops), **resident_mb()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scans", type=int, default=32)
    p.add_argument("--lesions", type=int, default=4)
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.data)))
        return
    import pandas as pd

    from fmcib.datasets import make_synthetic_ct

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        frames = [make_synthetic_ct(size=(160, 160, 60), spacing=(0.8, 0.8, 2.0), n_lesions=args.lesions,
                                    random_state=k).save(data, f"case{k}") for k in range(args.scans)]
        pd.concat(frames, ignore_index=True).to_csv(data / "seeds.csv", index=False)
        results = {}
        for case in CASES:
            out = subprocess.run([sys.executable, __file__, "--case", case, "--data", str(data)], check=True,
                                 capture_output=True, text=True).stdout
            results[case] = json.loads(out.strip().splitlines()[-1])
    memory = results["memory"]
    print(f"{memory['crops']} crops of 70^3 voxels, {memory['crops_mb']:.0f} MB in all")
    print(f"{'case':<15} {'seconds':>8} {'x memory':>9} {'peak added MB':>14} {'x crops':>8} {'anon MB':>8} "
          f"{'file MB':>8}")
    for case, r in results.items():
        print(f"{case:<15} {r['seconds']:>8.2f} {r['seconds'] / memory['seconds']:>9.2f} {r['added_mb']:>14.0f} "
              f"{r['added_mb'] / memory['crops_mb']:>8.2f} {r.get('anon_mb', float('nan')):>8.0f} "
              f"{r.get('file_mb', float('nan')):>8.0f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
