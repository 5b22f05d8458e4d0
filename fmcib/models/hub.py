"""Locating weights: Hugging Face Hub (its cache, revisions, ``HF_HUB_OFFLINE``), then mirrors such as Zenodo."""

from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path, PurePosixPath

from ..exceptions import WeightsError
from .checkpoints import CONFIG_NAME, LEGACY_SUFFIXES, WEIGHTS_NAME, fmcib_cache_dir, sha256_file
from .registry import ModelConfig

__all__ = ["fmcib_cache_dir", "hub_offline", "download_hub_layout", "resolve_registry_weights", "parse_hub_name",
           "push_to_hub"]

logger = logging.getLogger(__name__)
_WEIGHT_SUFFIXES = (".safetensors",) + LEGACY_SUFFIXES


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (no network: Hub cache only, no HTTP mirrors)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """``"hf-hub:org/repo@rev"`` -> ``("org/repo", "rev")``."""
    spec = name[len("hf-hub:"):] if name.startswith("hf-hub:") else name
    repo, _, rev = spec.partition("@")
    return repo, (rev or None)


def _download(repo_id: str, filename: str, revision: str | None, local_only: bool = False) -> Path:
    from huggingface_hub import hf_hub_download

    from .._version import __version__

    return Path(hf_hub_download(repo_id, filename, revision=revision, library_name="fmcib",
                                library_version=__version__, local_files_only=local_only))


def download_hub_layout(repo_id: str, revision: str | None = None) -> Path:
    """Fetch (or find in the cache) ``config.json`` + ``model.safetensors`` of an fmcib-layout repo; return the folder."""
    try:
        config_path = _download(repo_id, CONFIG_NAME, revision)
        _download(repo_id, WEIGHTS_NAME, revision)
    except Exception as exc:
        raise WeightsError(
            f"could not get {CONFIG_NAME} and {WEIGHTS_NAME} of Hub repo '{repo_id}'"
            f"{'@' + revision if revision else ''} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Looked in the Hugging Face cache {_hub_cache_dir()}"
            f"{' (HF_HUB_OFFLINE is set)' if hub_offline() else ''}. Download it where there is network "
            f"(`hf download {repo_id}`) and copy the cache, or pass the folder with weights=..."
        ) from exc
    return config_path.parent


def _pick_weights_file(names: list[str], folder: str) -> str | None:
    """The weights file in ``folder`` among repository file names: safetensors first, then legacy suffixes."""
    inside = [n for n in names if str(PurePosixPath(n).parent) == folder.rstrip("/")]
    for suffix in _WEIGHT_SUFFIXES:
        hits = sorted(n for n in inside if n.endswith(suffix))
        if hits:
            return hits[0]
    return None


_REACHABLE: dict[str, bool] = {}


