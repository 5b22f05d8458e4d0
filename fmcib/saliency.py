"""Saliency: which voxels of a patch drive a scalar score (a probe or a fine-tuned head on the encoder).

Smooth guided backpropagation: MONAI's :class:`~monai.visualize.SmoothGrad` (gradients averaged over
noisy copies of the patch) with every ReLU of the network swapped for a guided ReLU, which passes a
gradient back only where both its input and the incoming gradient are positive (Springenberg et al.
2015; Smilkov et al. 2017). Maps are written as NIfTI on the patch's grid in the scan's physical
space, beside the patch itself (HU), plus a PNG overlay.

MONAI's own ``GuidedBackpropSmoothGrad`` finds ReLUs by module *name* (``"relu"``); MONAI's ResNet
names them ``act``, so there it silently computes plain SmoothGrad. :func:`guided_relus` finds them
by type.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

if TYPE_CHECKING:
    from .extract import FeatureExtractor
    from .probes import LogisticProbe

__all__ = ["EncoderWithHead", "GuidedReLU", "probe_head", "guided_relus", "has_relu", "smooth_guided_backprop",
           "saliency_maps"]


def probe_head(probe: LogisticProbe, num_features: int, prefix: str = "pred_") -> nn.Linear:
    """A fitted :class:`~fmcib.probes.LogisticProbe` as one ``Linear`` layer on the encoder's raw features.

    The probe scores ``w . (f - mean) / scale + b``; the layer holds ``w / scale`` and
    ``b - (w / scale) . mean``, so its output equals ``probe.decision_function`` (binary: one output,
    the log-odds of ``classes_[1]``; multiclass: one per class). A probe fitted on a subset of the
    ``pred_*`` columns (e.g. only stable features) gets weight 0 on the others.

    Raises
    ------
    ValueError
        The probe was fitted on columns that are not this encoder's ``pred_0 .. pred_{num_features-1}``,
        or (without column names) on a different number of features.
    """
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(probe, "pipeline_")
    scaler, logistic = probe.pipeline_.named_steps["scaler"], probe.pipeline_.named_steps["logistic"]
    weight = np.asarray(logistic.coef_, np.float64) / np.asarray(scaler.scale_, np.float64)
    bias = np.asarray(logistic.intercept_, np.float64) - weight @ np.asarray(scaler.mean_, np.float64)
    names = getattr(probe, "feature_names_in_", None)
    if names is None:
        if probe.n_features_in_ != num_features:
            raise ValueError(f"the probe was fitted on {probe.n_features_in_} unnamed features; the encoder "
                             f"gives {num_features}")
        columns = np.arange(num_features)
    else:
        pattern = re.compile(rf"{re.escape(prefix)}(\d+)")
        matches = [pattern.fullmatch(str(n)) for n in names]
        bad = [str(n) for n, m in zip(names, matches) if m is None or int(m.group(1)) >= num_features]
        if bad:
            raise ValueError(f"the probe uses column(s) that are not features of this encoder "
                             f"({prefix}0..{prefix}{num_features - 1}): {bad[:5]}")
        columns = np.array([int(m.group(1)) for m in matches if m is not None], dtype=np.int64)
    full = np.zeros((weight.shape[0], num_features))
    full[:, columns] = weight
    head = nn.Linear(num_features, weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(full))
        head.bias.copy_(torch.from_numpy(bias))
    return head


class EncoderWithHead(nn.Module):
    """Encoder followed by a head on its features: patches ``(n, 1, s, s, s)`` -> scores ``(n, k)``."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class _GuidedReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x > 0) * (grad > 0)


class GuidedReLU(nn.Module):
    """ReLU whose backward pass keeps only positive gradients at positive inputs (guided backprop)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GuidedReLUFunction.apply(x)


@contextlib.contextmanager
def guided_relus(model: nn.Module) -> Iterator[int]:
    """Swap every ``nn.ReLU`` submodule (found by type, at any depth) for a :class:`GuidedReLU`; restore on exit.

    Yields the number of ReLUs swapped. ReLUs applied as functions inside ``forward`` cannot be found.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.ReLU):
                    setattr(parent, name, GuidedReLU())
                    swapped.append((parent, name, child))
        yield len(swapped)
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def has_relu(model: nn.Module) -> bool:
    """True when the network has ``nn.ReLU`` modules (guided backpropagation applies); a ViT (GELU) has none."""
    return any(isinstance(m, nn.ReLU) for m in model.modules())


