"""Training crops: each seed's patch enlarged by a margin, every scan read once, held in memory or on disk.

Training samples are cut from these crops (augmented shifts and rotations stay inside the margin), so the
scans are read once per run, not once per epoch. In memory, each process holds every crop: about 4 MB per
lesion for a 50^3 patch with SimCLR's margin, 46 GB for the paper's 11,467 lesions. A **crop store**
(``crop_store=DIR``, ``--crop-store DIR``) keeps them in one memory-mapped file instead:

- ``DIR/crops.f32``: the crops, float32, C order, ``(n, z, y, x)``, in table order;
- ``DIR/crops.json``: the rows they belong to, the rows that could not be read (with their reasons), the
  shape, the patch contract, and a key.

The index is written last and atomically, so a store with an index is complete. The key covers what the
crops depend on: the table's rows, seeds, masks and labels, the size and modification time of every
image and mask file, the contract, the coordinate system and the fmcib version. A store whose key
matches is reused without reading any scan (a resumed or repeated run starts at once); any other store
in ``DIR`` is replaced. Under ``torchrun`` the processes share one store: each reads its share of the
scans (whole scans, balanced by seed count) into it, then rank 0 removes the holes left by unreadable
rows; on several machines ``DIR`` must be on a file system they all see. The pages are the operating
system's to cache, so the processes of one machine share them, and a stored array (:class:`StoredCrops`)
pickles by reference: data-loader workers map the file, whatever their start method.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._version import __version__
from ..distributed import DistributedContext, gather_objects, on_main_process
from ..files import atomic_path
from ..preprocessing import PreprocessConfig
from ..scans import RowError, ScanDataset, ScanTask, plan_scans, shard_scans

__all__ = ["STORE_DATA", "STORE_INDEX", "StoredCrops", "read_crops"]

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
STORE_DATA, STORE_INDEX = "crops.f32", "crops.json"
_FLOAT_BYTES = 4


class StoredCrops(np.memmap):
    """A read-only memory map of a crop store that pickles by reference (file, byte offset, shape): loader
    workers started by spawn or forkserver (macOS, Windows; Linux from Python 3.14) map the file again instead
    of receiving a copy of every crop. A copy (fancy indexing) or a non-contiguous view pickles its values."""

    def __reduce__(self) -> Any:
        position = self._file_position()
        if position is None:
            return np.asarray(self).copy().__reduce__()
        return _open_stored, (self.filename, position, self.shape)

    def _file_position(self) -> int | None:
        """Where this array's first element lies in the file, when it is a C-contiguous view of the map."""
        if getattr(self, "_mmap", None) is None or self.filename is None or not self.flags.c_contiguous:
            return None
        import mmap

        start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY  # where numpy's map begins in the file
        mapped = np.frombuffer(self._mmap, np.uint8)
        return start + (self.__array_interface__["data"][0] - mapped.__array_interface__["data"][0])


def _open_stored(filename: str, position: int, shape: tuple[int, ...]) -> np.ndarray:
    """Map ``shape`` float32 crops of a store at byte ``position`` (the inverse of pickling a StoredCrops)."""
    if not int(np.prod(shape)):
        return np.zeros(shape, np.float32)
    return StoredCrops(filename, np.float32, mode="r", offset=position, shape=shape)


def read_crops(table: pd.DataFrame, config: PreprocessConfig, margin: int = 0, coords: str = "lps",
               base_dir: str | os.PathLike | None = None, rows: Sequence[int] | None = None,
               num_workers: int = 0, name: str = "table", store: str | os.PathLike | None = None,
               context: DistributedContext | None = None) -> tuple[np.ndarray, np.ndarray, list[RowError]]:
    """Each seed's patch enlarged by ``margin`` voxels per side, every scan read once.

    Parameters
    ----------
    table, config, margin, coords, base_dir, rows, name
        The seeds table (``rows``: a subset of its positions), the model's contract, the margin, the seeds'
        coordinate system, the folder relative paths start from, and the table's name in messages.
    num_workers : int
        Processes reading scans.
    store : folder, optional
        Keep the crops in a memory-mapped file in this folder instead of in memory (see the module
        docstring); a matching store is reused.
    context : DistributedContext, optional
        Under torchrun, with a ``store``: the processes share the reading and the store.

    Returns
    -------
    rows : int array
        Table positions of the crops, in table order.
    crops : float32 array ``(n, z, y, x)``
        Normalised as the contract says, on the patch lattice (read-only and memory-mapped with a ``store``).
    errors : list of RowError
        Rows that could not be read (the others are kept).
    """
    enlarged = config.enlarged(margin) if margin else config
    single = PreprocessConfig(**{**enlarged.to_dict(), "channels": 1})  # channels are added per sample
    tasks = plan_scans(table, base_dir=base_dir, rows=rows, name=name)
    planned = np.sort(np.fromiter((s.row for t in tasks for s in t.seeds), np.int64))
    x, y, z = single.size_xyz
    shape = (len(planned), z, y, x)
    if store is not None:
        return _stored_crops(Path(store), tasks, planned, shape, coords, single, num_workers,
                             context or DistributedContext(), name)
    _warn_if_too_large(shape, name)
    crops = np.empty(shape, np.float32)
    found, errors = _fill(crops, planned, tasks, coords, single, num_workers)
    kept = _compact(crops, planned, found)
    return kept, crops[:len(kept)], errors


