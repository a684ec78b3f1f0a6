"""Shared fixtures: the tiny offline models, built once per test session."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One torch thread here and in every subprocess (set before torch loads): the tiny models' kernels are too
# small to gain from a second thread, and with the test process, torchrun's pairs and the smoke runs sharing
# two cores, thread contention made them several times slower (test_curate.py measured ~10x).
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tiny_models import build_tiny_models, draw_disc_image  # noqa: E402


def pytest_collection_modifyitems(items):
    """The end-to-end smoke runs are about a third of the suite: they start first, each on its own worker
    (pytest.ini runs pytest-xdist), while the other worker works through the rest."""
    items.sort(key=lambda item: "test_smoke_run_end_to_end" not in item.nodeid)


@pytest.fixture(scope="session")
def tiny_models_build(tmp_path_factory):
    """The tiny models, built once per test run by the command the smoke run's
    first step runs (`python tests/tiny_models.py tiny-models DIR`): (folder,
    its stderr). tests/test_figures.py reads that stderr; the smoke runs copy
    the folder instead of building it again."""
    import subprocess

    folder = tmp_path_factory.mktemp("tiny-models")
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "tiny_models.py"), "tiny-models", str(folder)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, result.stderr


@pytest.fixture(scope="session")
def tiny_models(tiny_models_build):
    """{"sd15", "sd15-inpaint", "sd3", "clip"} -> folder of a tiny random model."""
    return build_tiny_models(tiny_models_build[0])  # built already: only the paths


@pytest.fixture(autouse=True)
def no_training_curves(request, monkeypatch):
    """curves.png costs 2-3 s of matplotlib per checkpoint on this CPU, most of a tiny training run: the
    in-process tests of training do without it. tests/test_figures.py draws and checks it, and the smoke
    runs (subprocesses: run_all.sh) draw it at every checkpoint."""
    if request.module.__name__ != "test_figures":
        import common

        monkeypatch.setattr(common, "plot_training_curves", lambda *args, **kwargs: [])


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
