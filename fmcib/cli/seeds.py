"""``fmcib seeds`` (seed tables from masks, RTSTRUCT, SEG) and ``fmcib qc`` (do the seeds land on lesions?)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import EXIT_ROWS_FAILED, TABLE


@click.command()
@click.option("--mask", type=click.Path(exists=True, path_type=Path), help="One label image.")
@click.option("--image", type=click.Path(path_type=Path), help="CT the mask belongs to (written to the image_path column).")
@click.option("--csv", "table", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Table with Image, Mask[, Label] columns: one or more seeds per row.")
@click.option("--label", default=None, type=int, help="Label value [default: 1, or the table's Label].")
@click.option("--all-labels", is_flag=True, help="One seed per non-zero label.")
@click.option("--components", is_flag=True, help="One seed per connected component (several lesions per label).")
@click.option("--rtstruct", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A DICOM RTSTRUCT: one seed per ROI (its CT series: --image, or found beside it).")
@click.option("--roi", "rois", multiple=True, help="With --rtstruct: only these ROIs (repeatable).")
@click.option("--seg", "seg", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A DICOM SEG: one seed per segment (its CT series: --image, or found beside it).")
@click.option("--segment", "segments", multiple=True, help="With --seg: only these segments, by label or number.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Seeds table (.csv/.parquet).")
@click.pass_context
def seeds(ctx: click.Context, mask: Path | None, image: Path | None, table: Path | None, label: int | None,
          all_labels: bool, components: bool, rtstruct: Path | None, rois: tuple[str, ...], seg: Path | None,
          segments: tuple[str, ...], out: Path) -> None:
    """Write a seeds table (LPS mm centres of mass) from label masks, RTSTRUCT contours or DICOM SEG segments.

    \b
    Examples:
      fmcib seeds --mask lesion.nii.gz --image ct.nii.gz --components --out seeds.csv
      fmcib seeds --csv radiomics_table.csv --out seeds.csv
      fmcib seeds --rtstruct RS.dcm --image CT_SERIES_DIR --roi GTV --out seeds.csv
      fmcib seeds --seg SEG.dcm --segment 1 --out seeds.csv
    """
    from ..files import check_outputs, check_table_output, write_table
    from ..seeds import seeds_from_mask, seeds_from_table

    if sum(x is not None for x in (mask, table, rtstruct, seg)) != 1:
        raise click.UsageError("give one of --mask (with optional --image), --csv, --rtstruct or --seg")
    from ..dicom import dicom_modality

    modality = dicom_modality(mask) if mask is not None else None
    if modality == "RTSTRUCT":  # an RTSTRUCT or SEG given as --mask: read as such, not as an image
        mask, rtstruct = None, mask
    elif modality == "SEG":
        mask, seg = None, mask
    check_table_output(out)
    check_outputs({"--mask": mask, "--image": image, "--csv": table, "--rtstruct": rtstruct, "--seg": seg},
                  {"--out": out})
    if rtstruct is not None or seg is not None:
        from ..dicom import seeds_from_rtstruct, seeds_from_seg

        result = (seeds_from_rtstruct(rtstruct, image=image, rois=list(rois) or None, components=components)
                  if rtstruct is not None else
                  seeds_from_seg(seg, image=image, segments=list(segments) or None, components=components))
        write_table(result, out)
        click.echo(f"wrote {len(result)} seed(s) to {out}", err=True)
        return
    if mask is not None:
        chosen = None if all_labels else (1 if label is None else label)
        result, failed = seeds_from_mask(mask, image=image, label=chosen, components=components), []
    else:
        result, failed = seeds_from_table(table, label=label, all_labels=all_labels, components=components)
    write_table(result, out)
    click.echo(f"wrote {len(result)} seed(s) to {out}", err=True)
    if failed:
        click.echo("\n".join(failed), err=True)
        ctx.exit(EXIT_ROWS_FAILED)


@click.command()
@click.option("--csv", "table", required=True, type=TABLE, help="Seeds table.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG (pages: _page<i>).")
@click.option("--coords", default="lps", show_default=True, type=click.Choice(["lps", "ras", "voxel"]))
@click.option("--rows-per-page", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--model", default="resnet50_3d.fmcib", show_default=True, help="Whose patch contract to show.")
@click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None,
              help="A weights folder whose config.json gives the contract.")
@click.pass_context
def qc(ctx: click.Context, table: Path, out: Path, coords: str, rows_per_page: int, model: str,
       weights: Path | None) -> None:
    """Montage of each seed's patch (axial, coronal, sagittal) to check that seeds land on lesions."""
    from ..files import check_outputs
    from ..plots import qc_montage

    check_outputs({"--csv": table}, {"--out": out})
    from ..models import model_contract

    pages = qc_montage(table, out, coords=coords, rows_per_page=rows_per_page, model=model_contract(model, weights))
    click.echo(f"wrote {len(pages)} page(s): {', '.join(map(str, pages))}", err=True)