def smooth_guided_backprop(model: nn.Module, patch: np.ndarray | torch.Tensor, index: int = 0,
                           n_samples: int = 25, noise: float = 0.15, magnitude: bool = True,
                           random_state: int | None = 0, guided: bool | None = None) -> np.ndarray:
    """Smooth guided backpropagation of output ``index`` of ``model`` onto one input patch.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``(1, 1, s, s, s)`` patches to scores ``(1, k)`` (e.g. :class:`EncoderWithHead`). Its parameters
        get no gradients.
    patch : array or tensor of shape ``(s, s, s)``, ``(1, s, s, s)`` or ``(1, 1, s, s, s)``
        A normalised patch as the encoder takes it.
    index : int, default=0
        Which output to explain (0 for a binary probe's log-odds).
    n_samples : int, default=25
        Noisy copies averaged (MONAI's default).
    noise : float, default=0.15
        Noise standard deviation as a share of the patch's value range (MONAI's ``stdev_spread``).
    magnitude : bool, default=True
        Average squared gradients and take the root (MONAI's default), else average signed gradients.
    random_state : int, optional
        Seeds the noise; the global torch RNG is left as it was.
    guided : bool, optional
        Swap the ReLUs for guided ReLUs (``True`` requires some); default: when the network has ReLUs (a
        ResNet), else plain SmoothGrad (a ViT's GELUs have no guided counterpart).

    Returns
    -------
    numpy.ndarray of shape ``(s, s, s)``, float32, axes as the patch.
    """
    from monai.visualize import SmoothGrad

    device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(patch, dtype=np.float32) if not torch.is_tensor(patch) else patch)
    x = x.to(device=device, dtype=torch.float32).reshape(1, 1, *x.shape[-3:])
    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        for p in params:
            p.requires_grad_(False)  # only the input's gradient is needed
        use_guided = has_relu(model) if guided is None else guided
        swap = guided_relus(model) if use_guided else contextlib.nullcontext(0)
        with swap as swapped, torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
            if use_guided and not swapped:
                raise ValueError("the model has no nn.ReLU modules: guided backpropagation would be plain SmoothGrad")
            if random_state is not None:
                torch.manual_seed(random_state)
            explainer = SmoothGrad(model, stdev_spread=noise, n_samples=n_samples, magnitude=magnitude,
                                   verbose=False)
            grad = explainer(x, index=int(index), retain_graph=False)
    finally:
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
    return grad[0, 0].detach().float().cpu().numpy()


def _head_for(probe: Any, num_features: int) -> tuple[nn.Module, list[Any] | None]:
    """The head module and, for a probe, its classes (output ``j`` scores ``classes[j]``; binary: ``classes[1]``)."""
    from .probes import LogisticProbe, load_probe

    if isinstance(probe, (str, os.PathLike)):
        probe = load_probe(probe)
    if isinstance(probe, LogisticProbe):
        return probe_head(probe, num_features), probe.classes_.tolist()
    if isinstance(probe, nn.Module):
        return probe, None
    raise TypeError(f"probe must be a LogisticProbe, a probe file or a torch head module, got {type(probe).__name__}")


def _output_index(scores: np.ndarray, classes: list[Any] | None, target: Any) -> tuple[int, Any]:
    """Output to explain and the class it scores: ``target`` class, else the predicted one."""
    if classes is not None and len(classes) == 2 and scores.shape[-1] == 1:  # binary probe: log-odds
        if target is not None and target not in classes:
            raise ValueError(f"class {target!r} is not one of the probe's classes {classes}")
        return 0, classes[1]
    if target is None:
        j = int(np.argmax(scores))
        return j, classes[j] if classes is not None else j
    if classes is None:
        if not 0 <= int(target) < scores.shape[-1]:
            raise ValueError(f"output index {target} is out of range: the head gives {scores.shape[-1]} output(s)")
        return int(target), int(target)
    if target not in classes:
        raise ValueError(f"class {target!r} is not one of the probe's classes {classes}")
    return classes.index(target), target


MAX_NAME_CHARS = 80  # of the name-column part of a file name; longer names keep a prefix and a hash


def _file_stem(df: pd.DataFrame, row: int, name_column: str | None) -> str:
    if name_column is None:
        return f"row{row:05d}"
    value = str(df.iloc[row][name_column])
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("._") or "x"
    if len(safe) > MAX_NAME_CHARS:  # file systems allow 255 bytes per name, with our suffixes after it
        import hashlib

        safe = f"{safe[:MAX_NAME_CHARS - 11]}-{hashlib.sha1(value.encode()).hexdigest()[:10]}"
    return f"{safe}_row{row:05d}"


