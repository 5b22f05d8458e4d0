"""Feature extraction, the engine: patches from :mod:`fmcib.scans` -> batched encoder -> feature table."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .exceptions import FmcibError
from .preprocessing import PreprocessConfig
from .scans import RowError, ScanDataset, plan_scans
from .seeds import _validate_coords
from .tables import (
    ERROR_COLUMN,
    MASK_COLUMNS,
    PADDING_COLUMN,
    ROW_COLUMN,
    SEED_COLUMNS,
    WARNING_COLUMN,
    feature_columns,
    load_seed_table,
)

__all__ = [
    "SEED_COLUMNS",
    "MASK_COLUMNS",
    "extract_features",
    "get_features",
    "FeatureExtractor",
    "BatchResult",
    "RowError",
    "plan_scans",
    "feature_columns",
]

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class BatchResult:
    """Features of one encoder batch: table row numbers, ``(n, D)`` float32 features, padding fractions and
    per-row warnings (``""`` when none)."""

    rows: np.ndarray
    features: np.ndarray
    padding: np.ndarray
    warnings: np.ndarray


def encoder_is_channels_last(encoder: Any) -> bool:
    """True when the encoder's first 5-D weight is stored channels-last (feed it channels-last input too)."""
    import torch

    weight = next((p for p in encoder.parameters() if p.dim() == 5), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last_3d) \
        and not weight.is_contiguous()


def _identity(item: Any) -> Any:
    return item


# Loader workers on a CPU run yield to the encoder: contending with it for cores stalls its threads.
CPU_WORKER_NICENESS = 10


def _exit_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent dies (a SIGKILLed run leaves no workers)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl: torch's own watchdog still applies
            pass


def _worker_init(_: int, niceness: int = 0, parent: int | None = None) -> None:
    _exit_with_parent()
    if parent is not None and os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    # One ITK thread per worker: the encoder already uses the cores of the main process.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    if niceness and hasattr(os, "nice"):
        os.nice(niceness)


