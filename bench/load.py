"""Benchmark: loading the full-size encoder from a local fmcib folder, against a plain build-then-copy load.

    python bench/load.py

Writes random weights of ``resnet50_3d.fmcib`` in fmcib's Hub layout to a temporary folder, then, each
in a fresh process: ``fmcib.create_model(weights=folder)`` (architecture built on the meta device, the
checkpoint's tensors assigned) and the reference (architecture built with its random initialisation,
``load_state_dict`` copying into it), three times each, interleaved. Prints the median seconds (fmcib's
include the SHA-256 of the file, recorded as provenance), the resident memory added after the load and
after one forward pass (memory-mapped weights become resident when the forward reads them), and the
process's peak resident memory (Linux only: /proc/self/statm).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import torch

from fmcib.models import get_model_config
from fmcib.models.architectures import build_architecture
from fmcib.models.checkpoints import save_hub_layout

from extract import environment, report  # noqa: E402  (bench/ is the working folder of these scripts)

_TIMED = """
import json, resource, sys, time
import torch, monai.networks.nets, safetensors.torch
import fmcib.models as M
from fmcib.models.architectures import build_architecture
def rss_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e9
before = rss_gb()
t = time.perf_counter()
if sys.argv[2] == "fmcib_create_model":
    model = M.create_model("resnet50_3d.fmcib", weights=sys.argv[1], device="cpu")
else:
    cfg = M.get_model_config("resnet50_3d.fmcib")
    model = build_architecture(cfg.architecture, cfg.model_args).eval()
    model.load_state_dict(safetensors.torch.load_file(sys.argv[1] + "/model.safetensors"), strict=True)
seconds = time.perf_counter() - t
loaded = rss_gb() - before
with torch.inference_mode():
    model(torch.zeros(1, 1, 50, 50, 50))
used = rss_gb() - before
print(json.dumps({"seconds": round(seconds, 2), "rss_added_after_load_gb": round(loaded, 2),
                  "rss_added_after_one_forward_gb": round(used, 2),
                  "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)}))
"""


def main() -> None:
    cfg = get_model_config("resnet50_3d.fmcib")
    with torch.device("meta"):
        model = build_architecture(cfg.architecture, cfg.model_args)
    model = model.to_empty(device="cpu")
    for t in model.state_dict().values():
        t.normal_() if t.is_floating_point() else t.zero_()
    results: dict[str, object] = environment(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        save_hub_layout(cfg, model.state_dict(), tmp)
        del model
        ways = ("reference_build_then_copy", "fmcib_create_model")
        runs: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
        for _ in range(3):  # interleaved; the median run of each is kept
            for way in ways:
                out = subprocess.run([sys.executable, "-c", _TIMED, tmp, way], capture_output=True, text=True,
                                     check=True)
                runs[way].append(json.loads(out.stdout))
    for way in ways:
        results[way] = sorted(runs[way], key=lambda r: r["seconds"])[1]
    results["speed_up"] = round(results[ways[0]]["seconds"] / results[ways[1]]["seconds"], 2)
    report(results, "load", torch.device("cpu"))


if __name__ == "__main__":
    main()
