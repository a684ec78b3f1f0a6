"""Tests of curate.py (README 'Method: data') on the tiny offline models, at 32 px."""
import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import PartialState
from PIL import Image

import common
import curate


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def make_real_folder(folder, n=5):
    """n colourful captioned images (40x48, so the crop really crops), plus one
    unreadable image with a caption and one image without a caption."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        pixels = np.zeros((40, 48, 3), np.uint8)
        pixels[..., i % 3] = 200  # a saturated background: much more colourful than the tiny model's fakes
        pixels[10:25, 12:30] = rng.randint(0, 255, 3)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo number {i}\n")
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    (folder / "broken.txt").write_text("a broken file")
    Image.fromarray(pixels).save(folder / "uncaptioned.png")
    return folder


def curate_args(tiny_models, real_images, output_dir, *extra):
    return ["--real_images", str(real_images), "--output_dir", str(output_dir), "--resolution", "32",
            "--saliency", "spectral", "--num_inference_steps", "2", "--no-drop_nonphoto",
            "--inpaint_model", tiny_models["sd15-inpaint"],
            "--pickscore_model", tiny_models["clip"], "--pickscore_processor", tiny_models["clip"], *extra]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run ~10x faster on one thread when the 2 cores are shared
    (thread contention dominates such small kernels); restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory):
    return make_real_folder(tmp_path_factory.mktemp("real-images"))


@pytest.fixture(scope="module")
def first_run(tiny_models, real_folder, tmp_path_factory):
    """One full run (filters loosened so that several pairs are kept), shared by
    the schema and determinism tests."""
    out = tmp_path_factory.mktemp("run") / "pairs"
    curate.main(curate_args(tiny_models, real_folder, out, "--top_k", "3", "--min_pickscore_gap", "-1000"))
    return out


# ---------------------------------------------------------------------------
# pure parts
# ---------------------------------------------------------------------------

def test_colorfulness_matches_hand_computation():
    # two pixels, pure red and pure blue
    image = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8))
    # rg = R - G = [255, 0]:            mean 127.5,  population std 127.5
    # yb = (R + G)/2 - B = [127.5, -255]: mean -63.75, population std 191.25
    expected = math.sqrt(127.5**2 + 191.25**2) + 0.3 * math.sqrt(127.5**2 + 63.75**2)
    assert curate.colorfulness(image) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(272.6187, abs=1e-4)
    # a gray image has no colour at all
    assert curate.colorfulness(Image.new("RGB", (8, 8), (90, 90, 90))) == 0.0


def test_spectral_saliency_marks_the_bright_object():
    image = np.full((64, 64, 3), 20, np.uint8)
    image[36:52, 8:24] = 240  # one bright object, off centre
    saliency = curate.spectral_residual_saliency(Image.fromarray(image))
    assert saliency.shape == (64, 64) and saliency.min() == 0.0 and saliency.max() == pytest.approx(1.0)
    inside = np.zeros((64, 64), bool)
    inside[36:52, 8:24] = True
    assert saliency[inside].mean() > 2 * saliency[~inside].mean()
    # the map's peak lies on (or right next to) the object
    y, x = np.unravel_index(saliency.argmax(), saliency.shape)
    assert 32 <= y < 56 and 4 <= x < 28


def test_constant_image_gives_an_empty_mask_not_nan():
    saliency = curate.spectral_residual_saliency(Image.new("RGB", (32, 32), (128, 50, 10)))
    assert np.isfinite(saliency).all() and saliency.max() == 0.0
    assert np.array_equal(curate.minmax_normalise(np.full((4, 4), 3.0)), np.zeros((4, 4)))


def test_u2net_saliency_pre_and_post_processing(monkeypatch):
    """The U^2-Net path without its weights: a stand-in for rembg's ONNX session
    checks the input it gets (README 'Method: data': 320x320, ImageNet mean/std) and returns a
    fused map whose min-max normalised, resized version must come back."""
    import types

    seen = {}

    class FakeOnnxSession:
        def get_inputs(self):
            return [types.SimpleNamespace(name="input.1")]

        def run(self, output_names, feeds):
            seen["input"] = feeds["input.1"]
            fused = np.full((1, 1, 320, 320), 0.2, np.float32)
            fused[0, 0, :, 160:] = 0.6  # the right half is salient
            return [fused] + [fused] * 6  # d0 (fused) first, then the side outputs

    fake_rembg = types.ModuleType("rembg")
    fake_rembg.new_session = lambda name, providers: types.SimpleNamespace(inner_session=FakeOnnxSession())
    monkeypatch.setitem(sys.modules, "rembg", fake_rembg)
    saliency = curate.U2NetSaliency(torch.device("cpu"))(Image.new("RGB", (64, 48), (255, 0, 0)))
    x = seen["input"]
    assert x.shape == (1, 3, 320, 320) and x.dtype == np.float32
    expected = (np.array([1.0, 0.0, 0.0]) - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(x[0, :, 100, 100], expected, atol=1e-5)
    assert saliency.shape == (48, 64) and saliency.min() == 0.0 and saliency.max() == pytest.approx(1.0)
    assert saliency[:, :28].max() == 0.0 and saliency[:, 36:].min() == pytest.approx(1.0)

    # rembg missing: one clear error that says what to install
    monkeypatch.setitem(sys.modules, "rembg", None)
    with pytest.raises(common.UserError, match="pip install"):
        curate.U2NetSaliency(torch.device("cpu"))


def test_uid_seed_is_stable_and_distinct():
    assert curate.uid_seed(0, "abc") == curate.uid_seed(0, "abc")
    assert curate.uid_seed(0, "abc") != curate.uid_seed(1, "abc") != curate.uid_seed(0, "abd")
    # a fixed value: the hash must not change between Python runs or versions
    assert curate.uid_seed(0, "abc") == int.from_bytes(hashlib.sha256(b"0/abc").digest()[:8], "big") % 2**63


def test_filters_on_a_hand_made_table():
    def row(uid, color_real, color_fake, ps_real, ps_fake, nonphoto=None, removed_by=""):
        return dict(uid=uid, color_real=color_real, color_fake=color_fake, pickscore_real=ps_real,
                    pickscore_fake=ps_fake, nonphoto=nonphoto, removed_by=removed_by)

    nan = float("nan")
    table = [
        row("a_unreadable", nan, nan, nan, nan, removed_by="unreadable_image"),
        row("b_anime", 50, 10, 30.0, 1.0, nonphoto=True),          # would win everything, but is artwork
        row("c_dull", 10, 10, 25.0, 1.0, nonphoto=False),          # colorfulness equal: not strictly greater
        row("d_small_gap", 50, 10, 21.5, 21.0),                    # gap 0.5, not > 0.5
        row("e_fake_better", 50, 10, 21.0, 21.25),                 # negative gap
        row("f_best", 50, 10, 24.0, 20.0),
        row("h_tied", 50, 10, 22.0, 20.0),                         # tie at the K boundary with g_tied
        row("g_tied", 50, 10, 22.0, 20.0),
        row("i_last", 50, 10, 21.0, 20.0),
        row("j_nan_fake", 50, nan, 23.0, 20.0),                    # a missing score fails its filter
    ]
    rows, kept = curate.filter_pairs(table, min_pickscore_gap=0.5, top_k=2)
    removed = {r["uid"]: r["removed_by"] for r in rows}
    assert removed == {"a_unreadable": "unreadable_image", "b_anime": "nonphoto", "c_dull": "colorfulness",
                       "d_small_gap": "pickscore_gap", "e_fake_better": "pickscore_gap", "f_best": "",
                       "g_tied": "", "h_tied": "top_k", "i_last": "top_k", "j_nan_fake": "colorfulness"}
    # best first; of the two tied at 22.0 the smaller uid wins, whatever the input order
    assert [r["uid"] for r in kept] == ["f_best", "g_tied"]
    _, kept_reversed = curate.filter_pairs(table[::-1], min_pickscore_gap=0.5, top_k=2)
    assert [r["uid"] for r in kept_reversed] == ["f_best", "g_tied"]
    # top_k 0 keeps every survivor; the input table is left untouched (pure function)
    _, kept_all = curate.filter_pairs(table, min_pickscore_gap=0.5, top_k=0)
    assert [r["uid"] for r in kept_all] == ["f_best", "g_tied", "h_tied", "i_last"]
    assert table[1]["removed_by"] == ""
    # with the default gap 0.02, d_small_gap survives the gap filter
    rows, _ = curate.filter_pairs(table, min_pickscore_gap=0.02, top_k=0)
    assert {r["uid"]: r["removed_by"] for r in rows}["d_small_gap"] == ""
    # --min_colorfulness_gap -1000 (the smoke run's) lets c_dull through to the PickScore filter, not j_nan_fake
    rows, kept = curate.filter_pairs(table, min_pickscore_gap=0.5, top_k=0, min_colorfulness_gap=-1000)
    assert {r["uid"]: r["removed_by"] for r in rows}["j_nan_fake"] == "colorfulness"
    assert [r["uid"] for r in kept] == ["c_dull", "f_best", "g_tied", "h_tied", "i_last"]
    # a gap above the real's lead drops every pair by colorfulness
    rows, kept = curate.filter_pairs(table, min_pickscore_gap=0.5, top_k=0, min_colorfulness_gap=40)
    assert not kept and sum(r["removed_by"] == "colorfulness" for r in rows) == 8


def test_input_listers(tmp_path):
    PartialState()  # accelerate's logger needs the state
    # HPDv3: only real_images sides, uid = stem, duplicates dropped. all.json as
    # MizzenAI/HPSv3's README ("Pairwise Training Data Format") documents it: a
    # list of comparisons {prompt, choice_dist, confidence, path1, path2, model1,
    # model2}, path1 the preferred image, paths relative to the dataset root
    # ("images/<uuid>.jpg"), choice_dist / confidence null for the Midjourney and
    # curated-HPDv2 pairs; real photographs are the sides whose model is
    # "real_images" (Cwyxx/RealAlign, data_curation/extract/hpdv3.py, commit
    # 158ce2826b51566f58131235911e313a9313c91c).
    root = tmp_path / "hpdv3"
    root.mkdir()

    def comparison(prompt, path1, model1, path2, model2, votes=(12, 7), confidence=0.9999907):
        return {"prompt": prompt, "choice_dist": list(votes) if votes else None, "confidence": confidence,
                "path1": path1, "path2": path2, "model1": model1, "model2": model2}

    entries = [
        comparison("a dog", "images/3f2a9c1e-dog.jpg", "real_images", "images/8b7e2d40-x.jpg", "sdxl"),
        comparison("a dog", "images/c0ffee00-y.jpg", "flux", "images/3f2a9c1e-dog.jpg", "real_images"),
        comparison("a cat", "images/1a2b3c4d-z.jpg", "kolors", "images/9e8d7c6b-cat.jpg", "real_images",
                   votes=(3, 1), confidence=0.71),
        comparison("", "images/5a5a5a5a-nocap.jpg", "real_images", "images/6b6b6b6b-w.jpg", "sdxl"),
        comparison("a castle", "images/7c7c7c7c-mj1.jpg", "midjourney", "images/8d8d8d8d-mj2.jpg", "midjourney",
                   votes=None, confidence=None),
        comparison("a tree", "images/9f9f9f9f-h1.jpg", "hpdv2", "images/0e0e0e0e-h2.jpg", "hpdv2",
                   votes=None, confidence=None),
    ]
    (root / "all.json").write_text(json.dumps(entries, indent=4))
    candidates, counts = curate.list_real_images(root, tmp_path / "out")
    assert [(c["uid"], c["prompt"]) for c in candidates] == [("3f2a9c1e-dog", "a dog"), ("9e8d7c6b-cat", "a cat")]
    assert candidates[0]["source_image"] == str(root / "images/3f2a9c1e-dog.jpg")
    assert counts == {"input_kind": "HPDv3", "listed": 4, "missing_caption": 1, "duplicate_uid": 1}

    # CSV: paths relative to the CSV, uid optional
    (tmp_path / "list.csv").write_text("uid,prompt,image_path\nu1,first,a/one.png\n,second,b/two.png\n")
    candidates, _ = curate.list_real_images(tmp_path / "list.csv", tmp_path / "out")
    assert [(c["uid"], c["prompt"], c["source_image"]) for c in candidates] == [
        ("two", "second", str(tmp_path / "b/two.png")), ("u1", "first", str(tmp_path / "a/one.png"))]

    # image folder with metadata.jsonl (HF imagefolder); the output folder inside it is ignored
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "sub" / "p.png")
    Image.new("RGB", (8, 8)).save(folder / "q.jpg")
    (folder / "q.txt").write_text("caption from txt")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/p.png", "text": "caption from meta"}))
    (folder / "out" / "real").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "out" / "real" / "old.png")
    (folder / "out" / "real" / "old.txt").write_text("must not be listed")
    candidates, _ = curate.list_real_images(folder, folder / "out")
    assert [(c["uid"], c["prompt"]) for c in candidates] == [("q", "caption from txt"),
                                                             ("sub__p", "caption from meta")]


# ---------------------------------------------------------------------------
# full runs on the tiny models
# ---------------------------------------------------------------------------

def test_output_schema(first_run, real_folder):
    out = first_run
    scores = read_csv(out / "scores.csv")
    pairs = read_csv(out / "pairs.csv")
    summary = json.loads((out / "summary.json").read_text())

    # every candidate appears once in scores.csv, with the reason it was removed
    assert sorted(r["uid"] for r in scores) == ["broken", "img0", "img1", "img2", "img3", "img4"]
    by_uid = {r["uid"]: r for r in scores}
    assert by_uid["broken"]["removed_by"] == "unreadable_image" and by_uid["broken"]["pickscore_real"] == ""
    for uid in ["img0", "img1", "img2", "img3", "img4"]:
        row = by_uid[uid]
        assert row["removed_by"] in ("", "colorfulness", "pickscore_gap", "top_k")
        # every score is filled in and consistent with the filters' rules
        color_real, color_fake = float(row["color_real"]), float(row["color_fake"])
        gap = float(row["pickscore_real"]) - float(row["pickscore_fake"])
        assert float(row["pickscore_gap"]) == pytest.approx(gap)
        assert (row["removed_by"] == "colorfulness") == (not color_real > color_fake)
        assert 0.0 <= float(row["mask_fraction"]) <= 1.0
        assert row["nonphoto_answer"] == ""  # --no-drop_nonphoto: nobody was asked
        # the saved crop is the crop of the source image, bit for bit
        crop = common.center_crop_resize(Image.open(real_folder / f"{uid}.png"), 32)
        assert np.array_equal(pixels(out / "real" / f"{uid}.png"), np.asarray(crop))
        assert Image.open(out / "fake" / f"{uid}.png").size == (32, 32)
        assert Image.open(out / "mask" / f"{uid}.png").mode == "L"

    # pairs.csv: README 'Method: data' columns, top 3 by PickScore(real), paths relative to the CSV
    assert list(pairs[0].keys()) == curate.PAIR_COLUMNS
    kept = [r for r in scores if r["removed_by"] == ""]
    assert len(pairs) == len(kept) == 3
    assert sorted(r["uid"] for r in pairs) == sorted(r["uid"] for r in kept)
    real_scores = [float(r["pickscore_real"]) for r in pairs]
    assert real_scores == sorted(real_scores, reverse=True)
    assert all(float(r["color_real"]) > float(r["color_fake"]) for r in pairs)
    for r in pairs:
        assert r["real_image_path"] == f"real/{r['uid']}.png" and r["fake_image_path"] == f"fake/{r['uid']}.png"
    # the trainers' reader accepts it
    assert [p["uid"] for p in common.read_pairs_csv(out / "pairs.csv")] == [r["uid"] for r in pairs]

    # preview: 3 pairs x (real | mask | fake), 32 px crops shown at >= 256 px (tests/test_figures.py: layout)
    width, height = Image.open(out / "preview.png").size
    assert width >= 3 * 256 and 3 * 256 <= height < 4 * 256 + 200
    assert summary["listed"] == 7 and summary["missing_caption"] == 1 and summary["candidates"] == 6
    assert summary["removed_by"]["unreadable_image"] == 1
    assert summary["kept_pairs"] == 3 and summary["fakes_generated_this_run"] == 5 and summary["num_processes"] == 1
    assert summary["nonphoto_filter"] == "off"
    # the last line: how many photos each step dropped, and why (the colorfulness filter is on: the paper's 0)
    dropped = {reason: sum(r["removed_by"] == reason for r in scores) for reason in ("colorfulness", "top_k")}
    assert dropped["colorfulness"] + dropped["top_k"] == 2
    expected = "kept 3 of 7 photos: 1 without a caption, 1 unreadable" + (
        f", {dropped['colorfulness']} dropped by --min_colorfulness_gap 0 (real not more colourful than its fake)"
        if dropped["colorfulness"] else "") + (
        f", {dropped['top_k']} dropped by --top_k 3 (not among the best by PickScore(real))" if dropped["top_k"] else "")
    assert summary["summary_line"] == expected


def test_no_pair_kept_stops_with_the_filters_counts(first_run, tiny_models, real_folder, tmp_path, capsys):
    """A curation whose filters drop every pair exits 2 naming each filter and
    its count (a rerun of the fakes on disk: only scoring runs), and leaves the
    earlier pairs.csv, scores.csv, summary.json and preview.png as they were."""
    out = shutil.copytree(first_run, tmp_path / "pairs")
    before = {name: (out / name).read_bytes() for name in ("pairs.csv", "scores.csv", "summary.json", "preview.png")}
    colorless = sum(r["removed_by"] == "colorfulness" for r in read_csv(first_run / "scores.csv"))
    with pytest.raises(SystemExit) as exit_info:
        common.run_main(lambda: curate.main(curate_args(tiny_models, real_folder, out, "--min_pickscore_gap", "1000")))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert f"no pair kept of the 7 photos in {real_folder}: 1 without a caption, 1 unreadable, " in err
    assert f"{5 - colorless} dropped by --min_pickscore_gap 1000 (PickScore(real) - PickScore(fake) not above it)" in err
    assert (f"{colorless} dropped by --min_colorfulness_gap 0 (real not more colourful than its fake)" in err) == (
        colorless > 0)
    assert {name: (out / name).read_bytes() for name in before} == before


def test_determinism(first_run, tiny_models, real_folder, tmp_path):
    second = tmp_path / "second"
    curate.main(curate_args(tiny_models, real_folder, second, "--top_k", "3", "--min_pickscore_gap", "-1000"))
    for uid in ["img0", "img1", "img2", "img3", "img4"]:
        assert np.array_equal(pixels(first_run / "fake" / f"{uid}.png"), pixels(second / "fake" / f"{uid}.png"))
        assert np.array_equal(pixels(first_run / "mask" / f"{uid}.png"), pixels(second / "mask" / f"{uid}.png"))
    assert (first_run / "pairs.csv").read_text() == (second / "pairs.csv").read_text()
    # the seed matters: another --seed gives other fakes
    other = tmp_path / "other-seed"
    curate.main(curate_args(tiny_models, real_folder, other, "--seed", "1", "--max_images", "2"))
    uid = read_csv(other / "scores.csv")[0]["uid"]
    assert not np.array_equal(pixels(first_run / "fake" / f"{uid}.png"), pixels(other / "fake" / f"{uid}.png"))


def test_text2image_fakes(tiny_models, real_folder, tmp_path):
    """The rebuttal's ablation: the fake is a plain generation from the caption, no mask."""
    out = tmp_path / "t2i"
    curate.main(curate_args(tiny_models, real_folder, out, "--fake_mode", "text2image", "--t2i_model",
                            tiny_models["sd15"], "--max_images", "3", "--top_k", "0", "--min_pickscore_gap", "-1000"))
    scores = read_csv(out / "scores.csv")
    readable = [r["uid"] for r in scores if r["removed_by"] != "unreadable_image"]
    assert len(scores) == 3 and readable
    assert sorted(p.stem for p in (out / "fake").glob("*.png")) == sorted(readable)
    assert not (out / "mask").exists() and all(r["mask_fraction"] == "" for r in scores)
    settings = json.loads((out / "generation_settings.json").read_text())
    assert settings["fake_mode"] == "text2image" and settings["model"] == tiny_models["sd15"]
    kept = read_csv(out / "pairs.csv")
    if kept:  # preview rows are real | fake (and the row's text), 32 px crops shown at >= 256 px
        width, height = Image.open(out / "preview.png").size
        assert 2 * 256 <= width < 3 * 256 + 400 and len(kept) * 256 <= height < (len(kept) + 1) * 256 + 200


