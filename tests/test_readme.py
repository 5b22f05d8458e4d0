"""Every code block of the README runs as written from the repository root, on the bundled data."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import put_in_hub_cache, random_trunk

ROOT = Path(__file__).resolve().parents[1]
# Lines the suite does not run itself: the install (CI runs exactly these lines) and the test command.
NOT_RUN_HERE = ("pip install ", "python -m pytest")


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced python and bash block, in README order."""
    return re.findall(r"```(python|bash)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.fixture(scope="module")
def repository_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository root as a user sees it (examples/ and its data), with the default model's weights served
    offline from the Hugging Face cache at the registry's path (random weights of the real architecture)."""
    pytest.importorskip("torch")
    import torch

    from fmcib.models import get_model_config

    cfg = get_model_config("resnet50_3d.fmcib")
    weights = tmp_path_factory.mktemp("weights") / "model_weights.torch"
    torch.save({"trunk_state_dict": random_trunk(cfg, seed=11)}, weights)
    put_in_hub_cache(cfg.weights.hf_hub_id, {cfg.weights.hf_filename: weights})
    weights.unlink()
    work = tmp_path_factory.mktemp("repository")
    shutil.copytree(ROOT / "examples", work / "examples")
    return work


def test_readme_has_python_and_shell_blocks():
    languages = [lang for lang, _ in readme_blocks()]
    assert languages.count("python") >= 2 and languages.count("bash") >= 3


def test_every_readme_block_runs_as_written(repository_copy):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    ran = 0
    for lang, code in readme_blocks():
        commands = [code] if lang == "python" else [line for line in code.splitlines() if line.strip()]
        for command in commands:
            if lang == "bash" and command.strip().startswith(NOT_RUN_HERE):
                continue
            argv = [sys.executable, "-c", command] if lang == "python" else ["bash", "-c", command]
            done = subprocess.run(argv, cwd=repository_copy, env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"README {lang} block failed:\n{command}\n{done.stderr[-3000:]}"
            ran += 1
    assert ran >= 12
    for made in ("features.parquet", "seeds.csv", "probe.json", "preds.csv", "surv/km.png", "tsne.png", "stab.csv",
                 "f_stable.parquet", "qc.png", "survival/survival.json"):
        assert (repository_copy / made).is_file(), made