def reachable(url: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout_s`` (asked once per host and process).

    Without network, one quick look decides, instead of each client's own retries and timeouts.
    """
    import socket

    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https"):
        return True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    key = f"{parsed.hostname}:{port}"
    if key not in _REACHABLE:
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
            _REACHABLE[key] = True
        except OSError:
            _REACHABLE[key] = False
            logger.info("%s is not reachable: working from local caches only", key)
    return _REACHABLE[key]


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _from_hub(config: ModelConfig, revision: str | None) -> Path:
    """Weights file of a registry entry from the Hub, listing its folder when the expected name is absent."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError  # also in 0.23 (errors: 0.24+)

    src = config.weights
    if src is None or not (src.hf_hub_id and src.hf_filename):
        raise WeightsError(f"model {config.name!r} has no Hugging Face Hub location")
    rev = revision or src.revision
    local_only = hub_offline() or not reachable(_hub_endpoint())
    try:
        return _download(src.hf_hub_id, src.hf_filename, rev, local_only=local_only)
    except (EntryNotFoundError, LocalEntryNotFoundError) as exc:
        folder = str(PurePosixPath(src.hf_filename).parent)
        if local_only or isinstance(exc, LocalEntryNotFoundError):
            # Offline: look at what the cache holds for that folder.
            snap = Path(snapshot_download(src.hf_hub_id, revision=rev, allow_patterns=[f"{folder}/*"],
                                          local_files_only=True))
            names = [str(p.relative_to(snap).as_posix()) for p in (snap / folder).glob("*") if p.is_file()]
        else:
            names = HfApi().list_repo_files(src.hf_hub_id, revision=rev)
        chosen = _pick_weights_file(names, folder)
        if chosen is None:
            raise
        logger.info("'%s' not in %s; using '%s' from the same folder", src.hf_filename, src.hf_hub_id, chosen)
        return _download(src.hf_hub_id, chosen, rev, local_only=local_only)


def _from_mirror(url: str) -> Path:
    """Download ``url`` once into the fmcib cache (atomic), or reuse the cached copy."""
    import hashlib

    from torch.hub import download_url_to_file

    parsed = urllib.parse.urlparse(url)
    target = fmcib_cache_dir() / "mirrors" / hashlib.sha1(url.encode()).hexdigest()[:16] / PurePosixPath(parsed.path).name
    if target.is_file():
        return target
    if hub_offline() and parsed.scheme in ("http", "https"):
        raise WeightsError(f"{url} not downloaded: HF_HUB_OFFLINE is set")
    if not reachable(url):
        raise WeightsError(f"{url} not downloaded: {parsed.hostname} is not reachable from here")
    target.parent.mkdir(parents=True, exist_ok=True)
    download_url_to_file(url, str(target), progress=True)  # writes a temporary file, then renames
    return target


def resolve_registry_weights(config: ModelConfig, revision: str | None = None) -> tuple[Path, str]:
    """Find the weights file of a registry entry: the Hub first, then each mirror. Returns (path, source).

    Raises
    ------
    WeightsError
        No source had the file; the message lists every place looked and how to supply the weights.
    """
    src = config.weights
    if src is None:
        raise WeightsError(f"model {config.name!r} has no published weights (use pretrained=False)")
    tried = []
    if src.hf_hub_id and src.hf_filename:
        try:
            path, source = _from_hub(config, revision), f"hf-hub:{src.hf_hub_id}/{src.hf_filename}"
            return _verified(path, src.sha256, source), source
        except WeightsError:
            raise
        except Exception as exc:
            tried.append(f"Hugging Face Hub {src.hf_hub_id}/{src.hf_filename}"
                         f"{'@' + (revision or src.revision) if (revision or src.revision) else ''} "
                         f"(cache {_hub_cache_dir()}): {type(exc).__name__}")
    for url in src.urls:
        try:
            path = _from_mirror(url)
            return _verified(path, src.sha256, url), url
        except WeightsError as exc:
            if "checksum" in str(exc):
                raise
            tried.append(f"{url}: {exc}")
        except Exception as exc:
            tried.append(f"{url}: {type(exc).__name__}: {exc}")
    looked = f"weights of {config.name!r} not found. Looked in: " + "; ".join(tried) + ". "
    fetch = (f"Offline? Fetch them where there is network (`hf download {src.hf_hub_id} {src.hf_filename}` or "
             "`fmcib weights download`, then copy the Hugging Face cache), ")
    raise WeightsError(
        looked + fetch + "or pass a local file or folder: weights='model_weights.torch'. To try the pipeline "
        "without them: model='resnet50_3d.random' (random weights: features without research value).",
        cli=looked + fetch + "or pass a local file or folder: --weights model_weights.torch. To try the pipeline "
        "without them: --model resnet50_3d.random (random weights: features without research value).",
    )


def _verified(path: Path, expected: str | None, source: str) -> Path:
    if expected:
        actual = sha256_file(path)
        if actual != expected.lower():
            raise WeightsError(f"{source}: checksum mismatch for '{path}': sha256 {actual}, expected {expected}")
    return path


# Left out of an upload: resume state, locks, unfinished writes, and training crop stores (fmcib.training.crops:
# a --crop-store inside the folder holds the training data itself, possibly tens of GB).
PUSH_IGNORE = ["checkpoints/*", "*.lock", "*.tmp", ".*", "*.f32", "*.f32.partial", "*crops.json"]


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None) -> str:
    """Upload a trained folder (``config.json``, ``model.safetensors``, model card, ...) to a Hub model repo.

    The repository is created when missing; with ``revision`` the files go to that branch (created from the
    default branch when missing). Resume checkpoints and crop stores are left out. The folder must be one fmcib can load
    (its config and weights are checked first) and carry a model card (``README.md``): published weights say
    what data made them. Returns the URL of the commit.

    Raises
    ------
    WeightsError
        Not an fmcib folder, no model card, or the upload failed (the Hub's message is kept).
    """
    import json

    from huggingface_hub import HfApi

    path = Path(folder)
    for needed in (CONFIG_NAME, WEIGHTS_NAME, "README.md"):
        if not (path / needed).is_file():
            raise WeightsError(f"'{path}' has no {needed}: push a folder written by fmcib (finetune, pretrain, "
                               "weights convert), with a model card that names its training data")
    try:
        ModelConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"'{path / CONFIG_NAME}' is not an fmcib model config: {exc}") from exc
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(folder_path=str(path), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=commit_message or f"Upload {path.name} with fmcib",
                                 ignore_patterns=PUSH_IGNORE)
    except Exception as exc:  # noqa: BLE001 - HTTP, auth and network errors all end here with their message
        raise WeightsError(f"could not push '{path}' to {repo_id}: {exc}") from exc
    return str(getattr(info, "commit_url", info))
