"""The fault sweep: every input a user can hand a script, by script and input.

For each input, what applies of: missing, empty, damaged, wrong type, wrong
encoding, out of range, changed between runs, signalled mid-run. Every case
asserts the exit status, that no traceback is printed and the words of the
message; a resumed run, that its result is bit-identical to an uninterrupted
one. The scripts' main() run in-process through common.run_main (what their
command line runs), so that a case costs milliseconds: the checks come before
any model loads.
"""
import json
import os
import shutil
import signal
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import common
import curate
import evaluate
import train_dpo
import train_dro
from conftest import make_pairs

SCRIPTS = {"dro": train_dro.main, "dpo": train_dpo.main, "curate": curate.main, "evaluate": evaluate.main}
TRAIN = ["--resolution", "32", "--train_batch_size", "2", "--effective_batch_size", "2", "--sample_grid_steps", "0",
         "--checkpoint_every", "2", "--report_to", "none", "--learning_rate", "1e-3", "--lr_warmup_steps", "0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run faster on one thread when the cores are shared; and
    a resumed run is compared bit for bit with a run on the same thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def outcome(capsys, script, argv):
    """(exit status, stderr) of SCRIPT's command line with `argv`, in-process."""
    try:
        common.run_main(lambda: SCRIPTS[script]([str(a) for a in argv]))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def fails(capsys, script, argv, *words, code=2):
    status, err = outcome(capsys, script, argv)
    assert status == code and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


def edit_image(path):
    """Change one pixel: same size, same name, new content."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    image.putpixel((0, 0), tuple(255 - v for v in image.getpixel((0, 0))))
    image.save(path)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("faults-data") / "pairs", n=4)


# =============================================================================
# common.py: one notion of "same input" (run_all.sh's markers, the cache, --resume)
# =============================================================================

def test_fingerprint_follows_content_not_paths(pairs, tmp_path, monkeypatch):
    hashes = common.FileHashes(tmp_path / "hashes.json")
    first = common.fingerprint(pairs, hashes)
    assert set(first) == {"pairs.csv", *(f"{side}/img{i:03d}.png" for side in ("real", "fake") for i in range(4))}
    hashes.save()
    moved = shutil.copytree(pairs.parent, tmp_path / "moved" / "pairs") / "pairs.csv"
    assert common.fingerprint(moved, hashes) == first  # a copy, or a moved folder: the same input
    os.utime(moved, ns=(1, 1))  # only the time changed: still the same
    assert common.fingerprint(moved, hashes) == first
    edit_image(moved.parent / "real" / "img002.png")
    assert common.fingerprint_changes(first, common.fingerprint(moved, hashes)) == "real/img002.png changed"
    with open(moved, "a") as f:
        f.write("img009,a new row,real/img000.png,fake/img000.png\n")
    assert "pairs.csv" in common.fingerprint_changes(first, common.fingerprint(moved, hashes))
    # unchanged files are not read again (remembered by name, size and time; a file this new is read each time)
    old = pairs.parent / "real" / "img000.png"
    for path in (old, pairs):
        os.utime(path, ns=(10**18, 10**18))  # 2001: older than the 2 s in which a file is read every time
    reads = []
    opened = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: reads.append(str(path)) or opened(path, *a, **k))
    common.fingerprint(pairs, hashes)
    common.fingerprint(pairs, hashes)
    assert reads.count(str(old)) == 1  # hashed once, then known
    assert reads.count(str(pairs)) == 2  # its rows are read each time (they name the images)
    monkeypatch.undo()
    # curate.py's scores are information, not input: their last digits differ with the GPU count
    scored = tmp_path / "scored.csv"
    scored.write_text("uid,prompt,pickscore_real\na,a cat,21.000001\n")
    before = common.fingerprint(scored, hashes)
    scored.write_text("uid,prompt,pickscore_real\na,a cat,21.000002\n")
    assert common.fingerprint(scored, hashes) == before
    scored.write_text("uid,prompt,pickscore_real\na,a dog,21.000002\n")
    assert common.fingerprint(scored, hashes) != before
    # a model folder counts its config and weights, not its model card or grid
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    (lora / "README.md").write_text("card")
    before = common.fingerprint(lora, hashes)
    (lora / "README.md").write_text("another card")
    (lora / "grid.png").write_bytes(b"a grid")
    assert common.fingerprint(lora, hashes) == before
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"other weights")
    assert common.fingerprint(lora, hashes) != before
    # a hub id is its downloaded revision; an unknown word is not an input
    assert common.fingerprint("owner/never-downloaded", hashes) == {"hub:owner/never-downloaded": "not downloaded"}
    assert common.fingerprint("pickapic_v2", hashes) is None


def marker(out, command, *write):
    """run_all.sh's `python common.py fingerprint MARKER OUT [--write ...] -- COMMAND`, in-process."""
    return common.fingerprint_main([str(out / ".done-stage1"), str(out / "stage1"), *write, "--", *map(str, command)])


def test_step_markers_follow_content(pairs, tmp_path, capsys):
    out, data = tmp_path / "run", shutil.copytree(pairs.parent, tmp_path / "data")
    out.mkdir()
    command = ["python", "train_dro.py", "--pairs", data / "pairs.csv", "--output_dir", out / "stage1",
               "--max_train_steps", "4"]
    assert marker(out, command) == 10  # never run
    marker(out, command, "--write", "started")
    assert marker(out, [*command, "--resume"]) == 10 and "interrupted" in capsys.readouterr().out
    marker(out, command, "--write", "done")
    assert marker(out, [*command, "--resume"]) == 0  # done; --resume is not a setting
    # the output folder and the photos moved: the same step, done
    moved_out, moved_data = tmp_path / "moved-run", tmp_path / "moved-data"
    shutil.move(out, moved_out)
    shutil.move(data, moved_data)
    moved = ["python", "train_dro.py", "--pairs", moved_data / "pairs.csv", "--output_dir", moved_out / "stage1",
             "--max_train_steps", "4"]
    assert marker(moved_out, moved) == 0
    assert marker(moved_out, [*moved[:-1], "6"]) == 10
    assert "its settings changed since it was done" in capsys.readouterr().out
    edit_image(moved_data / "real" / "img001.png")  # the content changed: the step runs on the new one
    assert marker(moved_out, moved) == 11
    assert "its input --pairs changed since it was done" in capsys.readouterr().out


def test_cache_key_is_the_content_of_the_pairs(pairs, tmp_path):
    copy = shutil.copytree(pairs.parent, tmp_path / "copy") / "pairs.csv"
    key = common.cache_key("model", 32, pairs, True)
    assert common.cache_key("model", 32, copy, True) == key
    edit_image(copy.parent / "fake" / "img003.png")  # new fakes under the same uids: a new cache
    assert common.cache_key("model", 32, copy, True) != key


# =============================================================================
# train_dro.py, train_dpo.py
# =============================================================================

def test_train_pairs_csv_faults(tiny_models, pairs, tmp_path, capsys):
    model = ["--pretrained_model", tiny_models["sd15"], "--output_dir", tmp_path / "out", *TRAIN]
    fails(capsys, "dpo", [*model, "--pairs", tmp_path / "missing.csv"], "error: pairs CSV not found")
    (tmp_path / "empty.csv").write_text("")
    fails(capsys, "dpo", [*model, "--pairs", tmp_path / "empty.csv"], "lacks the column(s) prompt, real_image_path")
    (tmp_path / "header.csv").write_text("uid,prompt,real_image_path,fake_image_path\n")
    fails(capsys, "dro", [*model, "--pairs", tmp_path / "header.csv"], "has no rows")
    fails(capsys, "dpo", [*model, "--pairs", pairs.parent / "real" / "img000.png"], "is not UTF-8 text")  # wrong type
    latin1 = pairs.parent / "latin1.csv"
    latin1.write_bytes("uid,prompt,real_image_path,fake_image_path\na,un caf\xe9,real/img000.png,fake/img000.png\n"
                       .encode("latin-1"))
    fails(capsys, "dpo", [*model, "--pairs", latin1], "latin1.csv is not UTF-8 text", "save it as UTF-8")
    damaged = shutil.copytree(pairs.parent, tmp_path / "damaged") / "pairs.csv"
    (damaged.parent / "fake" / "img001.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    fails(capsys, "dpo", [*model, "--pairs", damaged], "uid 'img001': cannot read", "img001.png")
    # UTF-8 with a byte-order mark (Excel, Notepad): read as written, the first column included
    bom = pairs.parent / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + pairs.read_bytes())
    assert [p["uid"] for p in common.read_pairs_csv(bom)] == ["img000", "img001", "img002", "img003"]


@pytest.mark.parametrize("script,flag,value,words", [
    ("dpo", "--beta", "0", "argument --beta: must be a finite number > 0 (got 0)"),
    ("dpo", "--beta", "nan", "argument --beta: must be a finite number > 0"),
    ("dro", "--caption_dropout", "20", "argument --caption_dropout: must be a probability in [0, 1] (got 20)"),
    ("dro", "--caption_dropout", "1", "--caption_dropout 1 drops every caption"),
    ("dro", "--resolution", "0", "argument --resolution: must be a multiple of 8, at least 8 (got 0)"),
    ("dpo", "--resolution", "36", "argument --resolution: must be a multiple of 8"),
    ("dpo", "--learning_rate", "inf", "argument --learning_rate: must be a finite number > 0"),
    ("dpo", "--adam_beta2", "1", "argument --adam_beta2: must be a number in [0, 1)"),
    ("dro", "--ema_decay", "-0.1", "argument --ema_decay: must be a number in [0, 1)"),
    ("dro", "--seed", "-1", "argument --seed: must be an integer in [0, 2^32)"),
    ("dro", "--lr_warmup_steps", "-5", "argument --lr_warmup_steps: must be an integer >= 0"),
    ("dpo", "--max_grad_norm", "0", "argument --max_grad_norm: must be a finite number > 0"),
    ("dro", "--margin", "-1", "argument --margin: must be a finite number >= 0"),
    ("dro", "--snapshot_every", "0", "argument --snapshot_every: must be an integer >= 1"),
    ("dro", "--lora_rank", "two", "argument --lora_rank: must be an integer >= 1 (got 'two')"),
    ("dpo", "--train_batch_size", "16", "--train_batch_size 16 is larger than the 4 pairs"),
])
def test_train_values_out_of_range(script, flag, value, words, tiny_models, pairs, tmp_path, capsys):
    fails(capsys, script, ["--pretrained_model", tiny_models["sd15"], "--pairs", pairs, "--output_dir", tmp_path,
                           *TRAIN, "--effective_batch_size", "16", "--max_train_steps", "1", flag, value], words)


def test_train_resolution_must_fit_the_model():
    class Backbone:  # SD-3.5-M's shapes: VAE factor 8, transformer patch 2
        pipe = type("Pipe", (), {"vae_scale_factor": 8})()
        net = type("Net", (), {"config": {"patch_size": 2}})()

    common.check_resolution(Backbone, 512)
    with pytest.raises(common.UserError, match="--resolution 520 must be a multiple of 16 for this model"):
        common.check_resolution(Backbone, 520)


def train(capsys, out, pairs, model, *extra, code=0):
    status, err = outcome(capsys, "dpo", ["--pretrained_model", model, "--pairs", pairs, "--output_dir", out, *TRAIN,
                                          "--max_train_steps", "4", "--seed", "3", *extra])
    assert status == code and "Traceback" not in err, err
    return err


def result_of(out):
    """The run's final weights and its logged losses."""
    weights = load_file(str(out / "checkpoint-4" / "pytorch_lora_weights.safetensors"))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return weights, losses


def assert_same_result(a, b):
    (weights_a, losses_a), (weights_b, losses_b) = result_of(a), result_of(b)
    assert losses_a == losses_b and weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)