def test_resume_regenerates_only_missing_fakes(tiny_models, real_folder, tmp_path):
    out = tmp_path / "pairs"
    # batch size 1: a uid's fake is then bitwise independent of which uids share its batch
    args = curate_args(tiny_models, real_folder, out, "--batch_size", "1", "--top_k", "0")
    curate.main(args)
    originals = {p.name: pixels(p) for p in (out / "fake").glob("*.png")}
    assert len(originals) == 5
    # an interrupted run: two fakes never written, and a temp file left by a kill mid-write
    (out / "fake" / "img1.png").unlink()
    (out / "fake" / "img3.png").unlink()
    (out / "fake" / ".img3.png.tmp123.png").write_bytes(b"half a png")
    untouched = {name: (out / "fake" / name).stat().st_mtime_ns for name in originals if name not in
                 ("img1.png", "img3.png")}
    curate.main(args)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["fakes_generated_this_run"] == 2 and summary["fakes_reused"] == 3
    for name, mtime in untouched.items():
        assert (out / "fake" / name).stat().st_mtime_ns == mtime
    for name in ("img1.png", "img3.png"):
        assert np.array_equal(pixels(out / "fake" / name), originals[name])
    scores = read_csv(out / "scores.csv")
    assert sorted(r["uid"] for r in scores) == ["broken", "img0", "img1", "img2", "img3", "img4"]
    generated_now = {r["uid"] for r in scores if r["fake_generated_by_process"] != ""}
    assert generated_now == {"img1", "img3"}

    # resuming with settings that change the fakes is refused
    with pytest.raises(common.UserError, match="other settings"):
        curate.main(curate_args(tiny_models, real_folder, out, "--seed", "7"))


