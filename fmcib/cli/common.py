"""What every command shares: the error handler, option types and the extraction options."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..exceptions import FmcibError

__all__ = ["EXIT_ROWS_FAILED", "Commands", "PerAxis", "TABLE", "check_device", "echo_finetuned", "echo_pretrained",
           "extraction_options", "extractor_from_options", "fail", "read_input", "stop_on_sigterm", "training_options"]

# Exit codes: 0 success, 1 error (nothing or not everything could be done), 2 usage error (click),
# 3 finished but some rows failed (good rows written; reasons in the errors file).
EXIT_ROWS_FAILED = 3


def fail(exc: Exception, debug: bool) -> None:
    """One line for the user (the command-line wording of fmcib's errors), the traceback only with --debug."""
    if debug:
        raise exc
    message = getattr(exc, "cli", None) or str(exc)
    if isinstance(exc, OSError) and not str(exc).startswith("'"):  # full disk, read-only folder, ...
        message = f"{exc.strerror or type(exc).__name__}: {exc.filename or ''}".rstrip(": ")
    raise click.ClickException(message) from exc


class PerAxis(click.ParamType):
    """One positive number, or three separated by commas (x, y, z)."""

    name = "N|X,Y,Z"

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            parts = [self.kind(v) for v in value.split(",")]
        except ValueError:
            self.fail(f"{value!r} is not one number or three separated by commas", param, ctx)
        if len(parts) not in (1, 3) or not all(p > 0 for p in parts):
            self.fail(f"{value!r}: give one positive number or three (x,y,z)", param, ctx)
        return parts[0] if len(parts) == 1 else tuple(parts)


def extraction_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The encoder and loader options shared by every command that extracts features."""
    options = [
        click.option("--model", default="resnet50_3d.fmcib", show_default=True,
                     help="Registry name or hf-hub:org/repo[@rev]."),
        click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None,
                     help="Local weights file or folder (skips the Hub)."),
        click.option("--device", default="auto", show_default=True, callback=check_device,
                     help="auto, cpu, cuda, cuda:1, mps."),
        click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1)),
        click.option("--num-workers", default=None, type=click.IntRange(min=0),
                     help="Loader processes [default: one per core on CPU (max 4), all but one with a GPU (max 8)]."),
        click.option("--coords", default="lps", show_default=True, type=click.Choice(["lps", "ras", "voxel"]),
                     help="Coordinate system of coordX/Y/Z."),
        click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"])),
        click.option("--patch-size", default=None, type=PerAxis(int),
                     help="Override the model's patch size in voxels: N or X,Y,Z (e.g. 64 for lesions over 50 mm).",
                     callback=collect_contract, expose_value=False),
        click.option("--spacing", default=None, type=PerAxis(float),
                     help="Override the model's patch spacing in mm: S or X,Y,Z.", callback=collect_contract,
                     expose_value=False),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Refuse a device this machine's PyTorch cannot use while the options are parsed, before any work."""
    import re

    name = str(value).lower()
    if name in ("auto", "cpu"):
        return name
    if not re.fullmatch(r"cuda(:\d+)?|mps", name):
        raise click.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda, cuda:<index> or mps")
    import torch

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise click.BadParameter(f"{value!r}: this PyTorch ({torch.__version__}) sees no CUDA GPU; use "
                                     "--device cpu, or install a CUDA build of PyTorch")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise click.BadParameter(f"{value!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise click.BadParameter(f"{value!r}: Apple MPS is not available here; use --device cpu")
    return name


def stop_on_sigterm() -> None:
    """Make SIGTERM (what workflow managers send) end a run as Ctrl-C does: cleanly, progress kept."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def collect_contract(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Keep --patch-size/--spacing in the context, so commands need not list them."""
    ctx.ensure_object(dict).setdefault("contract", {})[param.name] = value


def extractor_from_options(model: str, weights: Path | None, device: str, batch_size: int, num_workers: int | None,
               precision: str, no_progress: bool) -> Any:
    from ..extract import FeatureExtractor

    contract = (click.get_current_context().obj or {}).get("contract", {})
    return FeatureExtractor(model=model, weights=weights, device=None if device == "auto" else device,
                            batch_size=batch_size, num_workers=num_workers, precision=precision,
                            progress=not no_progress, patch_size=contract.get("patch_size"),
                            spacing_mm=contract.get("spacing"))


class Commands(click.Group):
    """The command group: fmcib's errors (and full disks, unreadable files, bad values) end any command with
    one line, in command-line wording; ``--debug`` shows the traceback instead. The one place where the
    package's errors become messages: commands only parse options and call the library."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (FmcibError, ValueError, OSError) as exc:
            fail(exc, bool((ctx.obj or {}).get("debug")))


# An input table option: must exist and be a file.
TABLE = click.Path(exists=True, dir_okay=False, path_type=Path)


def read_input(path: Path) -> Any:
    """A table given on the command line (CSV or Parquet)."""
    from ..files import read_table

    return read_table(path)


def training_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The run options shared by every training command (device, precision, loading, contract, seed, resume)."""
    options = [
        click.option("--device", default="auto", show_default=True, callback=check_device),
        click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"])),
        click.option("--num-workers", default=0, show_default=True, type=click.IntRange(min=0)),
        click.option("--crop-store", default=None, type=click.Path(file_okay=False, path_type=Path),
                     help="Keep the training crops in this folder, memory-mapped, instead of in each process's memory "
                          "(large pools); reused when it matches the table and its files."),
        click.option("--coords", default="lps", show_default=True, type=click.Choice(["lps", "ras", "voxel"])),
        click.option("--patch-size", default=None, type=PerAxis(int),
                     help="Override the patch size: N or X,Y,Z voxels."),
        click.option("--spacing", default=None, type=PerAxis(float), help="Override the patch spacing: S or X,Y,Z mm."),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--resume", is_flag=True, help="Continue the run in --out-dir from its last checkpoint."),
        click.option("--no-progress", is_flag=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def echo_finetuned(result: Any, tune_metric: str, out_dir: Path, unit: str) -> None:
    """The one-line summary of a finished fine-tune (rank 0 only): counts, the kept epoch and its tuning metric."""
    from ..distributed import is_main_process

    if not is_main_process():
        return
    best = result.best_metrics.get(f"tune_{tune_metric}")
    shown = f"tuning {tune_metric} {best:.3f} at epoch {result.best_epoch}" if best is not None else \
        f"epoch {result.best_epoch} kept"
    click.echo(f"fine-tuned on {result.counts['train']} {unit} ({result.counts['tune']} tuning): {shown}; "
               f"wrote {out_dir}", err=True)


def echo_pretrained(result: Any, out_dir: Path, what: str) -> None:
    """The one-line summary of a finished pretraining run (rank 0 only): the last epoch's loss and effective rank."""
    from ..distributed import is_main_process

    if not is_main_process():
        return
    last = result.history[-1] if result.history else {}
    click.echo(f"pretrained {what}: last epoch loss {last.get('train_loss', float('nan')):.4g}, effective rank "
               f"{last.get('tune_rankme', float('nan')):.3g}; wrote {out_dir}", err=True)