def default_num_workers(device_type: str = "cpu") -> int:
    """Loader processes when not given: 0 on a single core; else for a CPU encoder one per core (at most 4),
    for a GPU encoder all cores but one (at most 8), since then reading scans is the bottleneck."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores <= 1:
        return 0
    return min(4, cores) if device_type == "cpu" else max(1, min(8, cores - 1))


@dataclass
class FeatureExtractor:
    """A loaded encoder plus batching, device and precision settings; reusable across tables.

    Parameters
    ----------
    model : str or torch.nn.Module, default="resnet50_3d.fmcib"
        Registry name / ``"hf-hub:..."``, or an encoder from :func:`fmcib.create_model`.
    weights : path, optional
        Local weights file or folder (see :func:`fmcib.create_model`).
    device : str, optional
        ``"cuda"``, ``"mps"``, ``"cpu"``; default: the fastest available.
    batch_size : int, default=8
        Patches per forward pass.
    num_workers : int, optional
        Loader processes reading scans and cutting patches while the encoder runs (default: see
        :func:`default_num_workers`). With a CPU encoder they run at lower priority (``nice``).
    precision : {"fp32", "bf16", "fp16"}, default="fp32"
        Autocast dtype for the forward pass (bf16/fp16 are meant for GPUs).
    progress : bool, default=True
        Show a progress bar (only on a terminal).
    start_method : str, optional
        Multiprocessing start method for workers (``"spawn"``, ``"fork"``, ...; default: platform's).
    patch_size, spacing_mm : optional
        Override the model's patch contract (e.g. 64 voxels for lesions larger than 50 mm; the paper
        also tried 64). The encoder pools globally, so it accepts any size, but features of another
        contract than the model was trained with are not comparable with published ones (logged).
    """

    model: Any = "resnet50_3d.fmcib"
    weights: str | os.PathLike | None = None
    device: str | None = None
    batch_size: int = 8
    num_workers: int | None = None
    precision: Precision = "fp32"
    progress: bool = True
    start_method: str | None = None
    patch_size: int | tuple[int, int, int] | None = None
    spacing_mm: float | tuple[float, float, float] | None = None
    _encoder: Any = field(default=None, init=False, repr=False)
    _resolved: Any = field(default=None, init=False, repr=False)
    _override_logged: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers is not None and int(self.num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")

    def _weights(self) -> Any:
        """:class:`~fmcib.models.ResolvedWeights` of a named model, found without building it; None for a module."""
        from torch import nn

        if isinstance(self.model, nn.Module):
            return None
        if self._resolved is None:
            from .models import resolve_weights

            self._resolved = resolve_weights(str(self.model), pretrained=True, weights=self.weights)
        return self._resolved

    @property
    def encoder(self) -> Any:
        """The encoder module (loaded on first use)."""
        if self._encoder is None:
            from .models import build_model, resolve_device

            if self.precision != "fp32" and self.device_type == "cpu":
                logger.warning("precision=%r on the CPU: autocast runs 3D convolutions far slower than fp32 on CPUs "
                               "without native bf16/fp16 (about 90x on an AVX2 machine, docs/benchmarks.md); use "
                               "fp32 there", self.precision)
            resolved = self._weights()
            if resolved is None:
                self._encoder = self.model.eval().to(resolve_device(self.device))
            else:
                import torch

                # oneDNN's 3D convolutions: ~10% faster channels-last, the same features to float precision
                # (bench/forward.py, docs/benchmarks.md)
                fmt = torch.channels_last_3d if self.device_type == "cpu" else None
                self._encoder = build_model(resolved, device=self.device, memory_format=fmt)
        return self._encoder

    def _config(self) -> Any:
        """The model's :class:`~fmcib.models.ModelConfig` (None for a bare module), without loading weights."""
        resolved = self._weights()
        return resolved.config if resolved is not None else getattr(self.model, "fmcib_config", None)

    @property
    def device_type(self) -> str:
        """``"cuda"``, ``"mps"`` or ``"cpu"``: where the encoder runs (known before it is loaded)."""
        from .models import resolve_device

        return resolve_device(self.device).type

    @property
    def preprocess_config(self) -> PreprocessConfig:
        """The patch contract used: the model's (defaults for a bare module), with any override applied."""
        cfg = self._config()
        base = cfg.preprocess if cfg is not None else PreprocessConfig()
        changes = {k: v for k, v in (("patch_size", self.patch_size), ("spacing_mm", self.spacing_mm))
                   if v is not None}
        chosen = dataclasses.replace(base, **changes) if changes else base
        if chosen != base and cfg is not None and not self._override_logged:
            logger.warning("%s: patch contract overridden (%s instead of %s); its features are not comparable with "
                           "the model's own", cfg.name, chosen.describe(), base.describe())
            self._override_logged = True
        return chosen

    @property
    def num_features(self) -> int:
        """Feature vector length of the encoder."""
        cfg = self._config()
        if cfg is not None:
            return int(cfg.num_features)
        import torch

        dev = next(self.encoder.parameters()).device
        with torch.inference_mode():
            return int(self.encoder(torch.zeros(1, *self.preprocess_config.input_shape, device=dev)).shape[1])

    def provenance(self, coords: str) -> dict[str, Any]:
        """Settings that determine the features (recorded with every output; compared on resume)."""
        import torch

        from ._version import __version__

        cfg, resolved = self._config(), self._weights()
        weights = resolved.record() if resolved is not None else getattr(self.model, "fmcib_weights", {})
        return {
            "fmcib_version": __version__,
            "model": cfg.name if cfg is not None else type(self.model).__name__,
            "architecture": cfg.architecture if cfg is not None else None,
            "model_args": dict(cfg.model_args) if cfg is not None else None,
            "weights": dict(weights or {}),
            "num_features": self.num_features,
            "preprocess": self.preprocess_config.to_dict(),
            "coords": coords,
            "precision": self.precision,
            "torch_version": torch.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def _forward(self, patches: np.ndarray) -> np.ndarray:
        import torch

        encoder = self.encoder
        device = next(encoder.parameters()).device
        x = torch.from_numpy(patches)
        if device.type == "cuda":
            x = x.pin_memory().to(device, non_blocking=True)
        else:
            x = x.to(device)
        if device.type == "cpu" and encoder_is_channels_last(encoder):
            x = x.contiguous(memory_format=torch.channels_last_3d)
        autocast: Any = contextlib.nullcontext()
        if self.precision != "fp32":
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            autocast = torch.autocast(device_type=device.type, dtype=dtype)
        with torch.inference_mode(), autocast:
            out = encoder(x)
        return out.float().cpu().numpy()

    def iter_table(self, df: pd.DataFrame, coords: str = "lps", base_dir: str | os.PathLike | None = None,
                   rows: Sequence[int] | None = None, name: str = "table") -> Iterator[BatchResult | RowError]:
        """Yield :class:`BatchResult` per encoder batch and :class:`RowError` per failed row, in table order of scans."""
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        tasks = plan_scans(df, base_dir=base_dir, rows=rows, name=name)
        dataset = ScanDataset(tasks, coords, self.preprocess_config)  # config only: the weights load below
        device_type = self.device_type
        workers = default_num_workers(device_type) if self.num_workers is None else int(self.num_workers)
        workers = min(workers, len(dataset))
        niceness = CPU_WORKER_NICENESS if device_type == "cpu" else 0
        loader = DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
            worker_init_fn=functools.partial(_worker_init, niceness=niceness, parent=os.getpid()) if workers else None,
            multiprocessing_context=self.start_method if workers else None,
            prefetch_factor=2 if workers else None,
        )
        total = sum(len(t.seeds) for t in tasks)
        bar = tqdm(total=total, unit="seed", disable=(not self.progress) or None, desc="fmcib")
        pending: list[dict[str, Any]] = []
        held = 0
        bs = int(self.batch_size)
        items = None
        try:
            items = iter(loader)  # the workers start reading scans now, while the encoder loads
            self.encoder  # noqa: B018  (load it)
            for item in items:
                for err in item["errors"]:
                    bar.update(1)
                    yield err
                if len(item["rows"]):
                    pending.append(item)
                    held += len(item["rows"])
                while held >= bs:
                    result, pending, held = self._run_batch(pending, bs)
                    bar.update(len(result.rows))
                    yield result
            while held:  # loader exhausted: the last, smaller batches
                result, pending, held = self._run_batch(pending, min(bs, held))
                bar.update(len(result.rows))
                yield result
        finally:
            bar.close()
            shutdown = getattr(items, "_shutdown_workers", None)  # join the workers now, even on Ctrl-C/SIGTERM
            if shutdown is not None:
                shutdown()

    def _run_batch(self, pending: list[dict[str, Any]], n: int) -> tuple[BatchResult, list[dict[str, Any]], int]:
        taken, pending, held = _take(pending, n)
        return BatchResult(taken["rows"], self._forward(taken["patches"]), taken["padding"], taken["warnings"]), \
            pending, held


