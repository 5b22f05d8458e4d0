"""Resumable extraction runs to files: checkpoint chunks, errors file, atomic output, ``--resume``, torchrun shards."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .distributed import DistributedContext, broadcast_object, gather_objects, init_distributed, on_main_process
from .exceptions import FmcibError
from .extract import BatchResult, FeatureExtractor, assemble, errors_frame
from .files import (
    OutputLock,
    atomic_path,
    check_outputs,
    check_table_output,
    read_table,
    read_table_metadata,
    write_table,
)
from .scans import RowError, plan_scans, shard_scans
from .tables import PADDING_COLUMN, WARNING_COLUMN, feature_matrix, load_seed_table

__all__ = ["RunSummary", "run_extraction", "row_keys", "errors_path", "partial_dir", "saved_rows"]

logger = logging.getLogger(__name__)

# Settings whose change makes earlier features incompatible with a resumed run.
_RESUME_KEYS = ("model", "architecture", "model_args", "num_features", "preprocess", "coords", "precision")


@dataclass
class RunSummary:
    """Outcome of :func:`run_extraction`."""

    output: Path
    errors_file: Path | None
    n_rows: int
    n_written: int
    n_failed: int
    n_reused: int


def _normalised(df: pd.DataFrame) -> pd.DataFrame:
    """Values as a CSV round trip gives them back whatever the dtypes: numbers as float64, the rest as text."""
    out = {}
    for col in df.columns:
        values = df[col]
        if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            out[col] = values.astype(np.float64)
        else:
            out[col] = values.astype(object).where(values.notna(), "<NA>").astype(str)
    return pd.DataFrame(out, index=df.index)


def row_keys(df: pd.DataFrame) -> list[str]:
    """Content keys of table rows (hash of the values + occurrence), stable across runs, row order and the
    dtype changes of a CSV round trip: equal rows get the same hash, repeats a higher occurrence number."""
    hashes = pd.util.hash_pandas_object(_normalised(df), index=False).to_numpy()
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


def _check_settings(prov: dict[str, Any], settings: dict[str, Any], where: Path) -> None:
    prev = _settings(prov)
    diff = [k for k in settings if prev.get(k) != settings[k]]
    if diff:
        raise FmcibError(
            f"--resume: '{where}' was made with different settings ({', '.join(diff)}); "
            "remove it or run without --resume"
        )


def _previous_output(out: Path, columns: list[str], settings: dict[str, Any]) -> dict[str, tuple[np.ndarray, float, str]]:
    """Rows of a finished output, keyed by the content of their input columns, checked against its metadata.

    The keys recorded when the output was written must be the keys of its own rows, in order: a table sorted
    or edited afterwards, or one whose metadata belongs to another run, is refused rather than misread.
    """
    meta = read_table_metadata(out) or {}
    if "row_keys" not in meta:
        raise FmcibError(f"--resume: '{out}' has no fmcib run metadata; remove it or choose another --out")
    _check_settings(meta.get("provenance", {}), settings, out)
    prev = read_table(out)
    missing = [c for c in columns if c not in prev.columns]
    if missing or PADDING_COLUMN not in prev.columns:
        raise FmcibError(f"--resume: '{out}' lacks the input column(s) {missing or [PADDING_COLUMN]}; it was not "
                         "made from this table. Remove it or choose another --out")
    recorded = [str(k) for k in meta["row_keys"]]
    own = row_keys(prev[columns])
    if [k.rsplit("-", 1)[0] for k in own] != [k.rsplit("-", 1)[0] for k in recorded]:
        raise FmcibError(f"--resume: the rows of '{out}' no longer match its run metadata (sorted or edited after "
                         "fmcib wrote it, or written by an interrupted run); its features cannot be matched to "
                         "rows safely. Remove it, or write to another --out")
    values = feature_matrix(prev).to_numpy(np.float32)
    notes = prev[WARNING_COLUMN].fillna("").astype(str).to_numpy() if WARNING_COLUMN in prev.columns else \
        np.full(len(prev), "")
    return {k: (vec, float(pad), str(note))
            for k, vec, pad, note in zip(recorded, values, prev[PADDING_COLUMN].to_numpy(), notes)}


def _saved_chunks(parts: Path) -> list[Path]:
    return sorted(parts.glob("chunk-*.npz")) if parts.is_dir() else []


def _previous_chunks(parts: Path, settings: dict[str, Any]) -> dict[str, tuple[np.ndarray, float, str]]:
    """Rows saved by an interrupted run (content keys in every chunk)."""
    done: dict[str, tuple[np.ndarray, float, str]] = {}
    chunks = _saved_chunks(parts)
    if chunks:
        meta_file = parts / "run.json"
        if meta_file.is_file():
            _check_settings(json.loads(meta_file.read_text()), settings, parts)
    for chunk in chunks:
        with np.load(chunk, allow_pickle=False) as z:
            notes = z["warnings"] if "warnings" in z.files else np.full(len(z["keys"]), "")
            for key, vec, pad, note in zip(z["keys"], z["features"], z["padding"], notes):
                done[str(key)] = (vec, float(pad), str(note))
    return done


def run_extraction(
    table: str | os.PathLike,
    out: str | os.PathLike,
    extractor: FeatureExtractor,
    coords: str = "lps",
    resume: bool = False,
    overwrite: bool = False,
    cli: bool = False,
) -> RunSummary:
    """Extract features for a seeds table into ``out`` (Parquet or CSV), resumable, in one process or several.

    Every encoder batch is saved atomically as a chunk in ``<out>.partial/``; the final table (input
    rows that succeeded + ``pred_*`` + ``fmcib_padding_fraction`` + ``fmcib_warning``, provenance in Parquet
    metadata or a ``<out>.json`` sidecar) is written atomically, then the chunks are removed. Failed rows go
    to ``<stem>.errors.csv`` with their reasons. With ``resume=True``, rows already in ``out`` or in saved
    chunks are not recomputed, so an interrupted run continues where it stopped. ``<out>.lock`` keeps a
    second run off the same output while this one works. ``cli=True`` words the errors file for command-line
    users (flags instead of Python keywords).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the scans are shared between the processes, balanced by seed count
    (:func:`fmcib.scans.shard_scans`); each process saves its own chunks, and rank 0 checks the output, holds
    the lock and writes the one table: the same rows, order and values as a single process would. ``out``
    must be on a file system every process sees. A resume may use another number of processes.

    Raises
    ------
    TableError
        Unreadable table, missing or reserved columns, an output name that is not .csv/.parquet (before any work).
    FmcibError
        An output that is an input; saved progress without ``resume`` or ``overwrite``; ``resume`` against
        output made with other settings or changed since; another run writing the same output; under
        torchrun, chunks of another process that rank 0 cannot see.
    """
    out = check_table_output(out)
    df, table_dir, name = load_seed_table(table)  # columns checked before the model loads
    parts = partial_dir(out)
    check_outputs({"--csv table": Path(table), "--weights": extractor.weights},
                  {"--out": out, "errors file": errors_path(out), "sidecar": out.with_name(out.name + ".json"),
                   "progress folder": parts})
    context = init_distributed(extractor.device)
    extractor = _for_this_process(extractor, context)
    keys = row_keys(df)
    provenance = extractor.provenance(coords)
    provenance["relative_paths_from"] = str(table_dir.resolve()) if table_dir is not None else None
    provenance = broadcast_object(provenance, context)  # one record (rank 0's clock) for every process
    settings = _settings(provenance)
    done: dict[str, tuple[np.ndarray, float, str]] = {}
    with contextlib.ExitStack() as held:

        def prepare() -> tuple[list[int], int]:
            """Rank 0: lock the output, gather earlier progress; the rows left to do and the next chunk number."""
            held.enter_context(OutputLock(out))
            saved = _saved_chunks(parts)
            if saved and not (resume or overwrite):
                raise FmcibError(f"'{parts}' holds {len(saved)} saved batch(es) of an interrupted run on '{out}': "
                                 "continue it with --resume, or discard it with --overwrite")
            if resume:
                if out.is_file():
                    done.update(_previous_output(out, list(df.columns), settings))
                done.update(_previous_chunks(parts, settings))
            elif parts.exists():
                shutil.rmtree(parts)
            parts.mkdir(parents=True, exist_ok=True)
            if not _saved_chunks(parts):  # nothing saved yet: record (or replace) this run's settings
                with atomic_path(parts / "run.json") as tmp:
                    tmp.write_text(json.dumps(provenance))
            return [i for i, k in enumerate(keys) if k not in done], len(_saved_chunks(parts))

        todo, chunk_no = on_main_process(prepare, context)
        n_reused = len(df) - len(todo)
        mine = todo
        if context.distributed:
            shard = shard_scans(plan_scans(df, base_dir=table_dir, rows=todo, name=name), context.world_size)
            mine = sorted(s.row for task in shard[context.rank] for s in task.seeds)
            logger.info("rank %d of %d: %d scan(s), %d seed(s)", context.rank, context.world_size,
                        len(shard[context.rank]), len(mine))
        suffix = f"-rank{context.rank}" if context.distributed else ""
        errors: list[RowError] = []
        computed: list[str] = []
        if mine:
            for res in extractor.iter_table(df, coords=coords, base_dir=table_dir, rows=mine, name=name):
                if isinstance(res, RowError):
                    errors.append(res)
                    continue
                _save_chunk(parts / f"chunk-{chunk_no:06d}{suffix}.npz", res, keys)
                chunk_no += 1
                for r, vec, pad, note in zip(res.rows, res.features, res.padding, res.warnings):
                    done[keys[r]] = (vec, float(pad), str(note))
                    computed.append(keys[r])
        errors = [e for rank_errors in gather_objects(errors, context) for e in rank_errors]
        expected = [k for rank_keys in gather_objects(computed, context) for k in rank_keys]

        def finish() -> RunSummary:
            """Rank 0: the one output table and errors file, from every process's chunks."""
            if context.distributed:
                done.update(_previous_chunks(parts, settings))
                unseen = [k for k in expected if k not in done]
                if unseen:
                    raise FmcibError(f"{len(unseen)} row(s) computed by other processes are not in '{parts}': "
                                     "--out must be on a file system that every process (every node) sees")
            ok_rows = np.array([i for i, k in enumerate(keys) if k in done], dtype=np.int64)
            d = extractor.num_features
            feats = np.stack([done[keys[i]][0] for i in ok_rows]) if len(ok_rows) else np.zeros((0, d), np.float32)
            pads = np.array([done[keys[i]][1] for i in ok_rows], dtype=np.float64)
            notes = np.array([done[keys[i]][2] for i in ok_rows], dtype=object)
            result = assemble(df, ok_rows, feats, pads, notes)
            metadata = {"provenance": provenance, "row_keys": [keys[i] for i in ok_rows], "table": str(table)}
            write_table(result, out, metadata=metadata)
            err_file = errors_path(out)
            if errors:
                with atomic_path(err_file) as tmp:
                    errors_frame(df, errors, cli=cli).to_csv(tmp, index=False)
            elif err_file.exists():
                err_file.unlink()  # stale list from an earlier run on this output whose rows now succeeded
            shutil.rmtree(parts, ignore_errors=True)
            return RunSummary(output=out, errors_file=err_file if errors else None, n_rows=len(df),
                              n_written=len(ok_rows), n_failed=len(errors), n_reused=n_reused)

        return on_main_process(finish, context)


def _for_this_process(extractor: FeatureExtractor, context: DistributedContext) -> FeatureExtractor:
    """Under torchrun: the extractor on this rank's device (``cuda:<LOCAL_RANK>``), progress shown by rank 0 only."""
    if not context.distributed:
        return extractor
    from .models import resolve_device

    changes: dict[str, Any] = {}
    if resolve_device(extractor.device) != context.device:
        changes["device"] = str(context.device)
    if extractor.progress and not context.is_main:
        changes["progress"] = False
    return dataclasses.replace(extractor, **changes) if changes else extractor


def saved_rows(out: str | os.PathLike) -> int:
    """Rows saved so far by an unfinished run on ``out`` (its progress folder's chunks)."""
    total = 0
    for chunk in _saved_chunks(partial_dir(Path(out))):
        with np.load(chunk, allow_pickle=False) as z:
            total += len(z["keys"])
    return total


def _save_chunk(path: Path, batch: BatchResult, keys: list[str]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.array([keys[r] for r in batch.rows]), features=batch.features,
                     padding=batch.padding, warnings=np.array([str(w) for w in batch.warnings], dtype=str))