@pytest.fixture(scope="module")
def reference_run(tiny_models, pairs, tmp_path_factory):
    """Stage 2, 4 steps, uninterrupted: what every interrupted run must end at."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train_dpo.main([str(a) for a in ["--pretrained_model", tiny_models["sd15"], "--pairs", pairs, "--output_dir",
                                      out, *TRAIN, "--max_train_steps", "4", "--seed", "3"]])
    return out


def test_train_ctrl_c_while_checkpoints_are_written(tiny_models, pairs, reference_run, tmp_path, capsys,
                                                    monkeypatch):
    """Ctrl-C while a checkpoint's model card is written, twice; the run
    always stops with 130 and --resume ends bit-identical to a run never
    interrupted.

    1. The issue's "Exception ignored in ... KeyboardInterrupt": the signal
       lands while a finalizer runs, where Python drops the exception; the run
       went on to exit 0. It now stops once checkpoint-2 and its state are
       written.
    2. The signal lands in the card's own code: the run stops at once; the
       state of step 2 stays, checkpoint-4 is not left half-written."""
    write_model_card, finalized = common.write_model_card, []

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs here, inside the finalizer
                pass
            finalized.append("went on")  # never reached: the KeyboardInterrupt left __del__ and was dropped

    def interrupted_card(args, kind, directory, step, *a, **k):
        if step == 2:
            Finalized()  # freed at once: its __del__ runs now
        else:
            os.kill(os.getpid(), signal.SIGINT)
        return write_model_card(args, kind, directory, step, *a, **k)

    monkeypatch.setattr(common, "write_model_card", interrupted_card)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # Python's own, not pytest's collector
    err = train(capsys, tmp_path, pairs, tiny_models["sd15"], code=130)  # (train: no traceback either)
    assert "interrupted\n" in err and finalized == []
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert torch.load(tmp_path / "state" / "training_state.pt", weights_only=True)["step"] == 2
    assert (tmp_path / "checkpoint-2" / "README.md").is_file() and not (tmp_path / "checkpoint-4").exists()
    err = train(capsys, tmp_path, pairs, tiny_models["sd15"], "--resume", code=130)
    assert "interrupted\n" in err and not (tmp_path / "checkpoint-4").exists()
    assert torch.load(tmp_path / "state" / "training_state.pt", weights_only=True)["step"] == 2
    monkeypatch.undo()
    train(capsys, tmp_path, pairs, tiny_models["sd15"], "--resume")
    assert_same_result(tmp_path, reference_run)


def test_train_resume_after_inputs_moved_or_changed(tiny_models, pairs, reference_run, tmp_path, capsys):
    """--resume compares what the run reads by content: moved inputs resume,
    an edited image is refused by name, and so is an edited model."""
    run = shutil.copytree(reference_run, tmp_path / "run")
    moved_pairs = shutil.copytree(pairs.parent, tmp_path / "moved-pairs") / "pairs.csv"
    moved_model = shutil.copytree(tiny_models["sd15"], tmp_path / "moved-model")
    before = result_of(run)
    err = train(capsys, run, moved_pairs, moved_model, "--resume")  # finished already: nothing to do
    assert "--pairs" not in err and result_of(run)[1] == before[1]
    edit_image(moved_pairs.parent / "real" / "img002.png")
    err = train(capsys, run, moved_pairs, moved_model, "--resume", code=2)
    assert "changed since it started: --pairs (real/img002.png changed)" in err and "Start afresh" in err
    config = moved_model / "unet" / "config.json"
    config.write_text(config.read_text() + " ")  # the same model? its files say otherwise
    err = train(capsys, run, pairs, moved_model, "--resume", code=2)
    assert "--pretrained_model (unet/config.json changed)" in err


# =============================================================================
# curate.py
# =============================================================================

def real_photos(folder, n=3):
    folder.mkdir(parents=True)
    for i in range(n):
        array = np.zeros((40, 48, 3), np.uint8)
        array[..., i % 3] = 220
        array[10:30, 12:36] = (40 * i, 200, 90)
        Image.fromarray(array).save(folder / f"photo{i}.png")
        (folder / f"photo{i}.txt").write_text(f"a photo number {i}")
    return folder


def curate_argv(tiny_models, real_images, out, *extra):
    return ["--real_images", real_images, "--output_dir", out, "--resolution", "32", "--saliency", "spectral",
            "--num_inference_steps", "2", "--no-drop_nonphoto", "--batch_size", "1", "--top_k", "0",
            "--inpaint_model", tiny_models["sd15-inpaint"], "--pickscore_model", tiny_models["clip"],
            "--pickscore_processor", tiny_models["clip"], *extra]


def test_curate_real_images_faults(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    fails(capsys, "curate", curate_argv(tiny_models, tmp_path / "missing", out), "missing does not exist")
    (tmp_path / "empty").mkdir()
    fails(capsys, "curate", curate_argv(tiny_models, tmp_path / "empty", out), "has no image")
    (tmp_path / "list.txt").write_text("photo.png\n")
    fails(capsys, "curate", curate_argv(tiny_models, tmp_path / "list.txt", out), "is neither a folder, a .csv")
    photos = real_photos(tmp_path / "photos")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(f"prompt,image_path\nun caf\xe9,{photos / 'photo0.png'}\n".encode("latin-1"))
    fails(capsys, "curate", curate_argv(tiny_models, latin1, out), "latin1.csv is not UTF-8 text")
    (photos / "photo1.txt").write_bytes("une photo \xe0 Paris".encode("latin-1"))
    fails(capsys, "curate", curate_argv(tiny_models, photos, out), "photo1.txt is not UTF-8 text")
    (photos / "photo1.txt").write_text("a photo number 1")
    (photos / "metadata.jsonl").write_text('["photo0.png", "a list, not an object"]\n')
    fails(capsys, "curate", curate_argv(tiny_models, photos, out), "metadata.jsonl: every line must be a JSON object")
    (photos / "metadata.jsonl").unlink()
    # a byte-order mark is not part of the first column
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfuid,prompt,image_path\nfirst,a photo,photos/photo0.png\n")
    assert curate.list_csv(bom)[0] == [{"uid": "first", "prompt": "a photo",
                                        "source_image": str(tmp_path / "photos" / "photo0.png")}]
    assert not out.exists() or not (out / "fake").exists()  # nothing was generated


@pytest.mark.parametrize("flag,value,words", [
    ("--resolution", "12", "argument --resolution: must be a multiple of 8, at least 8 (got 12)"),
    ("--num_inference_steps", "0", "argument --num_inference_steps: must be an integer >= 1"),
    ("--top_k", "-1", "argument --top_k: must be an integer >= 0"),
    ("--min_pickscore_gap", "nan", "argument --min_pickscore_gap: must be a finite number"),
    ("--guidance_scale", "-2", "argument --guidance_scale: must be a finite number >= 0"),
    ("--max_images", "0", "argument --max_images: must be an integer >= 1"),
])
def test_curate_values_out_of_range(flag, value, words, tiny_models, tmp_path, capsys):
    fails(capsys, "curate", curate_argv(tiny_models, tmp_path, tmp_path / "out", flag, value), words)


def test_curate_signalled_then_changed_between_runs(tiny_models, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the first fake: exit 130, the rerun makes only the rest.
    Then an edited photo gets a new crop and a new fake under its old uid (the
    others are reused), a copied model folder is the same model, an edited one
    is refused."""
    photos, out = real_photos(tmp_path / "photos"), tmp_path / "pairs"
    masks = []
    saliency_to_mask = curate.saliency_to_mask

    def interrupted(saliency):
        masks.append(1)
        if len(masks) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return saliency_to_mask(saliency)

    monkeypatch.setattr(curate, "saliency_to_mask", interrupted)
    status, err = outcome(capsys, "curate", curate_argv(tiny_models, photos, out))
    assert status == 130 and "interrupted\n" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "fake").glob("*.png")) == ["photo0.png"]
    monkeypatch.undo()
    assert outcome(capsys, "curate", curate_argv(tiny_models, photos, out))[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["fakes_generated_this_run"], summary["fakes_reused"]) == (2, 1)
    fakes = {p.name: p.read_bytes() for p in (out / "fake").glob("*.png")}

    # the photo of uid photo1 is edited, and the model is used from a copy
    edit_image(photos / "photo1.png")
    image = np.asarray(Image.open(photos / "photo1.png").convert("RGB")).copy()
    image[:, :24] = 255 - image[:, :24]
    Image.fromarray(image).save(photos / "photo1.png")
    model = shutil.copytree(tiny_models["sd15-inpaint"], tmp_path / "inpaint-copy")
    argv = curate_argv(tiny_models, photos, out)
    argv[argv.index("--inpaint_model") + 1] = str(model)
    assert outcome(capsys, "curate", argv)[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["fakes_generated_this_run"], summary["fakes_reused"]) == (1, 2)
    now = {p.name: p.read_bytes() for p in (out / "fake").glob("*.png")}
    assert now["photo0.png"] == fakes["photo0.png"] and now["photo2.png"] == fakes["photo2.png"]
    assert now["photo1.png"] != fakes["photo1.png"]
    with Image.open(photos / "photo1.png") as source, Image.open(out / "real" / "photo1.png") as crop:
        assert np.array_equal(np.asarray(common.center_crop_resize(source, 32)), np.asarray(crop))
    # another model under the same path: refused, the fakes are not mixed
    config = model / "unet" / "config.json"
    config.write_text(config.read_text() + " ")
    fails(capsys, "curate", argv, "the fakes in", "other settings (model_content:")


