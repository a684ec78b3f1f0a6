"""The whole pipeline: `SMOKE=1 bash run_all.sh` on both backbones, offline."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import common
from conftest import ROOT


def python_first_on_path(directory):
    """A folder whose `python` is this interpreter (sys.executable), for run_all.sh,
    which calls `python`: the tests then run the interpreter they were started
    with, whatever `python` the PATH would give."""
    directory.mkdir(parents=True, exist_ok=True)
    wrapper = directory / "python"  # a script, not a symlink: a venv's python finds its venv through its path
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return str(directory)


def smoke(out, backbone, extra_env=None):
    path = python_first_on_path(out.parent / "python-bin") + os.pathsep + os.environ.get("PATH", "")
    env = {**os.environ, "SMOKE": "1", "BACKBONE": backbone, "OUTPUT_DIR": str(out), "HF_HUB_OFFLINE": "1",
           "PATH": path, **(extra_env or {})}
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
        # a step whose settings changed is not skipped: more Stage-2 steps
        # resume Stage 2 from its state (the other steps stay done)
        longer = smoke(out, backbone, {"STAGE2_STEPS": "6"})
        assert longer.returncode == 0, longer.stderr[-3000:]
        assert "stage2: its settings changed since it was done" in longer.stdout
        assert longer.stdout.count("done already, skipped") == 5
        log = [json.loads(line) for line in (out / "stage2" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and (out / "stage2" / "checkpoint-6").is_dir()


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
    python_first_on_path(bin_dir)
    for tool in ("bash", "timeout", "grep", "mkdir", "cat", "dirname", "touch"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), bin_dir / tool)
    env = {**os.environ, "PATH": str(bin_dir), "OUTPUT_DIR": str(tmp_path / "out")}
    env.pop("SMOKE", None)
    result = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0
    assert "no GPU found" in result.stderr and "SMOKE=1 bash run_all.sh" in result.stderr


def test_benchmark_runs_on_the_tiny_config(tmp_path):
    """tests/benchmark.py end to end on the tiny model (figures printed, not asserted)."""
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "benchmark.py"), "--arch", "tiny", "--resolution", "32",
                             "--batch", "2", "--steps", "1", "--points_per_trajectory", "2", "--workdir", str(tmp_path), "--out",
                             str(tmp_path / "bench.json")], capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-3000:]
    labels = [r["label"] for r in json.loads((tmp_path / "bench.json").read_text())]
    assert labels == ["stage1 (ours)", "stage1 (baseline)", "stage1 (ours-2pts)", "stage2 (ours)", "stage2 (baseline)"]