_BATCHED = ("rows", "patches", "padding", "warnings")


def _take(pending: list[dict[str, Any]], n: int) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], int]:
    """Pop the first ``n`` patches across pending scan items: (their rows, patches, padding, warnings; the rest;
    patches left)."""
    parts: dict[str, list[np.ndarray]] = {key: [] for key in _BATCHED}
    need = n
    while need:
        item = pending[0]
        k = min(need, len(item["rows"]))
        for key in _BATCHED:
            parts[key].append(item[key][:k])
        if k == len(item["rows"]):
            pending.pop(0)
        else:
            pending[0] = {key: (val[k:] if key != "errors" else []) for key, val in item.items()}
        need -= k
    held = sum(len(p["rows"]) for p in pending)
    return {key: np.concatenate(val) for key, val in parts.items()}, pending, held


def assemble(df: pd.DataFrame, rows: np.ndarray, features: np.ndarray, padding: np.ndarray,
             warnings_: np.ndarray | None = None) -> pd.DataFrame:
    """Input rows (original index, table order) + ``pred_*`` + ``fmcib_padding_fraction`` + ``fmcib_warning``."""
    order = np.argsort(rows, kind="stable")
    rows, features, padding = rows[order], features[order], padding[order]
    notes = np.full(len(rows), "", dtype=object) if warnings_ is None else np.asarray(warnings_, dtype=object)[order]
    base = df.iloc[rows]
    feats = pd.DataFrame(features, index=base.index, columns=feature_columns(features.shape[1]))
    pad = pd.Series(padding, index=base.index, name=PADDING_COLUMN)
    note = pd.Series(notes, index=base.index, name=WARNING_COLUMN, dtype=object)
    return pd.concat([base, feats, pad, note], axis=1)


def errors_frame(df: pd.DataFrame, errors: Sequence[RowError], cli: bool = False) -> pd.DataFrame:
    """Failed rows: ``fmcib_row`` (position in the input table), the input columns, and ``fmcib_error``
    (in command-line wording with ``cli=True``)."""
    if not errors:
        return pd.DataFrame(columns=[ROW_COLUMN, *df.columns, ERROR_COLUMN])
    errs = sorted(errors, key=lambda e: e.row)
    out = df.iloc[[e.row for e in errs]].copy()
    out.insert(0, ROW_COLUMN, [e.row for e in errs])
    out[ERROR_COLUMN] = [(e.cli_message or e.message) if cli else e.message for e in errs]
    return out.reset_index(drop=True)