def _fill(target: np.ndarray, planned: np.ndarray, tasks: Sequence[ScanTask], coords: str, config: PreprocessConfig,
          num_workers: int) -> tuple[np.ndarray, list[RowError]]:
    """Read ``tasks`` and write each crop at its row's place in ``target``; the rows read and the errors."""
    dataset = ScanDataset(tasks, coords, config)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity)
    found, errors = [], []
    for item in loader:
        if len(item["rows"]):
            target[np.searchsorted(planned, item["rows"])] = item["patches"][:, 0]
        found.append(np.asarray(item["rows"], np.int64))
        errors += item["errors"]
    return (np.concatenate(found) if found else np.zeros(0, np.int64)), sorted(errors, key=lambda e: e.row)


def _compact(target: np.ndarray, planned: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Move the crops that were read to the front of ``target``, in table order (in place: each moves to an
    earlier or the same place); returns their rows."""
    keep = np.flatnonzero(np.isin(planned, found))
    for j, i in enumerate(keep):
        if i != j:
            target[j] = target[i]
    return planned[keep]


def _identity(item: Any) -> Any:
    return item


def _available_memory() -> int | None:
    """Bytes of memory available for new allocations (Linux's MemAvailable, which counts reclaimable cache;
    elsewhere the free pages), None when the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _warn_if_too_large(shape: tuple[int, ...], name: str) -> None:
    """A warning when the crops of this machine's processes would take more than half of the memory available."""
    each = int(np.prod(shape)) * _FLOAT_BYTES
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun: every process holds its own copy
    available = _available_memory()
    if available is not None and each * processes > available / 2:
        logger.warning("%s: %d crops take %.1f GB in the memory of each of %d process(es) (%.1f GB available); give "
                       "a crop store (crop_store=DIR, --crop-store DIR) to keep them on disk", name, shape[0],
                       each / 1e9, processes, available / 1e9)


def _file_state(path: str | None) -> list[int] | None:
    """Size and modification time of a file (or a DICOM folder), None when it cannot be seen."""
    if not path:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [int(stat.st_size), int(stat.st_mtime_ns)]


def _store_key(tasks: Sequence[ScanTask], coords: str, config: PreprocessConfig) -> str:
    """What the crops depend on, hashed: rows, seeds, files (size and time), contract, coordinates, version."""
    scans = [[t.image, t.series_uid, _file_state(t.image),
              [[s.row, None if s.point is None else [repr(v) for v in s.point], s.mask, _file_state(s.mask),
                repr(s.label)] for s in t.seeds]] for t in tasks]
    content = {"format": STORE_FORMAT, "fmcib": __version__, "contract": config.to_dict(), "coords": coords,
               "scans": scans}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _read_index(folder: Path, key: str) -> dict[str, Any] | None:
    """The store's index when the store is complete and was made for ``key``."""
    try:
        index = json.loads((folder / STORE_INDEX).read_text())
        complete = os.path.getsize(folder / STORE_DATA) == int(np.prod(index["shape"])) * _FLOAT_BYTES
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return index if complete and index.get("format") == STORE_FORMAT and index.get("key") == key else None


def _stored_crops(folder: Path, tasks: Sequence[ScanTask], planned: np.ndarray, shape: tuple[int, ...], coords: str,
                  config: PreprocessConfig, num_workers: int, context: DistributedContext, name: str,
                  ) -> tuple[np.ndarray, np.ndarray, list[RowError]]:
    """:func:`read_crops` into the store in ``folder`` (shared by the processes), or from it when it matches."""
    key = _store_key(tasks, coords, config)
    data, partial = folder / STORE_DATA, folder / (STORE_DATA + ".partial")
    reuse = on_main_process(lambda: _read_index(folder, key) is not None, context)
    if reuse:
        if context.is_main:
            logger.info("%s: crops read from the store %s", name, folder)
    else:
        def create() -> None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / STORE_INDEX).unlink(missing_ok=True)  # the index goes first: no store looks complete
            data.unlink(missing_ok=True)
            with open(partial, "wb") as f:
                f.truncate(int(np.prod(shape)) * _FLOAT_BYTES)

        on_main_process(create, context)
        mine = shard_scans(tasks, context.world_size)[context.rank] if context.distributed else tasks
        found, errors = np.zeros(0, np.int64), []
        if len(planned):
            target = np.memmap(partial, np.float32, mode="r+", shape=shape)
            found, errors = _fill(target, planned, mine, coords, config, num_workers)
            target.flush()
            del target
        parts = gather_objects((found, errors), context)

        def finish() -> None:
            every = np.concatenate([p[0] for p in parts])
            failed = sorted((e for p in parts for e in p[1]), key=lambda e: e.row)
            kept = np.zeros(0, np.int64)
            if len(planned):
                target = np.memmap(partial, np.float32, mode="r+", shape=shape)
                kept = _compact(target, planned, every)
                target.flush()
                del target
            os.truncate(partial, len(kept) * int(np.prod(shape[1:])) * _FLOAT_BYTES)
            os.replace(partial, data)
            index = {"format": STORE_FORMAT, "key": key, "table": name, "shape": [len(kept), *shape[1:]],
                     "rows": kept.tolist(), "errors": [dataclasses.asdict(e) for e in failed],
                     "contract": config.to_dict(), "fmcib": __version__}
            with atomic_path(folder / STORE_INDEX) as tmp:
                tmp.write_text(json.dumps(index))

        on_main_process(finish, context)
    index = json.loads((folder / STORE_INDEX).read_text())
    crops = _open_stored(str(data), 0, tuple(index["shape"]))
    return np.asarray(index["rows"], np.int64), crops, [RowError(**e) for e in index["errors"]]
