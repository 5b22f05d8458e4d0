"""Table and file helpers with no imaging imports: atomic writes, CSV/Parquet tables with provenance.

The statistics modules (probes, survival, stability) use these without loading SimpleITK or torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from .exceptions import FmcibError, TableError

__all__ = ["atomic_path", "read_table", "write_table", "read_table_metadata", "TABLE_SUFFIXES", "check_table_output",
           "check_outputs", "OutputLock"]

PathLike = str | os.PathLike
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


def read_table(path: PathLike) -> pd.DataFrame:
    """Read a CSV or Parquet table (by extension) into a DataFrame with a fresh RangeIndex.

    Raises
    ------
    TableError
        The file is missing or cannot be parsed.
    """
    p = Path(path)
    if not p.is_file():
        raise TableError(f"'{p}': table file not found")
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(p)
        else:
            df = pd.read_csv(p)
    except ImportError as exc:
        raise TableError(f"'{p}': reading Parquet needs pyarrow: pip install 'fmcib[parquet]'") from exc
    except Exception as exc:  # pandas raises many parser error types
        raise TableError(f"'{p}': cannot parse table ({exc})") from exc
    return df.reset_index(drop=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` atomically.

    Readers never see a half-written file: either the old file or the complete new one exists.
    On error the temporary file is removed and ``path`` is left untouched. ``keep_suffix`` ends the
    temporary name with the target's suffix (``.nii.gz`` counts as one), for writers that choose the
    format from the file name.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".tmp"
    if keep_suffix:
        suffix += ".nii.gz" if target.name.endswith(".nii.gz") else target.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():  # mkstemp creates 0600: give the file the permissions the user's umask gives
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_table(df: pd.DataFrame, path: PathLike, metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``df`` atomically as Parquet (``.parquet``/``.pq``) or CSV (``.csv``; other suffixes are refused).

    ``metadata`` (JSON-serialisable; default: the provenance in ``df.attrs["fmcib"]``, which
    :func:`fmcib.extract_features` sets) goes into the Parquet schema metadata under the key ``fmcib``;
    for CSV it is written atomically to the sidecar ``<path>.json``. Other ``df.attrs`` are not written.
    """
    target = check_table_output(path)
    if metadata is None:
        metadata = df.attrs.get("fmcib")
    df = pd.DataFrame(df, copy=False)  # without attrs: pandas would try to serialise them into Parquet
    if target.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise TableError("writing Parquet needs pyarrow: pip install 'fmcib[parquet]' (or write .csv)") from exc
        table = pa.Table.from_pandas(df, preserve_index=False)
        if metadata is not None:
            merged = dict(table.schema.metadata or {})
            merged[b"fmcib"] = json.dumps(metadata).encode()
            table = table.replace_schema_metadata(merged)
        with atomic_path(target) as tmp:
            pq.write_table(table, tmp)
    else:
        with atomic_path(target) as tmp:
            df.to_csv(tmp, index=False)
        if metadata is not None:
            with atomic_path(_sidecar(target)) as tmp:
                tmp.write_text(json.dumps(metadata, indent=1))


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_table_metadata(path: PathLike) -> dict[str, Any] | None:
    """Return the fmcib metadata written by :func:`write_table` (Parquet metadata or JSON sidecar)."""
    p = Path(path)
    if p.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        raw = (pq.read_schema(p).metadata or {}).get(b"fmcib")
        return json.loads(raw) if raw else None
    side = _sidecar(p)
    return json.loads(side.read_text()) if side.is_file() else None


def check_table_output(path: PathLike) -> Path:
    """Check, before any work, that a table can be written to ``path``: a ``.csv``, ``.parquet`` or ``.pq``
    name, and pyarrow installed for Parquet.

    Raises
    ------
    TableError
        Another suffix (it would silently get CSV text), or Parquet without pyarrow.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise TableError(f"'{target}': output tables are .csv or .parquet (got {suffix or 'no suffix'!r})")
    if suffix in (".parquet", ".pq"):
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise TableError(f"'{target}': writing Parquet needs pyarrow: pip install 'fmcib[parquet]' "
                             "(or write .csv)") from exc
    return target


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_outputs(inputs: Mapping[str, PathLike | None], outputs: Mapping[str, PathLike | None]) -> None:
    """Refuse, before any work, an output that is one of the inputs (the input would be overwritten or deleted).

    ``inputs`` and ``outputs`` map a description (``"--csv"``, ``"errors file"``) to a path; None entries are
    skipped. Give the files a command writes, not their folder: an input beside them is not in the way.

    Raises
    ------
    FmcibError
        Naming the output and the input it would destroy.
    """
    for out_name, out in outputs.items():
        if out is None:
            continue
        o = Path(out)
        for in_name, given in inputs.items():
            if given is None:
                continue
            i = Path(given)
            if _same_file(o, i):
                raise FmcibError(f"{out_name} '{o}' is the {in_name} '{i}': it would be overwritten; choose "
                                 "another output")


class OutputLock:
    """``<path>.lock``, held while one run writes ``path``: a second run on the same output refuses to start.

    A lock left by a run that died (its process is gone) is taken over.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(str(path) + ".lock")

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    raise FmcibError(
                        f"another fmcib run (pid {holder}) is writing '{str(self.path)[:-5]}'; wait for it to "
                        f"finish (or, if it is gone, remove '{self.path}')") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise FmcibError(f"could not take the lock '{self.path}'")

    def _holder(self) -> int | None:
        """The live process holding the lock, or None when the lock is stale."""
        try:
            pid = int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return None
        if pid <= 0 or pid == os.getpid():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return None if _is_zombie(pid) else pid

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _is_zombie(pid: int) -> bool:
    """Linux: the process has died and only waits to be reaped (a killed run whose parent died too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"
