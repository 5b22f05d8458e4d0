"""End-to-end example on the bundled real CT case: seeds from the mask, features, patch check.

Run from the repository root:  python examples/extract_example.py
Uses the published fmcib weights when they are available (Hugging Face cache or download); otherwise
(offline, no cache) it says so and runs the same architecture with random weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import fmcib
from fmcib.exceptions import WeightsError

DATA = Path(__file__).resolve().parent / "data"


def main() -> None:
    # 1. A seeds table from the tumour mask (centre of mass, LPS mm).
    seeds = fmcib.seeds_from_mask(DATA / "STS_019" / "CT_mask.nii.gz", image=DATA / "STS_019" / "CT_image.nii.gz")
    print(seeds[["coordX", "coordY", "coordZ", "volume_ml"]].round(2).to_string(index=False))

    # 2. The encoder's input patch for that seed: (1, 50, 50, 50), axes (channel, z, y, x).
    seed = seeds.loc[0, ["coordX", "coordY", "coordZ"]].to_numpy(float)
    patch = fmcib.preprocess(DATA / "STS_019" / "CT_image.nii.gz", seed)
    print(f"patch {tuple(patch.shape)}, mean HU in the central 10 mm: "
          f"{float(patch[0, 20:30, 20:30, 20:30].mean()) * 3072 - 1024:.0f}")

    # 3. Features for every row of the bundled table (relative paths resolve against its folder).
    try:
        model = fmcib.load_model()
    except WeightsError as exc:
        print(f"published weights unavailable here ({str(exc)[:80]}...); using random weights")
        model = fmcib.create_model("resnet50_3d.random", pretrained=False)
    features = fmcib.extract_features(DATA / "seeds.csv", model=model, batch_size=4, progress=False)
    print(features[["lesion_id", "pred_0", "pred_1", "pred_4095", "fmcib_padding_fraction"]].to_string(index=False))

    out = Path(tempfile.mkdtemp()) / "features.csv"
    features.to_csv(out, index=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