# A stand-in for the authors' filter script (Cwyxx/RealAlign at 158ce2826b51566f58131235911e313a9313c91c,
# data_curation/score/anime.py): the same Python shape (a module-level `prompt`, a `model.generate(...)` call
# in a function), with an invented question and token limit, so the tests show both are read from the file.
STAND_IN_QUESTION = "Invented test question: is this picture a drawing? Reply yes or no."
STAND_IN_SCRIPT = f"""
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

model_name = "Qwen/Qwen3-VL-8B-Instruct"
prompt = (
    {STAND_IN_QUESTION[:20]!r}
    {STAND_IN_QUESTION[20:]!r}
)


def classify(image_path):
    inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt").to(model.device)
    generated = model.generate(**inputs, max_new_tokens=5)
    return generated
"""


def place_stand_in_script(cache_dir, text=STAND_IN_SCRIPT):
    path = Path(cache_dir) / "authors" / common.AUTHORS_COMMIT / curate.AUTHORS_NONPHOTO_SCRIPT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_authors_nonphoto_call_is_read_from_their_script(tmp_path, monkeypatch):
    """The question and the generation call come from the authors' script at
    the pinned commit, cached in --cache_dir; offline without it, or with a
    file of another shape there, curation stops with one clear message."""
    assert len(common.AUTHORS_COMMIT) == 40 and common.AUTHORS_COMMIT in common.AUTHORS_REPO
    downloaded = []

    def offline(url, path):
        downloaded.append(url)
        raise OSError("no network")

    monkeypatch.setattr(common, "download_url", offline)
    with pytest.raises(common.UserError) as err:
        curate.authors_nonphoto_call(tmp_path)
    cached = tmp_path / "authors" / common.AUTHORS_COMMIT / "data_curation/score/anime.py"
    assert downloaded == [f"{common.AUTHORS_REPO}/data_curation/score/anime.py"]
    assert downloaded[0] in str(err.value) and str(cached) in str(err.value) and "--no-drop_nonphoto" in str(err.value)
    # downloaded once, then cached
    monkeypatch.setattr(common, "download_url", lambda url, path: Path(path).write_text(STAND_IN_SCRIPT))
    assert curate.authors_nonphoto_call(tmp_path) == (STAND_IN_QUESTION, {"max_new_tokens": 5})
    assert cached.read_text() == STAND_IN_SCRIPT
    place_stand_in_script(tmp_path, "prompt = 3\n")
    with pytest.raises(common.UserError, match="is not the authors'"):
        curate.authors_nonphoto_call(tmp_path)


