"""The seeds and features table schema, in one place: input columns, the columns fmcib adds, reserved names,
reading a seeds table and resolving its relative paths. No imaging imports.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pandas as pd

from .exceptions import TableError
from .files import read_table

__all__ = [
    "SEED_COLUMNS",
    "MASK_COLUMNS",
    "SERIES_COLUMN",
    "FEATURE_PREFIX",
    "PADDING_COLUMN",
    "WARNING_COLUMN",
    "ERROR_COLUMN",
    "ROW_COLUMN",
    "feature_columns",
    "feature_matrix",
    "reserved_columns",
    "check_reserved_columns",
    "table_kind",
    "load_seed_table",
    "resolve_path",
]

logger = logging.getLogger(__name__)

SEED_COLUMNS = ("image_path", "coordX", "coordY", "coordZ")
MASK_COLUMNS = ("Image", "Mask")
SERIES_COLUMN = "SeriesInstanceUID"
FEATURE_PREFIX = "pred_"
PADDING_COLUMN = "fmcib_padding_fraction"
WARNING_COLUMN = "fmcib_warning"
ERROR_COLUMN = "fmcib_error"
ROW_COLUMN = "fmcib_row"
_FEATURE = re.compile(rf"{re.escape(FEATURE_PREFIX)}\d+")


def feature_columns(n: int) -> list[str]:
    """The original's feature column names: ``pred_0 ... pred_{n-1}``."""
    return [f"{FEATURE_PREFIX}{i}" for i in range(n)]


def feature_matrix(table: pd.DataFrame, prefix: str = FEATURE_PREFIX) -> pd.DataFrame:
    """The feature columns (``pred_0 ... pred_{D-1}``) of an extracted table, in numeric order.

    Raises
    ------
    ValueError
        The table has no column starting with ``prefix``.
    """
    cols = [c for c in table.columns if str(c).startswith(prefix) and str(c)[len(prefix):].isdigit()]
    if not cols:
        raise ValueError(f"no feature columns '{prefix}0', '{prefix}1', ... in the table (columns: "
                         f"{list(table.columns)[:8]}{' ...' if len(table.columns) > 8 else ''})")
    cols.sort(key=lambda c: int(str(c)[len(prefix):]))
    return table[cols]


def reserved_columns(columns: pd.Index | list[str]) -> list[str]:
    """The columns among ``columns`` that extraction writes itself: ``pred_<i>``, ``fmcib_padding_fraction``,
    ``fmcib_warning``, and in errors files ``fmcib_row`` and ``fmcib_error``."""
    own = {PADDING_COLUMN, WARNING_COLUMN, ERROR_COLUMN, ROW_COLUMN}
    return [str(c) for c in columns if _FEATURE.fullmatch(str(c)) or str(c) in own]


def check_reserved_columns(df: pd.DataFrame, name: str = "table") -> None:
    """Refuse an input table holding columns fmcib writes (a previous output used as input, say).

    Raises
    ------
    TableError
        Naming the columns: kept, they would come out twice, or be read back as the new features.
    """
    reserved = reserved_columns(df.columns)
    if reserved:
        shown = ", ".join(reserved[:6]) + (f", ... ({len(reserved)} in all)" if len(reserved) > 6 else "")
        raise TableError(
            f"{name}: has column(s) that fmcib writes itself ({shown}); is it an earlier output? Give the seeds "
            "table, or drop or rename those columns")


def table_kind(df: pd.DataFrame, name: str = "table") -> str:
    """``"seeds"`` (image_path + coordX/Y/Z) or ``"masks"`` (pyradiomics-style Image + Mask).

    Raises
    ------
    TableError
        Neither set of columns is complete; the message names the missing ones.
    """
    if all(c in df.columns for c in SEED_COLUMNS):
        return "seeds"
    if all(c in df.columns for c in MASK_COLUMNS):
        return "masks"
    missing = [c for c in SEED_COLUMNS if c not in df.columns]
    raise TableError(
        f"{name}: missing column(s) {missing}; a seeds table needs {list(SEED_COLUMNS)} "
        f"(or pyradiomics-style {list(MASK_COLUMNS)} [+ Label]). Columns found: {list(df.columns)}"
    )


def load_seed_table(table: pd.DataFrame | str | os.PathLike) -> tuple[pd.DataFrame, Path | None, str]:
    """A seeds table checked before any work: (the table with a fresh index, the folder its relative paths
    resolve against, its name for messages). The ``fmcib_row`` and ``fmcib_error`` columns of an errors file
    (given back to retry its rows) are left out, with a log line.

    Raises
    ------
    TableError
        Unreadable file, required columns missing, or columns that fmcib writes itself.
    """
    if isinstance(table, pd.DataFrame):
        df, base, name = table.reset_index(drop=True), None, "table"
    else:
        df, base, name = read_table(table), Path(table).parent, f"'{table}'"
    from_errors_file = [c for c in (ROW_COLUMN, ERROR_COLUMN) if c in df.columns]
    if from_errors_file:  # an errors file given back to retry its rows: its bookkeeping columns are not inputs
        logger.warning("%s: leaving out the errors-file column(s) %s", name, ", ".join(from_errors_file))
        df = df.drop(columns=from_errors_file)
    table_kind(df, name)
    check_reserved_columns(df, name)
    return df, base, name


def resolve_path(value: object, base: str | os.PathLike | None) -> Path:
    """A path from a table: absolute as given; a relative one from the table's folder ``base``, else the
    working directory. When both hold a file of that name, the table's folder wins and a warning names both.

    A path found in neither place comes back relative to ``base`` (where it was first looked for), so a
    "file not found" message names that place.
    """
    p = Path(str(value)).expanduser()
    if p.is_absolute() or base is None:
        return p
    beside, here = Path(base) / p, Path.cwd() / p
    if beside.exists():
        if here.exists() and here.resolve() != beside.resolve():
            logger.warning("'%s' exists beside the table (%s) and in the working directory (%s); using the "
                           "table's", value, beside, here)
        return beside
    return here if here.exists() else beside
