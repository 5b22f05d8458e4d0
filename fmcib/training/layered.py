"""Layered training of a longitudinal encoder: masked prediction (JEPA), then alignment, then supervision.

One call runs the stages in order, each in its own folder under ``out_dir`` (``1-jepa``, ``2-align``,
``3-finetune``), each starting from the previous one's encoder. ``layered.json`` records every finished
stage, and the one running, with a signature of what made it (its settings and the folder it started
from). Running the same call again continues where it stopped: finished stages with the same signature are
kept, an interrupted stage resumes from its last checkpoint (the engine's exact resume), and a stage whose
signature differs, finished or interrupted, is an error, never silently reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..distributed import init_distributed
from ..exceptions import FmcibError
from ..files import atomic_path
from .engine import CHECKPOINT_DIR, STATE_NAME
from .longitudinal import CARD_NAME, CONFIG_NAME, Architecture, TableColumns, pretrain_longitudinal

__all__ = ["PLAN_NAME", "STAGES", "train_layered"]

STAGES = ("jepa", "align", "finetune")
PLAN_NAME = "layered.json"


def _signature(stage: str, options: dict[str, Any], source: str | None) -> str:
    text = json.dumps({"stage": stage, "options": options, "source": source}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _run_stage(stage: str, table: Any, folder: Path, options: dict[str, Any], resume: bool) -> None:
    if stage == "jepa":
        pretrain_longitudinal(table, folder, resume=resume, **options)
    elif stage == "align":
        from .alignment import align_longitudinal

        align_longitudinal(table, folder, resume=resume, **options)
    else:
        from .patients import finetune_patients

        finetune_patients(table, options.pop("label"), folder, resume=resume, **options)


def train_layered(
    table: str | os.PathLike | pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    stages: Sequence[str] = STAGES,
    label: str | None = None,
    columns: TableColumns = TableColumns(),
    start: str | os.PathLike | None = None,
    architecture: Architecture = Architecture(),
    jepa: dict[str, Any] | None = None,
    align: dict[str, Any] | None = None,
    finetune: dict[str, Any] | None = None,
    data_description: str | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or continue) the layered schedule; returns the plan (stages, folders, the final folder).

    Parameters
    ----------
    table : path or DataFrame
        The long table; the fine-tuning stage uses its patients with a ``label``.
    stages : sequence of {"jepa", "align", "finetune"}
        Which stages, in this order (e.g. ``("jepa", "finetune")``).
    columns : TableColumns
        Which columns are what (:class:`~fmcib.training.longitudinal.TableColumns`).
    start : path, optional
        A longitudinal folder the first stage starts from; otherwise a random encoder of ``architecture``.
    jepa, align, finetune : dict, optional
        Keyword arguments of :func:`~fmcib.training.longitudinal.pretrain_longitudinal`,
        :func:`~fmcib.training.alignment.align_longitudinal` and
        :func:`~fmcib.training.patients.finetune_patients` (epochs, lr, sigreg_lambda, temperature, ...).
    """
    stages = list(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages or len(set(stages)) != len(stages) or stages != sorted(stages, key=STAGES.index):
        raise ValueError(f"stages must be distinct, in the order {STAGES}, got {stages}")
    if "finetune" in stages and label is None:
        raise FmcibError("the finetune stage needs a label column", cli="the finetune stage needs --label")
    context = init_distributed(device)
    out = Path(out_dir)
    plan_path = out / PLAN_NAME
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {"stages": []}
    done = {entry["folder"]: entry for entry in plan["stages"]}
    extra = {"jepa": jepa or {}, "align": align or {}, "finetune": {**(finetune or {}), "label": label}}
    source = None if start is None else str(start)
    entries = []
    for number, stage in enumerate(stages, start=1):
        folder = out / f"{number}-{stage}"
        options = {**extra[stage], "data_description": data_description, "device": device, "seed": seed,
                   "progress": progress, "columns": columns, "start": source}
        if source is None:
            options["architecture"] = architecture
        recorded = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in options.items()
                    if k not in ("device", "progress")}
        source_stamp = None if source is None else _stamp(Path(source))
        signature = _signature(stage, recorded, source_stamp)
        finished = (folder / CONFIG_NAME).is_file() and (folder / CARD_NAME).is_file()
        entry = done.get(folder.name)
        same = entry is not None and entry["signature"] == signature
        if finished and not (same and entry.get("finished", True)):
            raise FmcibError(f"'{folder}' holds a finished {stage} stage made with other settings or from another "
                             f"start; use another output folder or delete '{folder}'")
        if not finished:
            resume = (folder / CHECKPOINT_DIR / STATE_NAME).is_file()
            if resume and not same:
                raise FmcibError(f"'{folder}' holds an interrupted {stage} stage started with other settings or from "
                                 f"another start; run it again with the same ones, or delete '{folder}'")
            entry = {"stage": stage, "folder": folder.name, "signature": signature, "started_from": source,
                     "settings": recorded, "finished": False}
            plan = _write_plan(out, plan, [*entries, entry], context)  # an interrupted stage is known by its settings
            _run_stage(stage, table, folder, dict(options), resume)
            entry["finished"] = True
        entries.append(entry)
        plan = _write_plan(out, plan, entries, context)
        source = str(folder)
    return plan


def _write_plan(out: Path, plan: dict[str, Any], entries: list[dict[str, Any]], context: Any) -> dict[str, Any]:
    """``layered.json`` with ``entries`` first (then earlier entries of other folders) and the last as final."""
    names = {e["folder"] for e in entries}
    plan = {"stages": entries + [e for e in plan["stages"] if e["folder"] not in names],
            "final": str(out / entries[-1]["folder"])}
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / PLAN_NAME) as tmp:
            tmp.write_text(json.dumps(plan, indent=1, default=str))
    context.barrier()
    return plan


def _stamp(folder: Path) -> str:
    """What identifies a finished folder's weights: its config's creation time (or the path when absent)."""
    try:
        return json.loads((folder / CONFIG_NAME).read_text())["training"]["created"]
    except (OSError, KeyError, ValueError):
        return str(folder)