def test_nonphoto_judge_asks_one_image_with_the_authors_call(monkeypatch):
    """NonPhotoJudge with stand-ins for the processor and the VLM: one image
    per call in the chat message with the question, the generation keyword
    arguments exactly as given (no greedy flag added), the seed set before
    generating, and only the new tokens decoded."""
    import transformers

    calls = {}

    class Inputs(dict):
        def to(self, device):
            return self

    class Processor:
        def apply_chat_template(self, messages, **kwargs):
            calls["messages"], calls["template"] = messages, kwargs
            return Inputs(input_ids=torch.tensor([[1, 2, 3]]))

        def batch_decode(self, tokens, **kwargs):
            return [" No \n" if tokens.tolist() == [[7, 8]] else "unexpected"]

    class Model:
        def to(self, device):
            return self

        def eval(self):
            return self

        def generate(self, **kwargs):
            calls["generate"], calls["seed"] = kwargs, torch.initial_seed()
            return torch.tensor([[1, 2, 3, 7, 8]])

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda name: Processor())
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", lambda name, dtype: Model())
    judge = curate.NonPhotoJudge("vlm", "cpu", torch.float32, STAND_IN_QUESTION, {"max_new_tokens": 5})
    image = Image.new("RGB", (8, 8))
    assert judge(image, seed=1234) == "No" and calls["seed"] == 1234
    assert calls["messages"] == [{"role": "user", "content": [{"type": "image", "image": image},
                                                              {"type": "text", "text": STAND_IN_QUESTION}]}]
    assert calls["template"]["tokenize"] and calls["template"]["add_generation_prompt"]
    assert set(calls["generate"]) == {"input_ids", "max_new_tokens"} and calls["generate"]["max_new_tokens"] == 5


