"""The whole pipeline: `SMOKE=1 bash run_all.sh` on both backbones, offline."""
import csv
import json
import os
import shutil
import subprocess

import pytest
import torch

import common
from conftest import ROOT


def smoke(out, backbone, extra_env=None):
    env = {**os.environ, "SMOKE": "1", "BACKBONE": backbone, "OUTPUT_DIR": str(out), "HF_HUB_OFFLINE": "1",
           **(extra_env or {})}
    return subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("backbone,tiny", [("sd15", "tiny-sd15"), ("sd35m", "tiny-sd3")])
def test_smoke_run_end_to_end(backbone, tiny, tmp_path):
    out = tmp_path / "smoke"
    result = smoke(out, backbone)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    # 1. curation: pairs with the SPEC §2 columns, files that exist
    with open(out / "pairs" / "pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6  # 8 procedural photos, --top_k 6
    for column in ("uid", "prompt", "real_image_path", "fake_image_path", "pickscore_real", "pickscore_fake",
                   "color_real", "color_fake"):
        assert column in rows[0]
    assert all((out / "pairs" / row["fake_image_path"]).is_file() for row in rows)

    # 2-3. checkpoints of both stages load into a stock pipeline and change it
    pipe = common.load_pipeline(str(out / "tiny-models" / tiny))
    bb = common.Backbone(pipe, "cpu")
    cond = bb.encode_prompts(["a red ball"])
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), bb.sample_timesteps(1)
    base = bb.predict(bb.net, x, t, cond)
    for stage in ("stage1", "stage2"):
        pipe.load_lora_weights(str(out / stage / "checkpoint-4"), adapter_name=stage)
        pipe.set_adapters(stage)
        assert not torch.allclose(bb.predict(bb.net, x, t, cond), base)
        assert (out / stage / "checkpoint-4" / "grid.png").is_file() and (out / stage / "curves.png").is_file()
        log = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 3, 4]

    # 4. Table 1: every method and every requested metric, with finite values
    results = json.loads((out / "eval" / "results.json").read_text())
    assert [m["name"] for m in results["methods"]] == ["base", "stage1", "realalign"]
    for method in ("base", "stage1", "realalign"):
        for metric in ("pickscore", "sgp", "laplacian", "clip"):
            value = results["results"][method][metric]
            assert value["n"] == 6 and value["missing"] == 0 and value["mean"] == value["mean"]
    assert "| realalign |" in (out / "eval" / "results.md").read_text()
    assert (out / "eval" / "figure2.png").is_file() and (out / "eval" / "grid.png").is_file()

    # a rerun skips every finished step
    if backbone == "sd15":
        again = smoke(out, backbone)
        assert again.returncode == 0
        assert again.stdout.count("done already, skipped") == 6


