"""The fmcib command line: exit codes, errors file, atomic output, kill + resume, seeds, models, weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from click.testing import CliRunner

from conftest import random_trunk, tiny_config
from fmcib import __version__
from fmcib.cli import main
from fmcib.io import read_table_metadata
from fmcib.runs import partial_dir


def _cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _many_rows(synthetic_cases: pd.DataFrame, n: int) -> pd.DataFrame:
    base = synthetic_cases[["image_path", "coordX", "coordY", "coordZ", "label"]]
    reps = pd.concat([base] * (n // len(base) + 1), ignore_index=True).iloc[:n].copy()
    jitter = np.random.default_rng(5).uniform(-2, 2, size=(n, 3))
    reps[["coordX", "coordY", "coordZ"]] += jitter
    reps["lesion_id"] = [f"L{i:03d}" for i in range(n)]
    return reps


def test_extract_writes_good_rows_errors_file_and_exit_3(synthetic_cases, tiny_model_dir, tmp_path):
    table = synthetic_cases[["image_path", "coordX", "coordY", "coordZ"]].iloc[:4].copy()
    table.loc[len(table)] = [str(tmp_path / "missing.nii.gz"), 0.0, 0.0, 0.0]
    table.to_csv(tmp_path / "seeds.csv", index=False)
    result = _cli("extract", "--csv", str(tmp_path / "seeds.csv"), "--out", str(tmp_path / "f.csv"),
                  "--weights", str(tiny_model_dir), "--num-workers", "0", "--no-progress")
    assert result.exit_code == 3, result.output
    out = pd.read_csv(tmp_path / "f.csv")
    assert len(out) == 4 and list(out.columns[-2:]) == ["fmcib_padding_fraction", "fmcib_warning"]
    errors = pd.read_csv(tmp_path / "f.errors.csv")
    assert errors.fmcib_row.tolist() == [4] and "missing.nii.gz" in errors.fmcib_error[0]
    meta = read_table_metadata(tmp_path / "f.csv")
    assert meta["provenance"]["fmcib_version"] == __version__ and len(meta["row_keys"]) == 4
    assert not partial_dir(tmp_path / "f.csv").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_table_without_required_columns_fails_before_any_work(tmp_path):
    pd.DataFrame({"image_path": ["x.nii.gz"], "x": [1]}).to_csv(tmp_path / "t.csv", index=False)
    # No weights exist anywhere offline: the column check must come first.
    result = CliRunner().invoke(main, ["extract", "--csv", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o.csv")])
    assert result.exit_code == 1
    assert "missing column(s) ['coordX', 'coordY', 'coordZ']" in result.output
    assert not (tmp_path / "o.csv").exists()


def test_sigkill_then_resume_equals_uninterrupted_run(synthetic_cases, tiny_model_dir, tmp_path):
    _many_rows(synthetic_cases, 90).to_csv(tmp_path / "seeds.csv", index=False)
    args = ["--csv", str(tmp_path / "seeds.csv"), "--weights", str(tiny_model_dir), "--batch-size", "1",
            "--num-workers", "0", "--no-progress"]
    full = tmp_path / "full.parquet"
    assert _cli("extract", *args, "--out", str(full)).exit_code == 0

    out = tmp_path / "resumed.parquet"
    cmd = [sys.executable, "-m", "fmcib", "extract", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial_dir(out).glob("chunk-*.npz"))) < 5:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    chunks = len(list(partial_dir(out).glob("chunk-*.npz")))
    assert not out.exists() and 5 <= chunks < 90, "the run was not interrupted mid-way"

    result = _cli("extract", *args, "--out", str(out), "--resume")
    assert result.exit_code == 0, result.output
    assert f"({chunks} reused)" in result.output  # batch size 1: one saved row per chunk
    a, b = pd.read_parquet(full), pd.read_parquet(out)
    pd.testing.assert_frame_equal(a.drop(columns=a.filter(like="pred_").columns),
                                  b.drop(columns=b.filter(like="pred_").columns))
    np.testing.assert_allclose(b.filter(like="pred_").to_numpy(), a.filter(like="pred_").to_numpy(), rtol=1e-5, atol=1e-6)
    # Resuming a finished run recomputes nothing and keeps the output.
    again = _cli("extract", *args, "--out", str(out), "--resume")
    assert again.exit_code == 0 and "(90 reused)" in again.output
    pd.testing.assert_frame_equal(pd.read_parquet(out), b)


def test_resume_refuses_output_made_with_other_weights(synthetic_cases, tiny_model_dir, tmp_path):
    from fmcib.models.checkpoints import save_hub_layout

    synthetic_cases[["image_path", "coordX", "coordY", "coordZ"]].iloc[:2].to_csv(tmp_path / "s.csv", index=False)
    other = tmp_path / "other"
    save_hub_layout(tiny_config(), random_trunk(tiny_config(), seed=99), other)
    base = ["extract", "--csv", str(tmp_path / "s.csv"), "--out", str(tmp_path / "f.parquet"), "--num-workers", "0"]
    assert _cli(*base, "--weights", str(tiny_model_dir)).exit_code == 0
    result = CliRunner().invoke(main, [*base, "--weights", str(other), "--resume"])
    assert result.exit_code == 1 and "different settings (weights_sha256)" in result.output


def test_patch_size_override_for_large_lesions(synthetic_cases, tiny_model_dir, tmp_path, caplog):
    import logging

    from fmcib import extract_features, preprocess
    from fmcib.models import create_model

    table = synthetic_cases[["image_path", "coordX", "coordY", "coordZ"]].iloc[:3]
    with caplog.at_level(logging.WARNING, logger="fmcib.extract"):
        out = extract_features(table, weights=tiny_model_dir, num_workers=0, progress=False, patch_size=64,
                               spacing_mm=1.5)
    assert "patch contract overridden" in caplog.text
    assert out.attrs["fmcib"]["preprocess"]["patch_size"] == 64 and out.attrs["fmcib"]["preprocess"]["spacing_mm"] == 1.5
    model = create_model(weights=tiny_model_dir, device="cpu")
    with torch.inference_mode():
        for i, rec in table.iterrows():  # the public preprocess() with the same contract is the reference
            patch = preprocess(rec.image_path, rec[["coordX", "coordY", "coordZ"]], size=64, spacing=1.5)
            assert patch.shape == (1, 64, 64, 64)
            np.testing.assert_allclose(out.filter(like="pred_").iloc[i], model(patch[None])[0].numpy(),
                                       rtol=1e-4, atol=1e-5)

    table.to_csv(tmp_path / "s.csv", index=False)
    base = ["extract", "--csv", str(tmp_path / "s.csv"), "--out", str(tmp_path / "f.parquet"), "--num-workers", "0",
            "--weights", str(tiny_model_dir), "--no-progress"]
    assert _cli(*base, "--patch-size", "64").exit_code == 0
    assert read_table_metadata(tmp_path / "f.parquet")["provenance"]["preprocess"]["patch_size"] == 64
    result = CliRunner().invoke(main, [*base, "--resume"])  # the default contract is another setting
    assert result.exit_code == 1 and "different settings (preprocess)" in result.output


def test_seeds_models_convert_and_version(tmp_path):
    import SimpleITK as sitk

    labels = np.zeros((10, 20, 20), np.uint8)
    labels[2:4, 2:5, 2:5] = 1
    labels[6:9, 12:16, 12:16] = 1
    mask = sitk.GetImageFromArray(labels)
    sitk.WriteImage(mask, str(tmp_path / "m.nrrd"))
    result = _cli("seeds", "--mask", str(tmp_path / "m.nrrd"), "--image", "ct.nrrd", "--components",
                  "--out", str(tmp_path / "s.csv"))
    assert result.exit_code == 0, result.output
    seeds = pd.read_csv(tmp_path / "s.csv")
    assert len(seeds) == 2 and set(seeds.image_path) == {"ct.nrrd"}
    np.testing.assert_allclose(sorted(seeds.coordX), sorted([3.0, 13.5]))

    listing = _cli("models")
    assert listing.exit_code == 0 and "resnet50_3d.fmcib\t4096 features" in listing.output

    cfg = tiny_config()
    torch.save({"state_dict": {f"model.trunk.{k}": v for k, v in random_trunk(cfg).items()}}, tmp_path / "w.ckpt")
    bad = CliRunner().invoke(main, ["weights", "convert", str(tmp_path / "w.ckpt"), str(tmp_path / "hub")])
    assert bad.exit_code == 1 and "missing keys" in bad.output  # tiny weights do not fit the default architecture
    from fmcib.models import register_model

    register_model(cfg, overwrite=True)  # only this process: convert into the tiny architecture
    assert _cli("weights", "convert", str(tmp_path / "w.ckpt"), str(tmp_path / "hub"), "--model", cfg.name).exit_code == 0
    assert (tmp_path / "hub" / "model.safetensors").is_file()
    assert _cli("--version").output.strip().endswith(__version__)


def test_import_is_light():
    code = "import sys, fmcib; heavy = [m for m in ('torch', 'monai', 'SimpleITK', 'huggingface_hub') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_example_script_runs_offline():
    script = Path(__file__).resolve().parents[1] / "examples" / "extract_example.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert "STS_019_x+10" in done.stdout and "wrote" in done.stdout


def test_shards_are_whole_scans_balanced_by_seed_count():
    from fmcib.scans import ScanTask, SeedRow, shard_scans

    sizes = [5, 1, 3, 3, 2, 1]
    row = iter(range(100))
    tasks = [ScanTask(f"s{i}", None, tuple(SeedRow(next(row)) for _ in range(n))) for i, n in enumerate(sizes)]
    shards = shard_scans(tasks, 2)
    assert sorted(t.image for shard in shards for t in shard) == sorted(t.image for t in tasks)  # each scan once
    assert [sum(len(t.seeds) for t in s) for s in shards] == [8, 7]  # 5+2+1 | 3+3+1: greedy, largest first
    assert [[t.image for t in s] for s in shards] == [["s0", "s4", "s5"], ["s1", "s2", "s3"]]  # table order kept
    assert shard_scans(tasks[:1], 3)[1:] == [[], []]  # more processes than scans: the others idle


def _torchrun(*args: str, nproc: int = 2, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "fmcib", *args]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _parent_pid(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_torchrun_extract_shards_scans_and_writes_the_single_process_table(synthetic_cases, tiny_model_dir,
                                                                           tmp_path):
    table = _many_rows(synthetic_cases, 36)
    table.loc[len(table)] = [str(tmp_path / "missing.nii.gz"), 0.0, 0.0, 0.0, 1, "L999"]  # a failing row
    table.to_csv(tmp_path / "seeds.csv", index=False)
    args = ["--csv", str(tmp_path / "seeds.csv"), "--weights", str(tiny_model_dir), "--batch-size", "1",
            "--num-workers", "0", "--no-progress", "--device", "cpu"]
    one = tmp_path / "one.csv"
    torch.set_num_threads(1)  # as each torchrun process runs
    assert _cli("extract", *args, "--out", str(one)).exit_code == 3

    two = tmp_path / "two.csv"
    run = _torchrun("-v", "extract", *args, "--out", str(two))
    # Rank 0 exits with the status of the whole run (3: some rows failed); torchrun reports it as a failure.
    assert run.returncode == 1 and "exitcode  : 3" in run.stderr, run.stderr[-3000:]
    assert "rank 0 of 2: 2 scan(s), 24 seed(s)" in run.stderr and "rank 1 of 2: 2 scan(s), 13 seed(s)" in run.stderr
    assert run.stderr.count("wrote 36 of 37 rows") == 1  # rank 0 reports for all
    pd.testing.assert_frame_equal(pd.read_csv(two), pd.read_csv(one))  # same rows, order and values
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "two.errors.csv"), pd.read_csv(tmp_path / "one.errors.csv"))
    assert not partial_dir(two).exists() and not Path(f"{two}.lock").exists()

    # Killed mid-way, the ranks' chunks stay; a resume with another number of processes reuses them.
    killed = tmp_path / "killed.csv"
    proc = _torchrun("extract", *args, "--out", str(killed), wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and min(len(list(partial_dir(killed).glob(f"chunk-*-rank{r}.npz")))
                                         for r in (0, 1)) < 3:
        time.sleep(0.01)
    ranks = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
             and _parent_pid(p) == proc.pid]  # torchrun starts its workers in sessions of their own
    for pid in [*ranks, proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    while time.time() < deadline and any(_state(pid) not in ("Z", None) for pid in ranks):
        time.sleep(0.01)  # SIGKILL takes a moment
    saved = {p.name.rsplit("-", 1)[1] for p in partial_dir(killed).glob("chunk-*.npz")}
    assert saved == {"rank0.npz", "rank1.npz"} and not killed.exists(), f"not interrupted mid-way: {saved}"
    resumed = _cli("extract", *args, "--out", str(killed), "--resume")
    assert resumed.exit_code == 3 and "reused)" in resumed.output, resumed.output
    pd.testing.assert_frame_equal(pd.read_csv(killed), pd.read_csv(one))