def test_nonphoto_filter_keeps_only_no_answers(tiny_models, real_folder, tmp_path, monkeypatch):
    """The non-photo filter (on by default) asks the authors' question, one
    image at a time seeded per uid, and keeps an image only when the
    lower-cased answer is "no"; answers are cached, and answers to another
    question are not mixed in."""
    answers = {"img0": " No", "img1": "yes", "img2": "no, it is a photo", "img3": "NO\n", "img4": "Yes."}
    asked = []

    class StubJudge:  # stands in for Qwen3-VL: answers by the image's colour (one per img<i>)
        def __init__(self, model_name, device, dtype, question, generate_kwargs):
            assert model_name == "Qwen/Qwen3-VL-8B-Instruct"
            assert (question, generate_kwargs) == (STAND_IN_QUESTION, {"max_new_tokens": 5})

        def __call__(self, image, seed):
            uid = next(u for u in answers if np.array_equal(np.asarray(image), pixels(out_dir / "real" / f"{u}.png")))
            assert seed == curate.uid_seed(0, uid)
            asked.append(uid)
            return answers[uid]

    monkeypatch.setattr(curate, "NonPhotoJudge", StubJudge)
    out_dir = tmp_path / "pairs"
    place_stand_in_script(tmp_path / "cache")
    args = curate_args(tiny_models, real_folder, out_dir, "--top_k", "0", "--min_pickscore_gap", "-1000",
                       "--cache_dir", str(tmp_path / "cache"))
    args.remove("--no-drop_nonphoto")  # the default: filter on
    curate.main(args)
    by_uid = {r["uid"]: r for r in read_csv(out_dir / "scores.csv")}
    dropped = {uid for uid, r in by_uid.items() if r["removed_by"] == "nonphoto"}
    assert dropped == {"img1", "img2", "img4"}  # only a plain "no" keeps an image
    assert sorted(p.stem for p in (out_dir / "fake").glob("*.png")) == ["img0", "img3"]  # no fake for dropped ones
    assert by_uid["img1"]["nonphoto_answer"] == "yes"
    assert json.loads((out_dir / "summary.json").read_text())["nonphoto_filter"] == "on"
    assert json.loads((out_dir / curate.NONPHOTO_SETTINGS_FILE).read_text())["question"] == STAND_IN_QUESTION
    # a rerun reads the cached answers instead of asking again
    asked.clear()
    curate.main(args)
    assert asked == []
    # answers to another question are not reused
    place_stand_in_script(tmp_path / "cache", STAND_IN_SCRIPT.replace("Invented", "Another"))
    with pytest.raises(common.UserError, match="non-photo answers .* other settings"):
        curate.main(args)
    (out_dir / curate.NONPHOTO_SETTINGS_FILE).unlink()  # answers of an earlier version, question unknown
    with pytest.raises(common.UserError, match="were given to another question"):
        curate.main(args)


