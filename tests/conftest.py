"""Shared fixtures: the tiny offline models, built once per test session."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tiny_models import build_tiny_models, draw_disc_image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"sd15", "sd15-inpaint", "sd3", "clip"} -> folder of a tiny random model."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


def make_pairs(directory, n=4, size=32, seed=0, noise_fakes=False):
    """A pairs CSV of n procedural (real, fake) pairs: a coloured disc on a
    gradient (draw_disc_image of tests/tiny_models.py), and the same image with the disc
    repainted noisy grey (a stand-in for the inpainted fake), or uniform noise
    with `noise_fakes`. Paths are relative to the CSV."""
    import csv

    import numpy as np
    from PIL import Image

    directory = Path(directory)
    (directory / "real").mkdir(parents=True, exist_ok=True)
    (directory / "fake").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        real, disc = draw_disc_image(rng, size, rng.integers(0, 256, 3))
        fake = real.astype(float)
        fake[disc] = 128 + rng.normal(0, 20, (disc.sum(), 3))
        if noise_fakes:  # a loser that differs everywhere: a strong, easy preference signal
            fake = rng.uniform(0, 255, real.shape)
        uid = f"img{i:03d}"
        Image.fromarray(real).save(directory / "real" / f"{uid}.png")
        Image.fromarray(fake.clip(0, 255).astype("uint8")).save(directory / "fake" / f"{uid}.png")
        rows.append({"uid": uid, "prompt": f"a photo of disc number {i}", "real_image_path": f"real/{uid}.png",
                     "fake_image_path": f"fake/{uid}.png"})
    with open(directory / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return directory / "pairs.csv"
