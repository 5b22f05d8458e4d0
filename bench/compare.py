"""Benchmark: fmcib against fmcib 1.0.0 (PyPI ``foundation-cancer-image-biomarker``), side by side.

    python bench/compare.py --reference-python /path/to/fmcib100-venv/bin/python
    python bench/compare.py --reference-python ... --workloads large --repeats 3

Both packages extract features for the same generated seeds tables with the same random checkpoint
(the original's ``{"trunk_state_dict": ...}`` layout), each run in a fresh process, alternating
1.0.0, ours, 1.0.0, ours, ... and starting each run only once the machine is idle (other processes
using under 10% of the CPU over one second). Each process times its own extraction call, weight
loading included, imports excluded: 1.0.0's ``fmcib.run.get_features(csv, weights_path=...)`` and our
``fmcib.extract_features(csv, weights=...)``, each with its own defaults. fmcib imports torch, SimpleITK and
MONAI lazily, on first use; its process imports them before the timed call, as 1.0.0's import does (they
cost about 5 s on a 2-core CPU either way, MONAI alone 3.6 s). The parent samples the peak
memory of the whole process tree (PSS summed over the process and its loader workers, every 0.1 s).
Feature agreement is measured on interior seeds (patch entirely inside the scan): the largest absolute
difference, and the cosine between the two packages' vectors after removing the mean feature vector
(a constant offset shared by every patch would otherwise dominate the cosine).

Workloads: ``large`` (2 synthetic CTs 512x512x160, 10 seeds each), ``small`` (the 40 IBSI sarcoma CTs
of ../shared/data, one seed each; 40 synthetic 200x200x60 scans when it is absent) and ``border``
(2 synthetic 512x512x160 CTs, 6 seeds each within 10 mm of an edge: agreement is not compared there,
since fmcib keeps border patches centred where 1.0.0 shifts them).

The reference environment (fmcib 1.0.0's own pins do not resolve on current Python; this works on 3.11):

    python3.11 -m venv ref && . ref/bin/activate
    pip install torch==2.13.0
    pip install --no-deps foundation-cancer-image-biomarker==1.0.0
    pip install torch==2.13.0 torchvision monai SimpleITK "itk>=5.3,<6" loguru tqdm wget "pandas<2.3" \\
        "pydicom<3" "pydicom-seg>=0.4.1,<0.5" "google-cloud-storage>=2.9,<3" "dcmrtstruct2nii>=5,<6" "nibabel>=5.1,<6"

and, when torchvision's index build does not import beside the CPU torch ("operator torchvision::nms does
not exist"), make the ``register_fake("torchvision::nms")`` / ``("torchvision::qnms")`` decorators in
``torchvision/_meta_registrations.py`` conditional on ``torchvision.extension._has_ops()`` (1.0.0 only
uses ``torchvision.transforms.Lambda``); ``--patch-torchvision`` does exactly that in the given environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fmcib.datasets import make_synthetic_ct
from fmcib.models import get_model_config
from fmcib.models.architectures import build_architecture

from extract import SHARED, environment, report  # noqa: E402  (bench/ is the working folder of these scripts)

_RUN = {
    "reference": """
import json, sys, time, numpy as np
from fmcib.run import get_features
t = time.perf_counter()
out = get_features(sys.argv[1], weights_path=sys.argv[2])
seconds = time.perf_counter() - t
np.save(sys.argv[3], out[[f"pred_{i}" for i in range(4096)]].to_numpy(np.float32))
print(json.dumps({"seconds": seconds, "rows": len(out)}))
""",
    "fmcib": """