def test_fakes_are_made_in_fp32_unless_asked(first_run, tiny_models, real_folder, tmp_path, monkeypatch):
    """--inpaint_dtype: fp32 by default (the public inpainting script), recorded
    with the fakes; bf16 or fp16 on request."""
    assert json.loads((first_run / "generation_settings.json").read_text())["inpaint_dtype"] == "fp32"
    loaded = []

    def load_pipeline(model, dtype=torch.float32, inpainting=False):
        loaded.append(dtype)
        raise common.UserError("stop here")

    monkeypatch.setattr(common, "load_pipeline", load_pipeline)
    for flag, dtype in (([], torch.float32), (["--inpaint_dtype", "bf16"], torch.bfloat16)):
        with pytest.raises(common.UserError, match="stop here"):
            curate.main(curate_args(tiny_models, real_folder, tmp_path / f"out{len(flag)}", "--max_images", "1",
                                    *flag))
        assert loaded.pop() == dtype


def test_safety_checker_is_opt_in(tiny_models, real_folder, tmp_path):
    """Off by default (the public inpainting sets safety_checker=None); asked
    for on a pipeline without one, it is a clear error, not a silent skip."""
    with pytest.raises(common.UserError, match="has no safety checker"):
        curate.main(curate_args(tiny_models, real_folder, tmp_path / "pairs", "--keep_safety_checker",
                                "--max_images", "1"))