def make_user_photos(folder):
    """A user's folder: photos of odd sizes and formats, captioned by .txt
    files and by a metadata.jsonl; one grayscale photo (colorfulness 0, so
    the colorfulness filter drops it) and one without a caption (skipped)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)

    def blocks(height, width):  # large blocks of saturated colours: a colourful "photo"
        palette = np.array([[230, 20, 20], [20, 200, 40], [20, 40, 230], [250, 220, 10], [220, 20, 200]])
        cells = rng.integers(0, len(palette), (height // 16 + 1, width // 16 + 1))
        return palette[cells.repeat(16, 0).repeat(16, 1)[:height, :width]].astype("uint8")

    Image.fromarray(blocks(200, 300)).save(folder / "beach.jpg", quality=90)          # landscape JPEG
    (folder / "beach.txt").write_text("a sunny beach with colourful umbrellas\n")
    rgba = np.dstack([blocks(97, 64), np.full((97, 64), 255, "uint8")])
    Image.fromarray(rgba, "RGBA").save(folder / "Market Stall.PNG")                     # portrait RGBA, spaces
    (folder / "Market Stall.txt").write_text("fruit on a market stall")
    Image.fromarray(blocks(50, 51)).save(folder / "kite.webp")                          # tiny WebP
    Image.fromarray(blocks(40, 40)).save(folder / "flowers.bmp")
    Image.fromarray(rng.integers(0, 255, (80, 120), dtype="uint8"), "L").save(folder / "old_photo.jpg")
    (folder / "metadata.jsonl").write_text(
        '{"file_name": "kite.webp", "text": "a kite in a blue sky"}\n'
        '{"file_name": "flowers.bmp", "text": "a bunch of flowers"}\n'
        '{"file_name": "old_photo.jpg", "text": "a grey old photograph"}\n')
    Image.fromarray(blocks(64, 64)).save(folder / "no_caption.png")
    return {"beach": folder / "beach.jpg", "Market Stall": folder / "Market Stall.PNG",
            "kite": folder / "kite.webp", "flowers": folder / "flowers.bmp"}


def test_smoke_run_on_the_users_own_photos(tmp_path):
    """`SMOKE=1 REAL_IMAGES=folder bash run_all.sh`: the pairs are made from the user's files."""
    from PIL import Image

    import curate

    photos = make_user_photos(tmp_path / "my photos")
    out = tmp_path / "smoke"
    result = smoke(out, "sd15", {"REAL_IMAGES": str(tmp_path / "my photos")})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    with open(out / "pairs" / "pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # every colourful captioned photo became a pair; the grey one failed colorfulness, no_caption was skipped
    assert sorted(row["uid"] for row in rows) == sorted(photos)
    captions = {"beach": "a sunny beach with colourful umbrellas", "kite": "a kite in a blue sky"}
    for row in rows:
        if row["uid"] in captions:
            assert row["prompt"] == captions[row["uid"]]
        # the real image of the pair is the user's photo, centre-cropped to the smoke run's 32 px
        with Image.open(photos[row["uid"]]) as source:
            expected = curate.common.center_crop_resize(source, 32)
        with Image.open(out / "pairs" / row["real_image_path"]) as real:
            assert real.size == (32, 32)
            assert list(real.convert("RGB").getdata()) == list(expected.convert("RGB").getdata())
    with open(out / "pairs" / "scores.csv", newline="") as f:
        removed = {row["uid"]: row["removed_by"] for row in csv.DictReader(f)}
    assert removed["old_photo"] == "colorfulness" and "no_caption" not in removed
    summary = json.loads((out / "pairs" / "summary.json").read_text())
    assert summary["missing_caption"] == 1 and summary["kept_pairs"] == 4
    # the rest of the pipeline ran on these pairs
    assert (out / "stage2" / "checkpoint-4").is_dir() and (out / "eval" / "results.md").is_file()


def test_interrupted_stage_resumes(tmp_path):
    """A failed step stops the run with its name; the rerun continues it."""
    out = tmp_path / "smoke"
    # a pairs CSV that cannot be read makes stage1 fail after curation
    first = smoke(out, "sd15", {"STAGE1_BATCH": "0"})
    assert first.returncode != 0 and "step 'stage1' failed" in first.stderr
    assert (out / ".done-curate").exists() and not (out / ".done-stage1").exists()
    second = smoke(out, "sd15")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "curate: done already, skipped" in second.stdout


def test_real_run_without_gpu_fails_fast_and_points_to_smoke(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH without nvidia-smi
    bin_dir.mkdir()
    for tool in ("python", "bash", "timeout", "grep", "mkdir", "cat", "dirname", "touch"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), bin_dir / tool)
    env = {**os.environ, "PATH": str(bin_dir), "OUTPUT_DIR": str(tmp_path / "out")}
    env.pop("SMOKE", None)
    result = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0
    assert "no GPU found" in result.stderr and "SMOKE=1 bash run_all.sh" in result.stderr


def test_benchmark_runs_on_the_tiny_config(tmp_path):
    """tests/benchmark.py end to end on the tiny model (figures printed, not asserted)."""
    result = subprocess.run(["python", str(ROOT / "tests" / "benchmark.py"), "--arch", "tiny", "--resolution", "32",
                             "--batch", "2", "--steps", "1", "--points_per_trajectory", "2", "--workdir", str(tmp_path), "--out",
                             str(tmp_path / "bench.json")], capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-3000:]
    labels = [r["label"] for r in json.loads((tmp_path / "bench.json").read_text())]
    assert labels == ["stage1 (ours)", "stage1 (baseline)", "stage1 (ours-2pts)", "stage2 (ours)", "stage2 (baseline)"]
