"""Print requirement lines from pyproject.toml for the CI jobs that do not use the README's install.

    python .ci/requirements.py --without-torch   # direct + test dependencies, less torch and MONAI
    python .ci/requirements.py --lowest          # each direct (and Parquet, DICOM) dependency pinned to its lower bound
    python .ci/requirements.py --lowest-tests    # the test tools for that job (highdicom needs numpy 2: left out)
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

TORCH_STACK = {"torch", "monai"}  # MONAI requires torch
NEEDS_NUMPY_2 = {"highdicom"}  # cannot join the lowest versions (numpy 1.24); its tests skip there


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def main() -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    direct = list(project["dependencies"])
    test = list(project["optional-dependencies"]["test"])
    if sys.argv[1:] == ["--without-torch"]:
        print("\n".join(r for r in direct + test if _name(r) not in TORCH_STACK))
    elif sys.argv[1:] == ["--lowest"]:
        extras = project["optional-dependencies"]
        for r in [*direct, *extras["parquet"], *(d for d in extras["dicom"] if _name(d) not in NEEDS_NUMPY_2)]:
            low = re.search(r">=\s*([0-9][^,;\s]*)", r)
            if low is None:
                sys.exit(f"{r!r} has no lower bound")
            if _name(r) != "torch":  # the CPU wheel on disk (2.13.0) is the only torch CI can install
                print(f"{_name(r)}=={low.group(1)}")
    elif sys.argv[1:] == ["--lowest-tests"]:
        print("\n".join(r for r in test if _name(r) not in NEEDS_NUMPY_2))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