def extract_features(
    table: str | os.PathLike | pd.DataFrame,
    *,
    model: Any = "resnet50_3d.fmcib",
    weights: str | os.PathLike | None = None,
    device: str | None = None,
    batch_size: int = 8,
    num_workers: int | None = None,
    coords: str = "lps",
    precision: Precision = "fp32",
    progress: bool = True,
    on_error: Literal["warn", "raise"] = "warn",
    start_method: str | None = None,
    base_dir: str | os.PathLike | None = None,
    patch_size: int | None = None,
    spacing_mm: float | None = None,
    return_errors: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Extract encoder features for every seed in a table.

    Parameters
    ----------
    table : path or pandas.DataFrame
        CSV/Parquet or DataFrame with ``image_path, coordX, coordY, coordZ`` (other columns are carried
        through), or pyradiomics-style ``Image, Mask[, Label]`` (seed = the label's centre of mass).
        An optional ``SeriesInstanceUID`` column picks a series in a DICOM folder. Relative paths are
        taken from the table's folder, else from the working directory. Columns that fmcib writes itself
        (``pred_*``, ``fmcib_*``) are refused.
    model, weights, device, batch_size, num_workers, precision, start_method, patch_size, spacing_mm
        See :class:`FeatureExtractor`. ``model`` may also be a ready :class:`FeatureExtractor`, which is
        then used as it is (the others are ignored).
    coords : {"lps", "ras", "voxel"}, default="lps"
        Coordinate system of ``coordX/Y/Z`` (see :func:`fmcib.seeds.to_lps`).
    progress : bool, default=True
        Progress bar on a terminal.
    on_error : {"warn", "raise"}, default="warn"
        ``"warn"``: failed rows are left out of the result and listed in a warning (and returned with
        ``return_errors=True``); ``"raise"``: raise :class:`FmcibError` listing them.
    base_dir : path, optional
        Where relative image paths are looked for first; default: a path table's own folder.
    return_errors : bool, default=False
        Also return the failed rows: ``fmcib_row`` (position in the table), the input columns and
        ``fmcib_error`` (the reason).

    Returns
    -------
    features : pandas.DataFrame
        The input rows that succeeded (original index), then ``pred_0 ... pred_{D-1}``,
        ``fmcib_padding_fraction`` and ``fmcib_warning`` (empty unless the image does not look like CT in
        HU). ``attrs["fmcib"]`` holds the provenance (version, model, weights sha256, preprocessing) as plain
        JSON-able data, so results can be concatenated and merged.
    errors : pandas.DataFrame
        Only with ``return_errors=True``.
    """
    if on_error not in ("warn", "raise"):
        raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
    coords = _validate_coords(coords)
    df, table_dir, name = load_seed_table(table)
    base_dir = table_dir if base_dir is None else base_dir
    extractor = model if isinstance(model, FeatureExtractor) else FeatureExtractor(
        model=model, weights=weights, device=device, batch_size=batch_size, num_workers=num_workers,
        precision=precision, progress=progress, start_method=start_method, patch_size=patch_size,
        spacing_mm=spacing_mm)
    batches: list[BatchResult] = []
    errors: list[RowError] = []
    for res in extractor.iter_table(df, coords=coords, base_dir=base_dir, name=name):
        (errors if isinstance(res, RowError) else batches).append(res)
    if errors and on_error == "raise":
        raise FmcibError(f"{len(errors)} of {len(df)} row(s) failed:\n" + "\n".join(e.message for e in errors))
    d = extractor.num_features
    rows = np.concatenate([b.rows for b in batches]) if batches else np.zeros(0, np.int64)
    feats = np.concatenate([b.features for b in batches]) if batches else np.zeros((0, d), np.float32)
    pads = np.concatenate([b.padding for b in batches]) if batches else np.zeros(0)
    notes = np.concatenate([b.warnings for b in batches]) if batches else np.zeros(0, dtype=object)
    out = assemble(df, rows, feats, pads, notes)
    out.attrs["fmcib"] = extractor.provenance(coords)
    out.attrs["fmcib"]["relative_paths_from"] = str(Path(base_dir).resolve()) if base_dir is not None else None
    if errors:
        shown = "\n".join(e.message for e in sorted(errors, key=lambda e: e.row)[:20])
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        hint = "" if return_errors else " (return_errors=True returns them as a table)"
        warnings.warn(f"{len(errors)} of {len(df)} row(s) failed and are not in the result{hint}:\n{shown}{more}",
                      stacklevel=2)
    return (out, errors_frame(df, errors)) if return_errors else out


def get_features(
    csv_path: str | os.PathLike,
    weights_path: str | os.PathLike | None = None,
    spatial_size: tuple[int, int, int] = (50, 50, 50),
    precropped: bool = False,
    batch_size: int = 4,
    num_workers: int = 4,
) -> pd.DataFrame:
    """Drop-in for fmcib 1.0.0's ``fmcib.run.get_features``: input columns + ``pred_0 ... pred_4095``.

    Uses the fixed preprocessing of this package (see docs/preprocessing.md). Only cubic
    ``spatial_size`` equal to the model's patch size and ``precropped=False`` are supported; other values
    raise ``ValueError`` rather than silently producing different features.
    """
    if precropped:
        raise ValueError("precropped=True is not supported: pass full scans with seed points "
                         "(fmcib 1.0.0's precropped path returned transposed patches)")
    if tuple(spatial_size) != (50, 50, 50):
        raise ValueError(f"spatial_size must be (50, 50, 50) for the fmcib encoder, got {spatial_size}")
    out = extract_features(csv_path, weights=weights_path, batch_size=batch_size, num_workers=num_workers)
    return out.drop(columns=[PADDING_COLUMN, WARNING_COLUMN])