# =============================================================================
# evaluate.py
# =============================================================================

def test_evaluate_prompt_and_method_faults(tiny_models, tmp_path, capsys):
    base = ["--pretrained_model", tiny_models["sd15"], "--output_dir", tmp_path / "out", "--metrics", "laplacian"]
    fails(capsys, "evaluate", [*base, "--prompts", tmp_path / "missing.txt"], "is neither a prompt set")
    (tmp_path / "empty.txt").write_text("\n \n")
    fails(capsys, "evaluate", [*base, "--prompts", tmp_path / "empty.txt"], "no prompts in")
    (tmp_path / "latin1.txt").write_bytes("un caf\xe9\n".encode("latin-1"))
    fails(capsys, "evaluate", [*base, "--prompts", tmp_path / "latin1.txt"], "latin1.txt is not UTF-8 text")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")  # wrong type
    fails(capsys, "evaluate", [*base, "--prompts", tmp_path / "image.txt"], "image.txt is not UTF-8 text")
    fails(capsys, "evaluate", [*base, "--prompts", tmp_path / "empty.txt", "--method", f"x={tmp_path / 'no-lora'}"],
          "neither an existing file or folder nor a hub id")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfa red apple\r\na blue car\r\n")
    assert evaluate.read_prompt_file(tmp_path / "bom.txt") == ["a red apple", "a blue car"]


