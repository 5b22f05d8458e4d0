"""``python -m fmcib ...``: the same commands as ``fmcib ...``."""

from .cli import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="fmcib")