import json, sys, time, numpy as np
import torch, SimpleITK, monai.networks.nets  # what 1.0.0's own import loads (fmcib imports them lazily)
import fmcib, fmcib.extract, fmcib.models
t = time.perf_counter()
out = fmcib.extract_features(sys.argv[1], weights=sys.argv[2], progress=False)
seconds = time.perf_counter() - t
np.save(sys.argv[3], out.filter(regex=r"^pred_").to_numpy(np.float32))
np.save(sys.argv[3] + ".pad.npy", out["fmcib_padding_fraction"].to_numpy())
print(json.dumps({"seconds": seconds, "rows": len(out)}))
""",
}


def _cpu_times() -> tuple[float, float]:
    with open("/proc/stat") as f:
        values = [float(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def wait_until_idle(busy_max: float = 0.10, timeout_s: float = 300.0) -> float:
    """Wait until other processes use under ``busy_max`` of the CPU over one second; return the share seen."""
    deadline = time.time() + timeout_s
    while True:
        b0, t0 = _cpu_times()
        time.sleep(1.0)
        b1, t1 = _cpu_times()
        busy = (b1 - b0) / max(t1 - t0, 1e-9)
        if busy < busy_max or time.time() > deadline:
            return busy


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def _pss_gb(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        match = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
        total += int(match.group(1)) if match else 0
    return total * 1024 / 1e9


def timed_run(python: str, which: str, csv: Path, weights: Path, out: Path) -> dict[str, float]:
    """Run one package's extraction in a fresh process; its own timing, rows and the tree's peak PSS."""
    # the reference imports its own fmcib: a PYTHONPATH pointing at this one would shadow it
    env = {k: v for k, v in os.environ.items() if not (which == "reference" and k == "PYTHONPATH")}
    proc = subprocess.Popen([python, "-c", _RUN[which], str(csv), str(weights), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _pss_gb(_tree(proc.pid)))
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{which} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_pss_gb"] = peak
    return result


def _synthetic(folder: Path, name: str, scans: int, size: tuple[int, int, int], spacing: tuple[float, float, float],
               seeds: int, border_mm: float | None = None) -> pd.DataFrame:
    frames = []
    for k in range(scans):
        case = make_synthetic_ct(size=size, spacing=spacing, n_lesions=seeds, random_state=100 + k)
        table = case.save(folder, f"{name}{k}")[["image_path", "coordX", "coordY", "coordZ"]]
        if border_mm is not None:  # move each seed to within border_mm of a face of the scan
            rng = np.random.default_rng(k)
            lo = np.array(case.image.TransformIndexToPhysicalPoint((0, 0, 0)))
            hi = np.array(case.image.TransformIndexToPhysicalPoint([n - 1 for n in size]))
            for i in range(len(table)):
                axis = int(rng.integers(3))
                near_low = rng.random() < 0.5
                value = (lo[axis] + rng.uniform(0, border_mm)) if near_low else (hi[axis] - rng.uniform(0, border_mm))
                table.iloc[i, 1 + axis] = value
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def workload_tables(folder: Path, names: list[str]) -> dict[str, tuple[pd.DataFrame, str]]:
    tables: dict[str, tuple[pd.DataFrame, str]] = {}
    if "large" in names:
        tables["large"] = (_synthetic(folder, "large", 2, (512, 512, 160), (0.7, 0.7, 1.25), 10),
                           "2 synthetic CTs 512x512x160 .nii.gz, 10 seeds each")
    if "small" in names:
        if (SHARED / "manifest.csv").is_file():
            m = pd.read_csv(SHARED / "manifest.csv")
            m = m[m.source == "ibsi_sts_ct"].assign(image_path=lambda d: str(SHARED) + "/" + d.image)
            tables["small"] = (m[["image_path", "coordX", "coordY", "coordZ"]].reset_index(drop=True),
                               f"{len(m)} IBSI sarcoma CTs (about 200x200x60), one seed each")
        else:
            tables["small"] = (_synthetic(folder, "small", 40, (200, 200, 60), (1.0, 1.0, 3.0), 1),
                               "40 synthetic CTs 200x200x60 .nii.gz, one seed each")
    if "border" in names:
        tables["border"] = (_synthetic(folder, "border", 2, (512, 512, 160), (0.7, 0.7, 1.25), 6, border_mm=10.0),
                            "2 synthetic CTs 512x512x160 .nii.gz, 6 seeds each within 10 mm of an edge")
    return tables


def agreement(ours: np.ndarray, ref: np.ndarray, interior: np.ndarray) -> dict[str, float]:
    """Max abs difference and the smallest per-row cosine after removing the mean feature, on interior rows."""
    a, b = ours[interior].astype(np.float64), ref[interior].astype(np.float64)
    if len(a) < 2:
        return {"interior_rows": int(len(a))}
    mean = np.concatenate([a, b]).mean(axis=0)
    ca, cb = a - mean, b - mean
    cos = (ca * cb).sum(1) / (np.linalg.norm(ca, axis=1) * np.linalg.norm(cb, axis=1))
    between = ca @ ca.T / np.outer(np.linalg.norm(ca, axis=1), np.linalg.norm(ca, axis=1))
    return {"interior_rows": int(len(a)), "max_abs_diff": float(np.abs(a - b).max()),
            "min_cosine_ours_vs_reference": float(cos.min()),
            "max_cosine_between_different_seeds": float(between[~np.eye(len(a), dtype=bool)].max())}


def patch_torchvision(python: str) -> None:
    """Make torchvision's fake nms/qnms registrations conditional on its compiled ops being loaded."""
    path = Path(subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('torchvision').origin)"],
                               capture_output=True, text=True, check=True).stdout.strip()).parent
    meta = path / "_meta_registrations.py"
    text = meta.read_text()
    for op in ("nms", "qnms"):  # idempotent: a patched line no longer matches
        text = text.replace(f'@torch.library.register_fake("torchvision::{op}")',
                            f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() '
                            f"else (lambda f: f))")
    meta.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-python", required=True, help="interpreter of an environment with fmcib 1.0.0")
    p.add_argument("--workloads", default="large,small,border")
    p.add_argument("--repeats", type=int, default=3, help="alternating pairs of runs")
    p.add_argument("--patch-torchvision", action="store_true", help="apply the import fix described above")
    args = p.parse_args()
    if args.patch_torchvision:
        patch_torchvision(args.reference_python)
    version = subprocess.run([args.reference_python, "-c", "import importlib.metadata as m; "
                              "print(m.version('foundation-cancer-image-biomarker'), m.version('torch'), "
                              "m.version('monai'))"], capture_output=True, text=True, check=True).stdout.split()
    results: dict[str, object] = {**environment(torch.device("cpu")), "reference": f"fmcib {version[0]}",
                                  "reference_torch": version[1], "reference_monai": version[2],
                                  "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats}
    cfg = get_model_config("resnet50_3d.fmcib")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        trunk = build_architecture(cfg.architecture, cfg.model_args).state_dict()
        weights = folder / "model_weights.torch"
        torch.save({"trunk_state_dict": trunk}, weights)  # the original's layout, read by both packages
        del trunk
        for name, (table, description) in workload_tables(folder, args.workloads.split(",")).items():
            csv = folder / f"{name}.csv"
            table.to_csv(csv, index=False)
            runs: dict[str, list[dict[str, float]]] = {"reference": [], "fmcib": []}
            for r in range(args.repeats):
                for which in ("reference", "fmcib"):
                    idle = wait_until_idle()
                    python = args.reference_python if which == "reference" else sys.executable
                    run = timed_run(python, which, csv, weights, folder / f"{name}-{which}.npy")
                    run["busy_before"] = round(idle, 3)
                    runs[which].append(run)
                    print(f"{name} {which} #{r + 1}: {run['seconds']:.1f} s, {run['peak_pss_gb']:.2f} GB", flush=True)
            ours, ref = np.load(folder / f"{name}-fmcib.npy"), np.load(folder / f"{name}-reference.npy")
            interior = np.load(folder / f"{name}-fmcib.npy.pad.npy") == 0
            n = len(table)
            rate = {w: sorted(n / run["seconds"] for run in runs[w]) for w in runs}
            ratios = sorted(a["seconds"] / b["seconds"] for a, b in zip(runs["reference"], runs["fmcib"]))
            results[name] = {
                "workload": description, "seeds": n,
                "reference_seeds_per_s": [round(rate["reference"][0], 3), round(rate["reference"][-1], 3)],
                "fmcib_seeds_per_s": [round(rate["fmcib"][0], 3), round(rate["fmcib"][-1], 3)],
                "speed_up": [round(ratios[0], 2), round(ratios[-1], 2)],
                "reference_seconds": [round(run["seconds"], 2) for run in runs["reference"]],
                "fmcib_seconds": [round(run["seconds"], 2) for run in runs["fmcib"]],
                "reference_peak_pss_gb": [round(min(r["peak_pss_gb"] for r in runs["reference"]), 2),
                                          round(max(r["peak_pss_gb"] for r in runs["reference"]), 2)],
                "fmcib_peak_pss_gb": [round(min(r["peak_pss_gb"] for r in runs["fmcib"]), 2),
                                      round(max(r["peak_pss_gb"] for r in runs["fmcib"]), 2)],
                "busy_before_runs": max(r["busy_before"] for w in runs for r in runs[w]),
                **({} if name == "border" else agreement(ours, ref, interior)),
            }
    report(results, "compare", torch.device("cpu"))


if __name__ == "__main__":
    main()