@pytest.mark.parametrize("flag,value,words", [
    ("--resolution", "0", "argument --resolution: must be a multiple of 8, at least 8 (got 0)"),
    ("--batch_size", "0", "argument --batch_size: must be an integer >= 1 (got 0)"),
    ("--guidance_scale", "nan", "argument --guidance_scale: must be a finite number >= 0"),
    ("--seeds", "-1", "argument --seeds: must be an integer in [0, 2^32)"),
    ("--max_prompts", "0", "argument --max_prompts: must be an integer >= 1"),
])
def test_evaluate_values_out_of_range(flag, value, words, tmp_path, capsys):
    fails(capsys, "evaluate", ["--output_dir", tmp_path, flag, value], words)


def test_evaluate_damaged_image_at_scoring(tmp_path, capsys):
    """`evaluate.py score` on a folder with a damaged PNG: one message naming it."""
    for name in ("a", "b"):
        (tmp_path / name / "seed_1").mkdir(parents=True)
        Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / name / "seed_1" / "00000.png")
    (tmp_path / "b" / "seed_1" / "00000.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (tmp_path / "prompts.txt").write_text("a red square\n")
    fails(capsys, "evaluate", ["score", "--images", tmp_path, "--prompts", tmp_path / "prompts.txt",
                               "--metrics", "laplacian"],
          f"cannot read the image {tmp_path / 'b' / 'seed_1' / '00000.png'}", "delete it and rerun")


def test_evaluate_signalled_then_a_method_changed(tiny_models, reference_run, tmp_path, capsys, caplog,
                                                 monkeypatch):
    """Ctrl-C while a method's images are made: exit 130; the rerun makes the
    rest. A checkpoint folder that moved keeps its images; one retrained
    under the same path gets new images (the base method's are kept)."""
    (tmp_path / "prompts.txt").write_text("a red apple\na blue car\n")
    checkpoint = shutil.copytree(reference_run / "checkpoint-2", tmp_path / "ckpt")
    out = tmp_path / "eval"

    def argv(lora):
        return ["--pretrained_model", tiny_models["sd15"], "--method", "base=", "--method", f"ours={lora}",
                "--prompts", tmp_path / "prompts.txt", "--seeds", "1", "--resolution", "32", "--batch_size", "1",
                "--num_inference_steps", "2", "--output_dir", out, "--metrics", "laplacian"]

    generate_images = evaluate.generate_images

    def interrupted(pipe, prompts, todo, out_dir, method, *a, **k):
        if method == "ours":
            os.kill(os.getpid(), signal.SIGINT)
        return generate_images(pipe, prompts, todo, out_dir, method, *a, **k)

    monkeypatch.setattr(evaluate, "generate_images", interrupted)
    status, err = outcome(capsys, "evaluate", argv(checkpoint))
    assert status == 130 and "interrupted\n" in err and "Traceback" not in err
    monkeypatch.undo()
    assert outcome(capsys, "evaluate", argv(checkpoint))[0] == 0
    images = {path: path.stat().st_mtime_ns for path in sorted(out.glob("*/seed_1/*.png"))}
    assert len(images) == 4
    moved = shutil.move(checkpoint, tmp_path / "moved-ckpt")
    caplog.clear()
    assert outcome(capsys, "evaluate", argv(moved))[0] == 0
    assert caplog.text.count("all 2 images exist") == 2
    shutil.copy(reference_run / "checkpoint-4" / "pytorch_lora_weights.safetensors", moved)  # retrained
    assert outcome(capsys, "evaluate", argv(moved))[0] == 0
    assert "ours: its model changed since its 2 images were made" in caplog.text
    now = {path: path.stat().st_mtime_ns for path in sorted(out.glob("*/seed_1/*.png"))}
    assert all(now[p] == images[p] for p in images if p.parts[-3] == "base")  # kept
    assert all(now[p] != images[p] for p in images if p.parts[-3] == "ours")  # made again


def write_study_key(study):
    study.mkdir()
    key = {"study_id": "s1", "ours": "ours", "baselines": ["base"],
           "comparisons": {"c1": {"prompt_index": 0, "prompt": "p", "ours": "ours", "baseline": "base",
                                  "ours_side": "left"},
                           "c2": {"prompt_index": 1, "prompt": "q", "ours": "ours", "baseline": "base",
                                  "ours_side": "right"}}}
    (study / "key.json").write_text(json.dumps(key))


def test_userstudy_vote_file_faults(tmp_path, capsys):
    write_study_key(tmp_path / "study")
    votes = tmp_path / "votes.json"

    def tally(*words, code=2):
        return fails(capsys, "evaluate", ["userstudy-tally", tmp_path / "study", votes], *words, code=code)

    tally("no vote file")
    for text in ("", "[1, 2]", '{"study": "s1", "participant": "p", "votes": {"c1": "left"}}',
                 '{"study": "s1", "participant": "p", "votes": ["left"]}',
                 '{"study": "s1", "participant": {"id": 1}, "votes": []}'):
        votes.write_text(text)
        tally("is not a vote file of the study page")
    votes.write_text(json.dumps({"study": "s1", "participant": "p", "mirrored": False,
                                 "votes": [{"comparison": ["c1"], "choice": "left"}]}))
    tally("does not belong to this study")
    conflicting = [{"comparison": "c1", "choice": "left"}, {"comparison": "c1", "choice": "right"}]
    votes.write_text(json.dumps({"study": "s1", "participant": "p", "mirrored": False, "votes": conflicting}))
    tally("comparison c1 is answered twice, 'left' and 'right'")
    votes.write_bytes("\ufeff".encode() + json.dumps({"study": "s1", "participant": "p", "mirrored": False, "votes": [
        {"comparison": "c1", "choice": "left"}, {"comparison": "c1", "choice": "left"},
        {"comparison": "c2", "choice": "tie"}]}).encode())
    tally(code=0)  # a byte-order mark, and one answer given twice: read, counted once
    result = json.loads((tmp_path / "study" / "tally.json").read_text())["baselines"]["base"]
    assert (result["votes"], result["win"], result["tie"]) == (2, 50.0, 50.0)
    fails(capsys, "evaluate", ["userstudy-tally", tmp_path / "study", votes, "--bootstrap_samples", "0"],
          "argument --bootstrap_samples: must be an integer >= 1")
