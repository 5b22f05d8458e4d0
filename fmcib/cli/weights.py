"""``fmcib models`` and ``fmcib weights``: the registered encoders and their weights."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("models")
@click.argument("pattern", default="*")
def models_cmd(pattern: str) -> None:
    """List the registered encoders (name, features, weights location)."""
    from ..models import get_model_config, list_models

    for name in list_models(pattern):
        cfg = get_model_config(name)
        src = cfg.weights
        where = "random init" if src is None else f"hf-hub:{src.hf_hub_id}/{src.hf_filename}" + (
            f" (+{len(src.urls)} mirror)" if src.urls else "")
        p = cfg.preprocess
        click.echo(f"{name}\t{cfg.num_features} features\t{p.describe()}\t{where}\t"
                   f"{cfg.description}")


@click.group()
def weights() -> None:
    """Manage model weights."""


@weights.command("convert")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", default="resnet50_3d.fmcib", show_default=True, help="Architecture the weights belong to.")
@click.pass_context
def weights_convert(ctx: click.Context, checkpoint: Path, out_dir: Path, model: str) -> None:
    """Convert an original .torch / Lightning checkpoint to config.json + model.safetensors.

    \b
    Example:
      fmcib weights convert model_weights.torch fmcib-resnet50/
    """
    from ..models import convert_weights

    path = convert_weights(checkpoint, out_dir, name=model)
    click.echo(f"wrote {path}", err=True)


@weights.command("download")
@click.option("--model", default="resnet50_3d.fmcib", show_default=True)
@click.option("--revision", default=None, help="Hub branch, tag or commit.")
@click.pass_context
def weights_download(ctx: click.Context, model: str, revision: str | None) -> None:
    """Fetch a model's weights into the cache (run where there is network, then work offline)."""
    from ..models import get_model_config
    from ..models.hub import resolve_registry_weights

    path, source = resolve_registry_weights(get_model_config(model), revision)
    click.echo(str(path))


@click.group()
def hub() -> None:
    """Publish trained folders on the Hugging Face Hub."""


@hub.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--revision", default=None, help="Branch to upload to (created when missing).")
@click.option("--message", default=None, help="Commit message.")
def hub_push(folder: Path, repo_id: str, private: bool, revision: str | None, message: str | None) -> None:
    """Upload a folder written by fmcib (finetune, pretrain, weights convert) to a Hub model repository.

    \b
    Example:
      fmcib hub push simclr/ my-lab/fmcib-simclr-nlst --private
      fmcib extract --csv seeds.csv --model hf-hub:my-lab/fmcib-simclr-nlst --out features.csv
    Log in first (huggingface-cli login, or HF_TOKEN). Resume checkpoints and crop stores are not uploaded.
    """
    from ..models.hub import push_to_hub

    url = push_to_hub(folder, repo_id, private=private, revision=revision, commit_message=message)
    click.echo(f"pushed {folder} to {repo_id}: {url}", err=True)