def start_cli(*args, cwd):
    return subprocess.Popen([sys.executable, "curate.py", *map(str, args)], cwd=cwd, env=CHILD_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_bad_input_stops_with_one_clear_message(tiny_models, tmp_path, repo_root, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pairs.csv").write_text("uid,prompt,real_image_path,fake_image_path\nold,kept,real/a.png,fake/a.png\n")
    before = (out / "pairs.csv").read_bytes()
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.csv").write_text("uid,caption,file\n1,a dog,dog.png\n")
    # --inpaint_model does not exist: bad input must be rejected before any model is looked at
    cases = {
        tmp_path / "missing": "does not exist",
        tmp_path / "empty": "has no image",
        tmp_path / "bad.csv": "lacks the column(s) prompt, image_path",
    }
    # the non-photo filter is on by default: a VLM that cannot load stops the run (the command line's exit
    # status, in a subprocess started first; the cases above in-process, through the same run_main)
    good = make_real_folder(tmp_path / "good-cli", n=1)
    place_stand_in_script(tmp_path / "cache")
    vlm_run = start_cli("--real_images", good, "--output_dir", out, "--saliency", "spectral",
                        "--resolution", "32", "--nonphoto_model", tmp_path / "no-such-vlm",
                        "--cache_dir", tmp_path / "cache", "--inpaint_model", tmp_path / "no-model", cwd=repo_root)
    for real_images, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            common.run_main(lambda: curate.main([str(a) for a in (
                "--real_images", real_images, "--output_dir", out, "--saliency", "spectral",
                "--inpaint_model", tmp_path / "no-model")]))
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2, stderr
        assert message in stderr and stderr.count("error:") == 1
        assert "Traceback" not in stderr and "no-model" not in stderr
    _, stderr = vlm_run.communicate(timeout=120)
    assert vlm_run.returncode == 2, stderr
    assert stderr.count("error:") == 1 and "Traceback" not in stderr
    assert "non-photo filter" in stderr and "no-such-vlm" in stderr and "--no-drop_nonphoto" in stderr
    assert not (out / "fake").exists()  # stopped before any fake was generated

    # the same errors in-process (same code path as above, minus the exit code):
    # images without any caption, and good input with a bad model path
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    Image.new("RGB", (8, 8)).save(uncaptioned / "a.png")
    with pytest.raises(common.UserError, match="has no image with a caption"):
        curate.main(curate_args(tiny_models, uncaptioned, out))
    good_args = curate_args(tiny_models, make_real_folder(tmp_path / "good", n=1), out)
    good_args[good_args.index("--inpaint_model") + 1] = str(tmp_path / "no-model")
    with pytest.raises(common.UserError, match="could not load the diffusers pipeline"):
        curate.main(good_args)
    assert (out / "pairs.csv").read_bytes() == before


@pytest.mark.multiprocess
def test_two_processes_generate_each_uid_once(tiny_models, real_folder, tmp_path, repo_root):
    out = tmp_path / "pairs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "curate.py", *curate_args(tiny_models, real_folder, out, "--top_k", "0")]
    result = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=300,
                            env=CHILD_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2
    scores = read_csv(out / "scores.csv")
    uids = [r["uid"] for r in scores]
    assert sorted(uids) == ["broken", "img0", "img1", "img2", "img3", "img4"]  # each uid once
    generated_by = {r["uid"]: r["fake_generated_by_process"] for r in scores if r["uid"] != "broken"}
    assert set(generated_by.values()) == {"0", "1"}  # both processes did part of the work
    assert summary["fakes_generated_this_run"] == 5
    assert sorted(p.name for p in (out / "fake").glob("*.png")) == [f"img{i}.png" for i in range(5)]
