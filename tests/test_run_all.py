"""The whole pipeline: `SMOKE=1 bash run_all.sh` on both backbones, offline."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

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


# paper Table 1's rows per backbone, as run_all.sh names them
ROWS = {"sd15": ["base", "diffusion_dpo", "stage1", "realalign"], "sd35m": ["base", "flow_grpo", "stage1", "realalign"]}
EXTRA_ROWS = {"sd15": ["diffusion_dpo_realalign", "realalign_released"], "sd35m": ["realalign_released"]}
ALL_ROWS = {"COMPLEMENTARITY": "1", "RELEASED": "1"}
# SD-3.5-M's smoke run adds the released LoRA's row only: its "+ RealAlign" stages are the SD-1.5 run's
# COMPLEMENTARITY steps with --init_lora (Flow-GRPO's PEFT folder) for --init_unet; their command lines are
# checked by test_run_like_authors_dry_run_shows_their_stage1_flags, Stage 1 continuing that LoRA by
# tests/test_published_formats.py (two trainings less: the suite stays within its 6 minutes).
EXTRA_ENV = {"sd15": None, "sd35m": {"RELEASED": "1"}}


def check_table(out, rows):
    """results.json holds every row and every requested metric, with finite
    values, and the rows differ from each other (each loaded its weights)."""
    results = json.loads((out / "eval" / "results.json").read_text())
    assert [m["name"] for m in results["methods"]] == rows
    for method in rows:
        for metric in ("pickscore", "sgp", "laplacian", "clip"):
            value = results["results"][method][metric]
            assert value["n"] == 6 and value["missing"] == 0 and value["mean"] == value["mean"]
    laplacian = [results["results"][m]["laplacian"]["mean"] for m in rows]
    assert len(set(laplacian)) == len(rows), laplacian
    table = (out / "eval" / "results.md").read_text()
    assert all(f"| {m} |" in table for m in rows)
    assert "paper" not in table.split("Methods:")[0]  # the smoke prompts are not a paper combination
    return results


@pytest.mark.parametrize("backbone,tiny", [("sd15", "tiny-sd15"), ("sd35m", "tiny-sd3")])
def test_smoke_run_end_to_end(backbone, tiny, tmp_path, tiny_models_build):
    """SD-1.5: a run that fails in Stage 1 and its rerun, which continues it;
    then reruns that add the opt-in rows, change settings and inputs.
    SD-3.5-M: the paper's rows and the released LoRA's in one run."""
    out = tmp_path / "smoke"
    # the session's tiny models, built by the command of the first step (conftest.py tiny_models_build):
    # that step then finds them and only lists them
    shutil.copytree(tiny_models_build[0], out / "tiny-models", ignore=shutil.ignore_patterns("released"))
    if backbone == "sd15":
        # A failed step stops the run with its name; the rerun continues it. STAGE1_BATCH=0 makes
        # stage1 fail (a value out of range) after curation.
        first = smoke(out, backbone, {"STAGE1_BATCH": "0"})
        assert first.returncode != 0 and "step 'stage1' failed" in first.stderr, first.stderr[-3000:]
        marked = {step: json.loads((out / f".done-{step}").read_text())["done"] for step in ("curate", "stage1")}
        assert marked == {"curate": True, "stage1": False}  # stage1 started, not done
    result = smoke(out, backbone, EXTRA_ENV[backbone])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    # 1. curation: pairs with the README 'Method: data' columns, files that exist
    with open(out / "pairs" / "pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6  # 8 procedural photos, --top_k 6
    for column in ("uid", "prompt", "real_image_path", "fake_image_path", "pickscore_real", "pickscore_fake",
                   "color_real", "color_fake"):
        assert column in rows[0]
    assert all((out / "pairs" / row["fake_image_path"]).is_file() for row in rows)

    # 2-3. checkpoints of both stages load into a stock pipeline and change it
    # the stock loader, as a user would (the tiny SD-3 has all three text encoders, T5 included)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(out / "tiny-models" / tiny))
    assert backbone == "sd15" or type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
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

    # 4. Table 1: every row and every requested metric, with finite values
    rows = ROWS[backbone] + ([] if backbone == "sd15" else EXTRA_ROWS[backbone])
    results = check_table(out, rows)
    assert (out / "eval" / "figure2.png").is_file() and (out / "eval" / "grid.png").is_file()
    # the released rows ran on stand-ins in their publishers' layouts, not ours
    # (tests/tiny_models.py build_tiny_released): Flow-GRPO's PEFT folder, the
    # authors' lora/learner/ checkpoint and SD-1.5 file, Diffusion-DPO's unet/
    released = out / "tiny-models" / "released"
    assert sorted(p.relative_to(released).as_posix() for p in released.rglob("*") if p.suffix != ".md"
                  and p.is_file()) == [
        "dpo-unet-sd15/unet/config.json", "dpo-unet-sd15/unet/diffusion_pytorch_model.safetensors",
        "flowgrpo-lora-sd3/adapter_config.json", "flowgrpo-lora-sd3/adapter_model.safetensors",
        "realalign-lora-sd15/pytorch_lora_weights.safetensors", "realalign-lora-sd3/lora/learner/adapter_config.json",
        "realalign-lora-sd3/lora/learner/adapter_model.safetensors"]
    table = (out / "eval" / "results.md").read_text()
    assert table.index("tiny random-weight models") < table.index("mean nothing") < table.index("| Method")
    # 5. the qualitative panel: paper Fig. 6 (SD-1.5) / Fig. 7 (SD-3.5-M), the caption's prompts, one column
    # per Table-1 row, first seed; not a copy of eval/grid.png (the Table-1 prompts)
    import evaluate

    panel = json.loads((out / "panel" / "run.json").read_text())
    assert [m["name"] for m in panel["methods"]] == rows and panel["seeds"] == [42]
    figure = "figure7" if backbone == "sd35m" else "figure6"
    assert (out / "panel" / "prompts.txt").read_text().splitlines() == evaluate.FIGURE_PROMPT_SETS[figure]
    assert (out / "panel" / "grid.png").read_bytes() != (out / "eval" / "grid.png").read_bytes()
    assert "qualitative panel:" in result.stdout
    if backbone == "sd15":
        assert steps(result, "done already, skipped") == STEPS[:4]  # the failed run's finished steps
    if backbone == "sd35m":
        assert results["methods"][4]["spec"] == str(released / "realalign-lora-sd3")
        return

    # A rerun with the opt-in rows and two more Stage-2 steps. A step whose settings changed is not skipped:
    # Stage 2 resumes from its state; the complementarity stages train (SD-1.5: on the stand-in DPO UNet);
    # the evaluation adds only the new rows; every other step keeps its marker.
    more = smoke(out, backbone, {**ALL_ROWS, "STAGE2_STEPS": "6"})
    assert more.returncode == 0, more.stdout[-2000:] + more.stderr[-3000:]
    assert steps(more, "done already, skipped") == STEPS[:5]  # the input steps, curate and stage1
    assert "stage2: its settings changed since it was done" in more.stdout
    log = [json.loads(line) for line in (out / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and (out / "stage2" / "checkpoint-6").is_dir()
    assert "base: all 6 images exist" in more.stderr + more.stdout
    results = check_table(out, ROWS[backbone] + EXTRA_ROWS[backbone])
    dpo_unet = str(out / "tiny-models" / "released" / "dpo-unet-sd15")
    for stage in ("stage1", "stage2"):
        assert json.loads((out / "complementarity" / stage / "args.json").read_text())["init_network"] == dpo_unet
    assert results["methods"][4]["spec"] == f"{dpo_unet}+{out}/complementarity/stage2/checkpoint-4"

    # Steps are keyed on content, not on paths (README "Running reliably"). The whole folder moved: every
    # step of the run without the opt-in rows is still done (a rerun skips every finished step).
    out = Path(shutil.move(out, tmp_path / "moved"))
    moved = smoke(out, backbone, {"STAGE2_STEPS": "6"})
    assert moved.returncode == 0 and steps(moved, "done already, skipped") == STEPS, moved.stdout[-3000:]
    # SMOKE=1 REAL_IMAGES=my_photos into the same folder: curation's input changed, and so does every step
    # downstream of it, which runs again (a training run afresh, the evaluation only for the changed rows).
    # Curated at 64 px here to keep the suite short (the default, 128 px, is the same code at 4x the pixels).
    photos = make_user_photos(tmp_path / "my photos")
    mine = {"REAL_IMAGES": str(tmp_path / "my photos"), "SMOKE_PHOTO_RESOLUTION": "64"}
    user = smoke(out, backbone, mine)
    assert user.returncode == 0, user.stdout[-2000:] + user.stderr[-3000:]
    assert "[run_all] REAL_IMAGES: 6 captioned photos in" in user.stdout
    assert "your photos: masks by the spectral saliency" in user.stdout  # no rembg / U^2-Net weights here
    # curation's last line, and again at the end of the run: what each step dropped (no filter: SMOKE=1
    # turns off the two that the tiny models make arbitrary); Table 1 printed once, at the end, with its path
    line = "kept 5 of 7 photos: 1 without a caption, 1 unreadable"
    assert user.stdout.count(line) == 2 and user.stdout.rstrip().splitlines()[-2].endswith(line)
    assert user.stdout.count("| Method") == 1  # evaluate.py logs the path only; the panel prints no table
    assert f"Table 1 (above): {out}/eval/results.md" in user.stdout.split("| Method")[-1]
    assert steps(user, "done already, skipped") == STEPS[:3] and steps(user, "finished in") == STEPS[3:]
    assert "stage1: its input --pairs changed since it was done" in user.stdout
    assert (out / "stage1.previous" / "checkpoint-4").is_dir()  # the run on the procedural photos, kept aside
    assert "base: all 6 images exist" in user.stderr and "realalign: its model changed" in user.stderr
    assert f"curation: {out}/pairs-spectral-64px/preview.png; " in user.stdout
    check_user_pairs(out, photos)
    # one file edited: exactly the steps downstream of it run again. Here the unreadable photo, which
    # curation drops: curation runs again and ends with the same pairs, so nothing after it runs (the
    # switch above showed a change that reaches every step)
    (tmp_path / "my photos" / "broken.jpg").write_bytes(b"still not a JPEG, but other bytes")
    edited = smoke(out, backbone, mine)
    assert edited.returncode == 0, edited.stdout[-2000:] + edited.stderr[-3000:]
    assert steps(edited, "finished in") == ["curate"] and "curate: its input --real_images changed" in edited.stdout
    assert steps(edited, "done already, skipped") == [step for step in STEPS if step != "curate"]
    summary = json.loads((out / "pairs-spectral-64px" / "summary.json").read_text())
    assert summary["fakes_generated_this_run"] == 0 and summary["fakes_reused"] == 5
    check_user_pairs(out, photos)


STEPS = ["tiny-models", "smoke-images", "tiny-released", "curate", "stage1", "stage2", "eval", "panel"]


def steps(result, outcome):
    """The steps of a run_all.sh run that ended with `outcome`, in order."""
    return re.findall(rf"^\[run_all\] ([\w-]+): {outcome}", result.stdout, flags=re.MULTILINE)


def make_user_photos(folder):
    """A user's folder: photos of odd sizes and formats, captioned by .txt
    files and by a metadata.jsonl; one grayscale photo (colorfulness 0: the
    paper's colorfulness filter would drop it), one without a caption
    (skipped) and one that is no image (unreadable)."""
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
    (folder / "broken.jpg").write_bytes(b"not a JPEG")
    (folder / "broken.txt").write_text("a photo that cannot be read")
    return {"beach": folder / "beach.jpg", "Market Stall": folder / "Market Stall.PNG",
            "kite": folder / "kite.webp", "flowers": folder / "flowers.bmp", "old_photo": folder / "old_photo.jpg"}


def check_user_pairs(out, photos):
    """After `SMOKE=1 REAL_IMAGES=folder bash run_all.sh`: the pairs are made from the user's files, in their
    own folder (another size and mask than the procedural photos' pairs/: curate.py never mixes fakes)."""
    import curate

    pairs = out / "pairs-spectral-64px"

    with open(pairs / "pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # every readable captioned photo became a pair, the grey one too: SMOKE=1 turns the colorfulness filter
    # off (the tiny model's fakes are colourful noise); no_caption was skipped, broken could not be read
    assert sorted(row["uid"] for row in rows) == sorted(photos)
    captions = {"beach": "a sunny beach with colourful umbrellas", "kite": "a kite in a blue sky"}
    for row in rows:
        if row["uid"] in captions:
            assert row["prompt"] == captions[row["uid"]]
        # the real image of the pair is the user's photo, centre-cropped to SMOKE_PHOTO_RESOLUTION (64 px
        # here), the mask and the fake of the same size (the training resizes them to its 32 px)
        with Image.open(photos[row["uid"]]) as source:
            expected = curate.common.center_crop_resize(source, 64)
        for image_path in (row["fake_image_path"], f"mask/{row['uid']}.png"):
            with Image.open(pairs / image_path) as image:
                assert image.size == (64, 64)
        with Image.open(pairs / row["real_image_path"]) as real:
            assert real.size == (64, 64)
            assert list(real.convert("RGB").getdata()) == list(expected.convert("RGB").getdata())
    with open(pairs / "scores.csv", newline="") as f:
        scores = {row["uid"]: row for row in csv.DictReader(f)}
    assert float(scores["old_photo"]["color_real"]) == 0.0 < float(scores["old_photo"]["color_fake"])
    assert scores["broken"]["removed_by"] == "unreadable_image" and "no_caption" not in scores
    summary = json.loads((pairs / "summary.json").read_text())
    assert summary["missing_caption"] == 1 and summary["kept_pairs"] == 5
    assert summary["summary_line"] == "kept 5 of 7 photos: 1 without a caption, 1 unreadable"
    # the rest of the pipeline ran on these pairs
    assert (out / "stage2" / "checkpoint-4").is_dir() and (out / "eval" / "results.md").is_file()
    assert json.loads((out / "stage2" / "inputs.json").read_text())["--pairs"] == common.fingerprint(
        pairs / "pairs.csv", common.FileHashes())


def test_mistyped_real_images_stops_before_anything_is_built(tmp_path):
    """REAL_IMAGES is read with curate.py's own reader before the tiny models
    are built: one line naming the problem, a non-zero exit, nothing made."""
    (tmp_path / "uncaptioned").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "uncaptioned" / "a.png")
    for photos, message in (("my fotos", "REAL_IMAGES=" + str(tmp_path / "my fotos") + " does not exist"),
                            ("uncaptioned", "REAL_IMAGES: " + str(tmp_path / "uncaptioned")
                             + " (folder) has no image with a caption")):
        result = smoke(tmp_path / "out", "sd15", {"REAL_IMAGES": str(tmp_path / photos)})
        assert result.returncode == 1 and result.stderr.startswith(f"[run_all] error: {message}"), result.stderr
        assert result.stderr.count("\n") == 1 and not result.stdout  # one line, and nothing else happened
        assert not (tmp_path / "out").exists()


def test_own_photos_masks_by_u2net_where_rembg_and_its_weights_are(tmp_path):
    """SMOKE=1 REAL_IMAGES=...: the real run's U^2-Net when rembg is installed
    and u2net.onnx is in $U2NET_HOME (a stand-in of each here), else the
    spectral saliency; the log says which (a dry run: nothing is made)."""
    (tmp_path / "rembg").mkdir()
    (tmp_path / "rembg" / "__init__.py").write_text("")
    (tmp_path / "u2net").mkdir()
    for weights, saliency in ((False, "spectral"), (True, "u2net")):
        if weights:
            (tmp_path / "u2net" / "u2net.onnx").write_bytes(b"stand-in")
        result = smoke(tmp_path / "out", "sd15", {"REAL_IMAGES": str(tmp_path), "DRY_RUN": "1", "U2NET_HOME":
                       str(tmp_path / "u2net"), "PYTHONPATH": str(tmp_path)})
        assert result.returncode == 0, result.stderr
        assert f"--saliency {saliency} --resolution 128" in result.stdout
        assert ("your photos: masks by U^2-Net" in result.stdout) == weights


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


def test_benchmark_runs_on_the_tiny_config(tmp_path, tiny_models):
    """tests/benchmark.py end to end on the tiny model: every row timed, with
    its spread, the FLOPs it ran and (no CPU peak) MFU omitted with a note.
    The FLOPs follow the rows each side's network calls evaluated (counted
    with a hook, idle sampler slots included): ours' Stage-1 steps are whole
    snapshot windows in fixed slots, the baseline runs every row of the
    micro-batch at every call; where ours ran less work the table says so."""
    # its tiny model is tiny_models.build_tiny_model("sd15"), the session's: placed where it would build it
    shutil.copytree(tiny_models["sd15"], tmp_path / "model-tiny")
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "benchmark.py"), "--arch", "tiny", "--batch", "2",
                             "--warmup", "1", "--steps", "1", "--sampler_slots", "1", "--workdir", str(tmp_path),
                             "--out", str(tmp_path / "bench.json")], capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["complete"] and not report["skipped"]
    results = report["rows"]
    labels = [r["label"] for r in results]
    assert labels == ["stage1 (ours-eager)", "stage1 (baseline)", "stage2 (ours-eager)", "stage2 (baseline)"]
    for r in results:
        assert len(r["step_seconds"]) == 2 and r["timed_steps"] == 1
        assert r["seconds_min"] <= r["seconds_per_step"] <= r["seconds_max"]
        assert r["model_tflops_per_step"] > 0 and r["mfu"] is None and "mfu_note" in r
    ours, base = results[0], results[1]
    # a step of ours = one snapshot window, 2 x the 1 slot's worth of trajectories (micro-batch 2, accumulation 1)
    assert (ours["micro_batch"], ours["batch"], ours["sampler_slots"]) == (2, 2, 1)
    assert all(rows == calls for rows, calls in zip(ours["sampler_rows"], ours["sampler_calls"]))  # full slots
    assert all(stops <= rows for stops, rows in zip(ours["sampler_stops"], ours["sampler_rows"]))
    assert all(rows == 2 * calls for rows, calls in zip(base["sampler_rows"], base["sampler_calls"]))  # all rows
    assert ours["tflops_per_sample"] < base["tflops_per_sample"]
    assert "the speed-up includes that work" in result.stdout and "MFU" in result.stdout

