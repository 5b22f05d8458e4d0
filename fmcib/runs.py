"""Resumable extraction runs to files: checkpoint chunks, errors file, atomic output, ``--resume``."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .exceptions import FmcibError
from .extract import (
    PADDING_COLUMN,
    BatchResult,
    FeatureExtractor,
    RowError,
    assemble,
    errors_frame,
    load_seed_table,
    plan_scans,
)
from .io import atomic_path, read_table, read_table_metadata, write_table

__all__ = ["RunSummary", "run_extraction", "row_keys", "errors_path", "partial_dir"]

logger = logging.getLogger(__name__)

# Settings whose change makes earlier features incompatible with a resumed run.
_RESUME_KEYS = ("model", "num_features", "preprocess", "coords", "precision")


@dataclass
class RunSummary:
    """Outcome of :func:`run_extraction`."""

    output: Path
    errors_file: Path | None
    n_rows: int
    n_written: int
    n_failed: int
    n_reused: int


def row_keys(df: pd.DataFrame) -> list[str]:
    """Content keys of the input rows (hash of the values + occurrence), stable across runs and row order."""
    hashes = pd.util.hash_pandas_object(df, index=False).to_numpy()
    seen: dict[int, int] = {}
    keys = []
    for h in hashes:
        k = int(h)
        seen[k] = seen.get(k, 0) + 1
        keys.append(f"{k:016x}-{seen[k]}")
    return keys


def errors_path(out: Path) -> Path:
    """Errors file beside the output: ``features.parquet`` -> ``features.errors.csv``."""
    return out.with_name(out.stem + ".errors.csv")


def partial_dir(out: Path) -> Path:
    """Folder of checkpoint chunks of an unfinished run: ``<output>.partial``."""
    return out.with_name(out.name + ".partial")


def _settings(prov: dict[str, Any]) -> dict[str, Any]:
    s = {k: prov.get(k) for k in _RESUME_KEYS}
    s["weights_sha256"] = (prov.get("weights") or {}).get("sha256")
    return s


def _load_previous(out: Path, parts: Path, settings: dict[str, Any]) -> dict[str, tuple[np.ndarray, float]]:
    """Features already computed: from a finished output and/or chunks of an interrupted run."""
    done: dict[str, tuple[np.ndarray, float]] = {}
    if out.is_file():
        meta = read_table_metadata(out) or {}
        if "row_keys" not in meta:
            raise FmcibError(f"--resume: '{out}' has no fmcib run metadata; remove it or choose another --out")
        _check_settings(meta.get("provenance", {}), settings, out)
        prev = read_table(out)
        pred = [c for c in prev.columns if c.startswith("pred_")]
        values = prev[pred].to_numpy(np.float32)
        for key, vec, pad in zip(meta["row_keys"], values, prev[PADDING_COLUMN].to_numpy()):
            done[key] = (vec, float(pad))
    if parts.is_dir():
        meta_file = parts / "run.json"
        if meta_file.is_file():
            _check_settings(json.loads(meta_file.read_text()), settings, parts)
        for chunk in sorted(parts.glob("chunk-*.npz")):
            with np.load(chunk, allow_pickle=False) as z:
                for key, vec, pad in zip(z["keys"], z["features"], z["padding"]):
                    done[str(key)] = (vec, float(pad))
    return done


def _check_settings(prov: dict[str, Any], settings: dict[str, Any], where: Path) -> None:
    prev = _settings(prov)
    diff = [k for k in settings if prev.get(k) != settings[k]]
    if diff:
        raise FmcibError(
            f"--resume: '{where}' was made with different settings ({', '.join(diff)}); "
            "remove it or run without --resume"
        )


def run_extraction(
    table: str | os.PathLike,
    out: str | os.PathLike,
    extractor: FeatureExtractor,
    coords: str = "lps",
    resume: bool = False,
) -> RunSummary:
    """Extract features for a seeds table into ``out`` (Parquet or CSV), resumable.

    Every encoder batch is saved atomically as a chunk in ``<out>.partial/``; the final table (input
    rows that succeeded + ``pred_*`` + ``fmcib_padding_fraction``, provenance in Parquet metadata or a
    ``<out>.json`` sidecar) is written atomically, then the chunks are removed. Failed rows go to
    ``<stem>.errors.csv`` with their reasons. With ``resume=True``, rows already in ``out`` or in saved
    chunks are not recomputed, so an interrupted run continues where it stopped.

    Raises
    ------
    TableError
        Unreadable table or missing columns (before any work).
    FmcibError
        ``resume`` against output made with other settings.
    """
    out = Path(out)
    df, table_dir, name = load_seed_table(table)
    plan_scans(df.iloc[:0], name=name)  # fail on missing columns before loading the model
    keys = row_keys(df)
    parts = partial_dir(out)
    provenance = extractor.provenance(coords)
    settings = _settings(provenance)
    done: dict[str, tuple[np.ndarray, float]] = {}
    if resume:
        done = _load_previous(out, parts, settings)
    elif parts.exists():
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    with atomic_path(parts / "run.json") as tmp:
        tmp.write_text(json.dumps(provenance))
    todo = [i for i, k in enumerate(keys) if k not in done]
    n_reused = len(df) - len(todo)
    errors: list[RowError] = []
    chunk_no = len(list(parts.glob("chunk-*.npz")))
    if todo:
        for res in extractor.iter_table(df, coords=coords, base_dir=table_dir, rows=todo, name=name):
            if isinstance(res, RowError):
                errors.append(res)
                continue
            _save_chunk(parts / f"chunk-{chunk_no:06d}.npz", res, keys)
            chunk_no += 1
            for r, vec, pad in zip(res.rows, res.features, res.padding):
                done[keys[r]] = (vec, float(pad))
    ok_rows = np.array([i for i, k in enumerate(keys) if k in done], dtype=np.int64)
    d = extractor.num_features
    feats = np.stack([done[keys[i]][0] for i in ok_rows]) if len(ok_rows) else np.zeros((0, d), np.float32)
    pads = np.array([done[keys[i]][1] for i in ok_rows], dtype=np.float64)
    result = assemble(df, ok_rows, feats, pads)
    metadata = {"provenance": provenance, "row_keys": [keys[i] for i in ok_rows], "table": str(table)}
    write_table(result, out, metadata=metadata)
    err_file = errors_path(out)
    if errors:
        with atomic_path(err_file) as tmp:
            errors_frame(df, errors).to_csv(tmp, index=False)
    elif err_file.exists():
        err_file.unlink()  # stale list from an earlier run whose rows now succeeded
    shutil.rmtree(parts, ignore_errors=True)
    return RunSummary(output=out, errors_file=err_file if errors else None, n_rows=len(df),
                      n_written=len(ok_rows), n_failed=len(errors), n_reused=n_reused)


def _save_chunk(path: Path, batch: BatchResult, keys: list[str]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.array([keys[r] for r in batch.rows]), features=batch.features,
                     padding=batch.padding)
