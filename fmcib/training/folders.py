"""What every training method shares at its ends: the starting encoder and the trained folder it writes.

A trained folder is fmcib's Hub layout (``config.json`` with the encoder's config, input contract and a
``training`` record; ``model.safetensors``; ``head.safetensors`` for fine-tunes; ``metrics.csv``) plus a
model card ``README.md`` that says what data made the weights, how long they trained and with which settings.
``fmcib extract --weights DIR`` uses it unchanged; ``fmcib hub push`` publishes it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_path
from ..models import ModelConfig, ResolvedWeights, resolve_weights
from ..models.checkpoints import CONFIG_NAME, save_hub_layout
from ..preprocessing import PreprocessConfig
from .engine import BEST_NAME, METRICS_NAME

__all__ = ["starting_point", "best_weights", "write_trained_folder", "write_model_card", "CARD_NAME"]

CARD_NAME = "README.md"


def starting_point(model: str, weights: str | os.PathLike | None, pretrained: bool,
                   patch_size: int | tuple[int, int, int] | None = None,
                   spacing_mm: float | tuple[float, float, float] | None = None,
                   ) -> tuple[ResolvedWeights, PreprocessConfig, ModelConfig]:
    """The encoder a run starts from: its resolved weights, the patch contract it trains with (the model's,
    with any override) and the config the trained folder will carry (that contract, no weights source)."""
    resolved = resolve_weights(model, pretrained=pretrained, weights=weights)
    base = resolved.config.preprocess
    changes = {k: v for k, v in (("patch_size", patch_size), ("spacing_mm", spacing_mm)) if v is not None}
    contract = dataclasses.replace(base, **changes) if changes else base
    return resolved, contract, dataclasses.replace(resolved.config, preprocess=contract, weights=None)


def best_weights(out_dir: str | os.PathLike, *prefixes: str) -> dict[str, dict[str, torch.Tensor]]:
    """The run's kept weights (``checkpoints/best.safetensors``) split by the task model's submodules."""
    from safetensors.torch import load_file

    best = load_file(str(Path(out_dir) / "checkpoints" / BEST_NAME))
    return {p: {k[len(p) + 1:]: v for k, v in best.items() if k.startswith(p + ".")} for p in prefixes}


def write_trained_folder(out_dir: str | os.PathLike, config: ModelConfig, name: str, description: str,
                         encoder_state: dict[str, torch.Tensor], record: dict[str, Any],
                         heads: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a trained encoder (and head) in the Hub layout with its ``training`` record and a model card."""
    record = {**record, "training": {**record["training"],
                                     "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}}
    trained = dataclasses.replace(config, name=name, description=description)
    save_hub_layout(trained, encoder_state, out_dir, heads=heads, extra=record)
    return write_model_card(out_dir)


def _settings_line(train: dict[str, Any]) -> str:
    s = train["settings"]
    return (f"- {s['epochs']} epochs, batch {s['batch_size']} per process, {s['optimizer']} lr {s['lr']:g}, weight "
            f"decay {s['weight_decay']:g}, warm-up {s['warmup_epochs']:g} epochs then {s['schedule']}, "
            f"{s['precision']}, seed {s['seed']}.")


def _finetune_sections(data: dict[str, Any]) -> list[str]:
    train, head = data["training"], data["head"]
    counts = train["counts"]
    best = train.get("best_metrics") or {}
    metric_line = ", ".join(f"{k} {v:.4g}" for k, v in best.items() if k.startswith("tune_") and v == v) or "n/a"
    return [
        "## Training data",
        f"- Seeds table: `{train['table'].strip(chr(39))}` ({counts['rows']} rows; {counts['unlabelled']} without a "
        "label and "
        f"{counts['unreadable']} unreadable left out).",
        f"- Label: `{head['label']}`, classes {head['classes']}; training rows per class: "
        + ", ".join(f"{c}: {counts.get(f'train_{c}', 0)}" for c in head["classes"]) + ".",
        f"- Training rows: {counts['train']}" + (f" (a stratified {train['fraction']:.0%} subset)"
                                                 if train.get("fraction") else "") + f"; tuning rows: {counts['tune']} "
        f"({train['tune_rows']}).",
        "",
        "## Starting point and settings",
        f"- Started from `{train['base_model']}` (weights: {train['started_from'].get('source')}, sha256 "
        f"{train['started_from'].get('sha256') or 'n/a'}).",
        f"- Head: {head['type']} {head['widths']}; every encoder layer trained.",
        _settings_line(train) + f" Class weights: {train['class_weights']}.",
        f"- Augmentation: {train['augmentation']}.",
        f"- Best epoch by tuning {train['tune_metric']}: {train['best_epoch']} ({metric_line}); "
        f"per-epoch figures in `{METRICS_NAME}`.",
    ]


def _pretrain_sections(data: dict[str, Any]) -> list[str]:
    train = data["training"]
    counts = train["counts"]
    last = train.get("final_metrics") or {}
    health = ", ".join(f"{k[len('tune_'):]} {v:.4g}" for k, v in last.items() if k.startswith("tune_") and v == v)
    method = train["method"]
    lines = [
        "## Training data",
        f"- {train['data_description']}",
        f"- Seeds table: `{train['table'].strip(chr(39))}`: {counts['lesions']} lesions in {counts['scans']} scans "
        f"({counts['unreadable']} unreadable rows left out); no labels were used.",
        "",
        "## Method and settings",
        f"- Self-supervised {method} from `{train['base_model']}` (weights: {train['started_from'].get('source')}, "
        f"sha256 {train['started_from'].get('sha256') or 'n/a'}).",
    ]
    if method == "simclr":
        lines.append(f"- NT-Xent, temperature {train['temperature']:g}; negatives: the other lesions of the global "
                     f"batch and {train['random_negatives']} random patch(es) per lesion from elsewhere in its scan; "
                     f"projection head {train['projection']} (dropped: this folder holds the encoder only).")
    lines += [
        _settings_line(train),
        f"- Augmentation: {train['augmentation']}.",
        f"- Last epoch on {train['monitor_samples']} lesions (projections; see fmcib's docs/training.md): "
        f"{health or 'n/a'} "
        f"(per epoch in `{METRICS_NAME}`).",
    ]
    return lines


def write_model_card(folder: str | os.PathLike) -> Path:
    """README.md of a trained folder, from its config.json: data, counts, method, settings and figures."""
    path = Path(folder)
    data = json.loads((path / CONFIG_NAME).read_text())
    train = data["training"]
    preprocess = ModelConfig.from_dict(data).preprocess
    fine_tuned = train["method"] == "finetune"
    body = _finetune_sections(data) if fine_tuned else _pretrain_sections(data)
    outputs = f"- Encoder output: {data['num_features']} features"
    outputs += f"; head output: probabilities of {data['head']['classes']}." if fine_tuned else "."
    use = (["fmcib predict --csv test.csv --model . --out predictions.csv"] if fine_tuned else []) + \
        ["fmcib extract --csv test.csv --weights . --out features.csv"]
    lines = [
        "---", "library_name: fmcib",
        f"tags: [medical-imaging, ct, {'fine-tuned' if fine_tuned else 'self-supervised, ' + train['method']}]",
        "---", "",
        f"# {data['name']}", "",
        f"{data['description']}.", "",
        *body,
        "",
        "## Input contract",
        f"- CT in Hounsfield units and a seed point; patch {preprocess.describe()}, intensities "
        f"`(HU + {preprocess.hu_offset:g}) / {preprocess.hu_scale:g}`.",
        outputs,
        "",
        "## Use",
        "```bash", *use, "```",
        "",
        "Research use only; not a medical device. Check performance on an independent test set before any claim.",
        "",
    ]
    with atomic_path(path / CARD_NAME) as tmp:
        tmp.write_text("\n".join(lines))
    return path / CARD_NAME