def test_run_like_authors_dry_run_shows_their_stage1_flags(tmp_path):
    """RUN_LIKE_AUTHORS=1: on SD-3.5-M both Stage-1 runs get the public
    trainer's structure and objective, in their own output folder; curation
    keeps its defaults (the authors' question, fp32 fakes); on SD-1.5
    nothing changes. (SMOKE=1 RUN_LIKE_AUTHORS=1 on both backbones was run by
    hand: README 'Differences from the public code'.)"""
    flags = "--sd3_policy_point endpoint --policy_target learner --snapshot_every 1"

    def dry_run(**extra):
        env = {**os.environ, "DRY_RUN": "1", "NUM_GPUS": "1", "COMPLEMENTARITY": "1", **extra}
        for name in ("SMOKE", "HF_HUB_OFFLINE", "OUTPUT_DIR"):
            env.pop(name, None)
        result = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env,
                                timeout=60, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return {line.split(" (dry run): ")[0].removeprefix("[run_all] "): line.split(" (dry run): ")[1]
                for line in result.stdout.splitlines() if " (dry run): " in line}

    authors = dry_run(BACKBONE="sd35m", RUN_LIKE_AUTHORS="1")
    for name in ("stage1", "complementarity-stage1"):
        assert flags in authors[name] and "outputs/sd35m-authors/" in authors[name]
    assert "--inpaint_dtype" not in authors["curate"] and "--no-drop_nonphoto" not in authors["curate"]
    ours = dry_run(BACKBONE="sd35m")
    assert "--sd3_policy_point" not in ours["stage1"] and "outputs/sd35m/stage1" in ours["stage1"]
    # "+ RealAlign" on SD-3.5-M: Stage 1 continues Flow-GRPO's LoRA, Stage 2 Stage 1's; the row is Stage 2's LoRA
    assert "--init_lora jieliu/SD3.5M-FlowGRPO-PickScore " in ours["complementarity-stage1"]
    assert "--init_unet" not in ours["complementarity-stage1"] + ours["complementarity-stage2"]
    assert "--init_lora outputs/sd35m/complementarity/stage1/checkpoint-3200 " in ours["complementarity-stage2"]
    assert "flow_grpo_realalign=outputs/sd35m/complementarity/stage2/checkpoint-450 " in ours["eval-complementarity"]
    assert {k: v.replace("-authors", "") for k, v in authors.items() if "stage1" not in k} == \
        {k: v for k, v in ours.items() if "stage1" not in k}
    assert dry_run(BACKBONE="sd15", RUN_LIKE_AUTHORS="1") == dry_run(BACKBONE="sd15")