def saliency_maps(
    table: pd.DataFrame | str | os.PathLike,
    probe: LogisticProbe | str | os.PathLike | nn.Module,
    out_dir: str | os.PathLike,
    model: str | nn.Module | FeatureExtractor = "resnet50_3d.fmcib",
    weights: str | os.PathLike | None = None,
    device: str | None = None,
    coords: str = "lps",
    target_class: Any = None,
    n_samples: int = 25,
    noise: float = 0.15,
    random_state: int | None = 0,
    name_column: str | None = None,
    rows: Sequence[int] | None = None,
    window_hu: tuple[float, float] = (-1000.0, 400.0),
    base_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Smooth guided backpropagation maps of a probe's (or head's) score for every seed of a table.

    Per row, written atomically to ``out_dir``: ``<stem>_patch.nii.gz`` (the patch in HU),
    ``<stem>_saliency.nii.gz`` (the map; same grid, in the scan's physical space, so both overlay the
    scan in any viewer) and ``<stem>_saliency.png`` (central axial, coronal and sagittal slices).
    ``<stem>`` is ``row<i>`` or, with ``name_column``, that column's value plus the row number.

    Parameters
    ----------
    table : DataFrame or path
        Seeds table as for :func:`fmcib.extract_features`.
    probe : LogisticProbe, probe file or torch.nn.Module
        A probe fitted on this encoder's ``pred_*`` features (see :func:`probe_head`), or a head
        module mapping features ``(n, D)`` to scores ``(n, k)`` (e.g. a fine-tuned classifier).
    out_dir : path
    model, weights, device :
        The encoder, as for :func:`fmcib.extract_features` (``model`` may be a FeatureExtractor).
    coords : {"lps", "ras", "voxel"}, default="lps"
    target_class : optional
        Class whose score is explained (multiclass); default: each patch's predicted class. A
        binary probe always explains the log-odds of its second class.
    n_samples, noise, random_state :
        See :func:`smooth_guided_backprop`.
    name_column : str, optional
        Column naming the output files (e.g. a lesion id).
    rows : sequence of int, optional
        Only these table rows (positions); default: all.
    window_hu : (float, float), default=(-1000, 400)
        Display window of the PNG.
    base_dir : path, optional
        Second place to look for relative image paths (after the working directory); default: a path
        table's own folder.

    Returns
    -------
    pandas.DataFrame
        One line per requested row: ``row``, the table's own columns (those not named like the ones below),
        ``score`` (the explained output), ``explained`` (its class), ``patch_path``, ``saliency_path``,
        ``png_path`` and ``error`` (empty when the row succeeded; a row whose files cannot be written fails
        alone). Names longer than 80 characters are shortened, keeping a hash of the whole name.
    """
    from .extract import FeatureExtractor
    from .io import write_image
    from .plots import plot_saliency
    from .preprocessing import patch_image
    from .scans import ScanDataset, plan_scans
    from .tables import load_seed_table

    df, table_dir, name = load_seed_table(table)
    base_dir = table_dir if base_dir is None else base_dir
    if name_column is not None and name_column not in df.columns:
        raise ValueError(f"{name}: no column {name_column!r} to name the files by")
    extractor = model if isinstance(model, FeatureExtractor) else FeatureExtractor(
        model=model, weights=weights, device=device, progress=False)
    cfg = extractor.preprocess_config
    head, classes = _head_for(probe, extractor.num_features)
    scorer = EncoderWithHead(extractor.encoder, head.to(next(extractor.encoder.parameters()).device)).eval()
    dataset = ScanDataset(plan_scans(df, base_dir=base_dir, rows=rows, name=name), coords, cfg)
    method = "guided SmoothGrad" if has_relu(scorer) else "SmoothGrad"  # a ViT has no ReLUs to guide
    out = Path(out_dir)
    records: list[dict[str, Any]] = []
    for i in range(len(dataset)):
        item = dataset[i]
        records += [{"row": e.row, "error": e.message} for e in item["errors"]]
        for row, patch, origin in zip(item["rows"], item["patches"], item["origins"]):
            row = int(row)
            with torch.inference_mode():
                x = torch.from_numpy(patch[None]).to(next(scorer.parameters()).device)
                scores = scorer(x).float().cpu().numpy()[0]
            index, explained = _output_index(scores, classes, target_class)
            saliency = smooth_guided_backprop(scorer, patch, index=index, n_samples=n_samples, noise=noise,
                                              random_state=random_state)
            stem = _file_stem(df, row, name_column)
            paths = {"patch": out / f"{stem}_patch.nii.gz", "saliency": out / f"{stem}_saliency.nii.gz",
                     "png": out / f"{stem}_saliency.png"}
            hu = cfg.to_hu(patch[0]).astype(np.float32)
            try:
                write_image(patch_image(hu, origin, cfg), paths["patch"])
                write_image(patch_image(saliency, origin, cfg), paths["saliency"])
                plot_saliency(hu, saliency, paths["png"], window_hu=window_hu,
                              title=f"{stem}: score {scores[index]:.3g} ({explained})")
            except (OSError, RuntimeError) as exc:  # full disk, unwritable folder: this row fails, not the run
                records.append({"row": row, "error": f"row {row}: could not write '{paths['patch'].parent}': {exc}"})
                continue
            records.append({"row": row, "score": float(scores[index]), "explained": explained, "method": method,
                            "patch_path": str(paths["patch"]), "saliency_path": str(paths["saliency"]),
                            "png_path": str(paths["png"]), "error": ""})
    columns = ["row", "score", "explained", "method", "patch_path", "saliency_path", "png_path", "error"]
    result = pd.DataFrame.from_records(records, columns=columns).sort_values("row", ignore_index=True)
    own = [c for c in df.columns if c not in columns]  # the user's columns (ids, labels) after the row number
    if own:
        result = pd.concat([result[["row"]], df.iloc[result["row"].to_numpy()][own].reset_index(drop=True),
                            result.drop(columns="row")], axis=1)
    return result
