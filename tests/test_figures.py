"""What a newcomer looks at: curves.png, preview.png, checkpoint grid.png, and
the console of a training run (progress per micro-batch, a time estimate, no
known-harmless library notices)."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

import common
import curate
import train_dro
from conftest import make_pairs


def test_smooth_curve_is_a_bias_corrected_ema():
    # weight 0.5: s1 = 0.5 * 1 = 0.5 -> / (1 - 0.5) = 1; s2 = 0.25 + 1.5 = 1.75 -> / 0.75 = 7/3
    assert common.smooth_curve([1.0, 3.0], weight=0.5) == pytest.approx([1.0, 7 / 3])
    assert common.smooth_curve([2.0] * 5) == pytest.approx([2.0] * 5)  # a constant stays put


def write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_curves_png_has_a_titled_panel_per_logged_quantity(tmp_path):
    records = [{"step": s, "loss": 1.0 / s, "D": -0.001 * s, "active_frac": 1.0, "grad_norm": 0.5, "lr": 1e-4,
                "model_err_real": 1.1, "snapshot_refreshed": 0} for s in range(1, 6)]
    panels = common.plot_training_curves(write_metrics(tmp_path / "metrics.jsonl", records), tmp_path / "curves.png")
    assert [key for key, _ in panels] == ["loss", "D", "active_frac", "model_err_real", "grad_norm", "lr"]
    titles = dict(panels)
    assert titles["D"].startswith("DRO margin term D: learner − ref gap, real vs policy")
    assert all(title != key for key, title in panels)  # every drawn key has a written title
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size[0] >= 3 * 400 and image.size[1] >= 2 * 250  # 3 columns x 2 rows of readable panels


def test_a_constant_series_gets_a_padded_axis(tmp_path, monkeypatch):
    """A constant learning rate: the y-range is padded, so its tick labels all differ."""
    from matplotlib.figure import Figure

    saved = {}
    monkeypatch.setattr(common, "save_figure", lambda figure, path: saved.setdefault("figure", figure))
    records = [{"step": s, "lr": 2.56e-6, "loss": 0.0} for s in range(1, 4)]
    common.plot_training_curves(write_metrics(tmp_path / "metrics.jsonl", records), tmp_path / "curves.png")
    figure = saved["figure"]
    assert isinstance(figure, Figure)
    figure.canvas.draw()
    for ax in figure.axes:
        low, high = ax.get_ylim()
        assert high - low > 0.1 * max(abs(low), abs(high), 1e-30)
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert len(labels) == len(set(labels)) >= 3


def test_sample_grid_labels_prompts_and_seeds(tmp_path, monkeypatch):
    saved = {}
    monkeypatch.setattr(common, "save_figure", lambda figure, path: saved.setdefault("figure", figure))
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "green", "blue") * 2]
    common.save_sample_grid(images, ["a red ball", "a green ball", ""], [0, 1], tmp_path / "grid.png")
    axes = saved["figure"].axes
    assert len(axes) == 6
    assert [ax.get_title() for ax in axes[:3]] == ["a red ball", "a green ball", "(empty prompt)"]
    assert [ax.get_ylabel() for ax in axes[::3]] == ["seed 0", "seed 1"]
    # images are row-major: seed 1's first image is the 4th one (red)
    assert tuple(axes[3].get_images()[0].get_array()[0, 0][:3]) == (255, 0, 0)


def preview_rows(n):
    return [{"uid": f"img{i}", "prompt": f"a long caption number {i} " * 4, "pickscore_real": 21.5 + i,
             "pickscore_fake": 21.0, "color_real": 50.0, "color_fake": 30.0} for i in range(n)]


@pytest.mark.parametrize("with_mask", [True, False])
def test_preview_rows_are_readable(with_mask):
    """32 px crops (the smoke run's) are shown at >= 256 px, under the headings
    real | mask | fake, with the uid, caption and scores of each row."""
    pairs = preview_rows(2)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 255
    images = {p["uid"]: {"real": Image.new("RGB", (32, 32), "red"), "mask": Image.fromarray(mask),
                         "fake": Image.new("RGB", (32, 32), "blue")} for p in pairs}
    figure = curate.preview_figure(pairs, images, with_mask=with_mask)
    figure.canvas.draw()
    headings = ["real", "mask", "fake"] if with_mask else ["real", "fake"]
    columns = len(headings) + 1  # the images, then the text of the row
    assert len(figure.axes) == 2 * columns
    assert [ax.get_title() for ax in figure.axes[:len(headings)]] == headings
    for row in range(2):
        image_axes = figure.axes[row * columns: row * columns + len(headings)]
        for ax in image_axes:
            extent = ax.get_window_extent()
            assert extent.width >= 256 and extent.height >= 256  # pixels
        text = figure.axes[row * columns + len(headings)].texts[0].get_text()
        assert text.startswith(f"img{row}\n\"a long caption") and f"gap (real - fake): {0.5 + row:+.3f}" in text
        assert "colorfulness: real 50.0, fake 30.0" in text
    real_axes = figure.axes[0]
    assert len(real_axes.collections) == (1 if with_mask else 0)  # the mask outline (a contour) over the real image


def test_curate_writes_the_preview(tmp_path):
    """write_preview reads real/, mask/ and fake/ of the output folder."""
    for name, colour in (("real", "red"), ("mask", "white"), ("fake", "blue")):
        (tmp_path / name).mkdir()
        Image.new("RGB", (48, 48), colour).save(tmp_path / name / "img0.png")
    curate.write_preview(preview_rows(1), tmp_path)
    with Image.open(tmp_path / "preview.png") as image:
        assert image.size[0] >= 3 * 256 and image.size[1] >= 256


def test_training_console_counts_micro_batches_and_estimates_time(tiny_models, tmp_path, caplog, capsys):
    pairs = make_pairs(tmp_path / "data", n=4)
    with caplog.at_level(logging.INFO, logger="realalign"):
        train_dro.main(["--pretrained_model", tiny_models["sd15"], "--pairs", str(pairs), "--output_dir",
                        str(tmp_path / "out"), "--resolution", "32", "--train_batch_size", "1",
                        "--effective_batch_size", "3", "--max_train_steps", "2", "--checkpoint_every", "2",
                        "--sample_grid_steps", "1", "--sampler_steps", "2"])
    estimate = [r.getMessage() for r in caplog.records if "micro-batches" in r.getMessage()]
    assert len(estimate) == 1 and estimate[0].startswith("one optimizer step = 3 micro-batches of 1 per process")
    assert "for the 2 steps left" in estimate[0]
    bar = capsys.readouterr().err
    assert "6/6 [" in bar and "step=2/2" in bar  # the bar counts 2 steps x 3 micro-batches
    assert (tmp_path / "out" / "curves.png").is_file() and (tmp_path / "out" / "checkpoint-2" / "grid.png").is_file()


def test_known_harmless_library_notices_are_silenced(tiny_models_build):
    """Building the tiny models (the smoke run's first step) used to print the
    torchvision notice of the CLIP image processor and 'text_encoder_3=None ...
    cannot be saved'; other messages of those loggers still pass. (The session's
    tiny models are built by that same command: conftest.py tiny_models_build.)"""
    _, stderr = tiny_models_build
    assert "torchvision" not in stderr and "cannot be saved" not in stderr
    assert "Writing model shards" not in stderr
    record = logging.LogRecord("diffusers.pipelines.pipeline_utils", logging.WARNING, "", 0,
                               "self.unet=<object> of type <class 'Foo'> cannot be saved.", None, None)
    assert logging.getLogger("diffusers.pipelines.pipeline_utils").filter(record)
