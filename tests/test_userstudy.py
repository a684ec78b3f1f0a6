"""The user-study kit (paper Fig. 4) and the qualitative panels (paper Figs. 6-7)
of evaluate.py, on the tiny offline models; the study page is driven in a real
headless Chromium where one is installed."""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import common
import evaluate

PROMPTS = ["a red apple on a wooden table", "a photo of a dog in the snow", "a city street at night",
           "a bowl of soup </script><b>bold", "mountains at dawn"]
# Names that cannot turn up by chance in the page's text or file names.
OURS, BASELINES = "zebraours", ["yakbaseline", "gnubaseline"]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
IMAGE_SEEDS = [42, 7]  # one per baseline: the two comparisons of a prompt use different images


def colour(index, seed):
    """The solid colour of the 'ours' image of prompt `index` at `seed`, made before the study."""
    return COLOURS[index] if seed == 42 else tuple(255 - c for c in COLOURS[index])


@pytest.fixture(scope="module")
def study(tiny_models, tmp_path_factory):
    """A study of 3 of 5 prompts x 2 baselines. The evaluation folder already
    holds 'ours' images at both image seeds (solid colours, as if an earlier
    evaluation had made them): the study must reuse them and generate only
    the baselines'."""
    work = tmp_path_factory.mktemp("userstudy")
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    eval_dir = work / "eval"
    for index in range(len(COLOURS)):
        for seed in IMAGE_SEEDS:
            common.atomic_save_image(Image.new("RGB", (32, 32), colour(index, seed)),
                                     eval_dir / evaluate.image_relpath(OURS, seed, index))
    ours_before = {p: p.stat().st_mtime_ns for p in (eval_dir / OURS).rglob("*.png")}
    argv = ["userstudy", "--pretrained_model", tiny_models["sd15"], "--method", f"{OURS}=",
            "--method", f"{BASELINES[0]}=", "--method", f"{BASELINES[1]}={tiny_models['sd15']}",
            "--prompts", str(prompt_file), "--num_prompts", "3", "--seed", "5", "--output_dir", str(eval_dir),
            "--image_seeds", *map(str, IMAGE_SEEDS),
            "--resolution", "32", "--num_inference_steps", "2"]
    evaluate.main(argv)
    return {"work": work, "eval": eval_dir, "dir": eval_dir / "userstudy", "argv": argv, "ours_before": ours_before,
            "key": json.loads((eval_dir / "userstudy" / "key.json").read_text())}


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------------------
# the study folder
# ---------------------------------------------------------------------------


def test_sample_study_is_seeded_blind_and_balanced():
    methods = [{"name": n, "spec": ""} for n in [OURS] + BASELINES]
    prompts = [f"prompt {i}" for i in range(50)]
    seeds = evaluate.DEFAULT_SEEDS
    indices, comparisons = evaluate.sample_study(prompts, methods, 21, seed=3, image_seeds=seeds)
    assert evaluate.sample_study(prompts, methods, 21, seed=3, image_seeds=seeds) == (indices, comparisons)
    assert evaluate.sample_study(prompts, methods, 21, seed=4, image_seeds=seeds)[0] != indices
    assert len(set(indices)) == 21 and all(0 <= i < 50 for i in indices)
    # every drawn prompt meets every baseline exactly once, each time with another image seed (blind: no image
    # of ours is shown twice)
    pairs = sorted((c["prompt_index"], c["baseline"]) for c in comparisons.values())
    assert pairs == sorted((i, b) for i in indices for b in BASELINES)
    for i in indices:
        used = [c["image_seed"] for c in comparisons.values() if c["prompt_index"] == i]
        assert len(set(used)) == 2 and set(used) <= set(seeds)
    assert len({c["image_seed"] for c in comparisons.values()}) > 2  # drawn, not always the first seeds
    assert all(c["prompt"] == prompts[c["prompt_index"]] and c["ours"] == OURS for c in comparisons.values())
    # balanced: per baseline, ours on the left in 10 or 11 of its 21 comparisons
    for baseline in BASELINES:
        sides = [c["ours_side"] for c in comparisons.values() if c["baseline"] == baseline]
        assert len(sides) == 21 and sides.count("left") in (10, 11)
    even = evaluate.sample_study(prompts, methods, 20, seed=3, image_seeds=seeds)[1]
    assert [c["ours_side"] for c in even.values() if c["baseline"] == BASELINES[0]].count("left") == 10
    # ids are numbered after the shuffle: the baselines are interleaved, not in blocks
    by_id = [comparisons[cid]["baseline"] for cid in sorted(comparisons)]
    assert by_id[:21] != [BASELINES[0]] * 21
    with pytest.raises(common.UserError, match="has 50 prompts"):
        evaluate.sample_study(prompts, methods, 51, seed=0, image_seeds=seeds)
    with pytest.raises(common.UserError, match="2 baselines need 2 different seeds"):
        evaluate.sample_study(prompts, methods, 5, seed=0, image_seeds=[42, 42])


def test_study_folder_reuses_images_and_matches_key(study):
    key, page = study["key"], study["dir"] / "page"
    assert key["ours"] == OURS and key["baselines"] == BASELINES and len(key["comparisons"]) == 3 * 2
    # the images the folder held were reused, not regenerated
    assert {p: p.stat().st_mtime_ns for p in (study["eval"] / OURS).rglob("*.png")} == study["ours_before"]
    for cid, c in key["comparisons"].items():
        sides = {c["ours_side"]: c["ours"], "right" if c["ours_side"] == "left" else "left": c["baseline"]}
        for side, number in (("left", 1), ("right", 2)):
            source = study["eval"] / evaluate.image_relpath(sides[side], c["image_seed"], c["prompt_index"])
            assert np.array_equal(pixels(page / "images" / f"{cid}-{number}.png"), pixels(source))
        ours_image = pixels(page / "images" / f"{cid}-{1 if c['ours_side'] == 'left' else 2}.png")
        # the solid colour: ours is where the key says, at the comparison's seed
        assert tuple(ours_image[0, 0]) == colour(c["prompt_index"], c["image_seed"])


def test_study_page_is_blind(study):
    page = study["dir"] / "page"
    files = sorted(p for p in page.rglob("*") if p.is_file())
    assert [p.name for p in files if p.suffix == ".html"] == ["index.html"] and "key.json" not in {p.name for p in files}
    for name in [OURS] + BASELINES:
        for path in files:
            assert name not in path.name
            assert name.encode() not in path.read_bytes(), f"{name} appears in {path}"
    html = (page / "index.html").read_text()
    # a prompt cannot close the page's <script> element
    assert "</script><b>" not in html and html.count("</script>") == 1
    # with two baselines, no image is shown twice to a participant (each image file's bytes are unique), so
    # ours cannot be recognised as the image that comes back
    images = [p.read_bytes() for p in files if p.suffix == ".png"]
    assert len(images) == 3 * 2 * 2 and len(set(images)) == len(images)


def test_second_run_regenerates_nothing(study, caplog):
    images = sorted(study["eval"].glob("*/seed_*/*.png")) + sorted((study["dir"] / "page").rglob("*.png"))
    before = {p: p.stat().st_mtime_ns for p in images}
    with caplog.at_level("INFO", logger="realalign"):
        evaluate.main(study["argv"])
    assert "generating" not in caplog.text
    # ours: 3 prompts at 2 seeds; each baseline: its 3 comparisons
    assert caplog.text.count("all 6 images exist") == 1 and caplog.text.count("all 3 images exist") == 2
    assert {p: p.stat().st_mtime_ns for p in sorted(study["eval"].glob("*/seed_*/*.png"))} == \
        {p: t for p, t in before.items() if "seed_" in str(p)}
    assert json.loads((study["dir"] / "key.json").read_text()) == study["key"]
    # another draw into the same study folder would orphan the votes: refused
    with pytest.raises(common.UserError, match="holds another study"):
        evaluate.main([a if a != "5" else "6" for a in study["argv"]])
    with pytest.raises(SystemExit) as refused:  # the main command's flag domains (argparse, exit 2)
        evaluate.main([*study["argv"], "--batch_size", "0"])
    assert refused.value.code == 2
    with pytest.raises(common.UserError, match="--method twice or more"):
        evaluate.main(["userstudy", "--method", "a=", "--prompts", str(study["work"] / "prompts.txt")])


def test_evaluation_and_study_reuse_each_others_images(tiny_models, tmp_path, caplog):
    """The main command and `userstudy` generate through one function with one
    settings record (NAME/generation.json): a study on an evaluation's folder
    generates nothing, and an evaluation on a study's folder only what the
    study did not need."""
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    shared = ["--pretrained_model", tiny_models["sd15"], "--method", "a=", "--method", f"b={tiny_models['sd15']}",
              "--prompts", str(prompt_file), "--resolution", "32", "--num_inference_steps", "2"]
    evaluation = ["--seeds", "42", "123", "--metrics", "laplacian"]
    study = ["userstudy", "--num_prompts", "3", "--seed", "5", "--image_seeds", "42", "123"]

    def png_times(folder):
        return {p: p.stat().st_mtime_ns for p in sorted(folder.glob("*/seed_*/*.png"))}

    # evaluation first: all 5 prompts at seeds 42 and 123; the study's 3 images of each method are among them
    first = tmp_path / "evaluation-first"
    evaluate.main([*shared, *evaluation, "--output_dir", str(first)])
    before = png_times(first)
    assert len(before) == 2 * 5 * 2
    caplog.clear()  # only the study's log below (an earlier test may have set the logger to INFO)
    with caplog.at_level("INFO", logger="realalign"):
        evaluate.main([*study, *shared, "--output_dir", str(first)])
    assert "generating" not in caplog.text and caplog.text.count("all 3 images exist") == 2
    assert png_times(first) == before
    assert len(list((first / "userstudy" / "page" / "images").glob("*.png"))) == 3 * 2

    # study first: the evaluation generates only the 7 of 10 images the study did not need
    second = tmp_path / "study-first"
    evaluate.main([*study, *shared, "--output_dir", str(second)])
    before = png_times(second)
    assert len(before) == 2 * 3
    caplog.clear()
    with caplog.at_level("INFO", logger="realalign"):
        evaluate.main([*shared, *evaluation, "--output_dir", str(second)])
    assert caplog.text.count("generating 7 of 10 images") == 2
    after = png_times(second)
    assert len(after) == 2 * 5 * 2 and {p: after[p] for p in before} == before
    # the same settings give the same images, whichever command made them. Not
    # bit-exact: the prompts were batched differently (CPU kernels round
    # differently per batch size), which moves a pixel by a level or two; two
    # different prompts differ by tens of levels.
    for name in ("a", "b"):
        for image in sorted((first / name).glob("seed_*/*.png")):
            other = second / name / image.relative_to(first / name)
            assert np.abs(pixels(image).astype(int) - pixels(other)).max() <= 2


# ---------------------------------------------------------------------------
# the tally
# ---------------------------------------------------------------------------


def synthetic_key():
    comparisons = {f"c{i}": {"prompt_index": i, "prompt": "p", "ours": "ours", "baseline": b, "ours_side": side}
                   for i, (b, side) in enumerate([("dpo", "left"), ("dpo", "right"), ("sd", "left"), ("sd", "right")])}
    return {"study_id": "abc", "ours": "ours", "baselines": ["dpo", "sd"], "comparisons": comparisons}


def write_votes(path, participant, choices, study="abc", mirrored=False):
    votes = [{"comparison": cid, "choice": choice, "time_ms": 100} for cid, choice in choices.items()]
    path.write_text(json.dumps({"study": study, "participant": participant, "mirrored": mirrored, "votes": votes}))
    return path


def test_tally_by_hand(tmp_path):
    key = synthetic_key()
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "key.json").write_text(json.dumps(key))
    # alice: dpo c0 left = ours wins, c1 tie; sd c2 right = ours loses, c3 right = ours wins
    # bob saw every pair mirrored (ours of c0 and c2 on the right, of c1 on the left):
    #        dpo c0 left = loses, c1 left = wins;  sd c2 right = wins (c3 unanswered)
    alice = write_votes(tmp_path / "a.json", "alice", {"c0": "left", "c1": "tie", "c2": "right", "c3": "right"})
    bob = write_votes(tmp_path / "b.json", "bob", {"c0": "left", "c1": "left", "c2": "right"}, mirrored=True)
    evaluate.main(["userstudy-tally", str(tmp_path / "study"), str(alice), str(bob), "--bootstrap_samples", "2000"])
    tally = json.loads((tmp_path / "study" / "tally.json").read_text())
    dpo, sd = tally["baselines"]["dpo"], tally["baselines"]["sd"]
    assert (dpo["votes"], dpo["win"], dpo["tie"], dpo["lose"]) == (4, 50.0, 25.0, 25.0)
    assert (sd["votes"], sd["win"], sd["tie"], sd["lose"]) == (3, pytest.approx(200 / 3), 0.0, pytest.approx(100 / 3))
    assert tally["participants"] == 2 and tally["answered"] == {"alice": 4, "bob": 3}
    # the side check: of the 6 decided votes, 3 went to the left image; one participant saw the pairs mirrored
    assert (tally["left_win"], tally["decided_votes"], tally["mirrored_participants"]) == (50.0, 6, 1)
    # participant-level bootstrap: a resample is {alice, alice}, {bob, bob} or one of each (2000 draws give all
    # three). dpo: alice win + tie, bob lose + win: every resample has 50% wins
    assert dpo["win_ci95"] == [50.0, 50.0]
    # sd: alice lose+win (50%), bob win (100%): resamples give 50%, 66.7% or 100%
    low, high = sd["win_ci95"]
    assert low == pytest.approx(50.0) and high == pytest.approx(100.0)
    text = (tmp_path / "study" / "tally.md").read_text()
    assert "| dpo | 50.0 [50.0, 50.0] | 25.0 [" in text and "bob: 3" in text and "bootstrap" in text
    assert "the left image won 50.0% of the 6 decided votes" in text and "1 of 2 participant(s)" in text
    assert Image.open(tmp_path / "study" / "figure4.png").format == "PNG"

    # one participant: no interval to give
    evaluate.main(["userstudy-tally", str(tmp_path / "study"), str(alice)])
    tally = json.loads((tmp_path / "study" / "tally.json").read_text())
    assert tally["baselines"]["dpo"]["win_ci95"] is None and "none with a single participant" in \
        (tmp_path / "study" / "tally.md").read_text()

    bad = {
        write_votes(tmp_path / "x.json", "carol", {"c0": "left"}, study="zzz"): "votes of study zzz",
        write_votes(tmp_path / "y.json", "carol", {"c9": "left"}): "does not belong to this study",
        write_votes(tmp_path / "z.json", "carol", {"c0": "up"}): "does not belong to this study",
        tmp_path / "missing.json": "no vote file",
        write_votes(tmp_path / "w.json", "carol", {"c0": "left"}, mirrored="yes"): "not a vote file",
    }
    for path, message in bad.items():
        with pytest.raises(common.UserError, match=message):
            evaluate.main(["userstudy-tally", str(tmp_path / "study"), str(path)])
    with pytest.raises(common.UserError, match="two vote files"):
        evaluate.main(["userstudy-tally", str(tmp_path / "study"), str(alice), str(alice)])
    with pytest.raises(SystemExit) as refused:  # argparse: must be an integer >= 1
        evaluate.main(["userstudy-tally", str(tmp_path / "study"), str(alice), "--bootstrap_samples", "0"])
    assert refused.value.code == 2
    with pytest.raises(common.UserError, match="key.json not found"):
        evaluate.main(["userstudy-tally", str(tmp_path), str(alice)])


# ---------------------------------------------------------------------------
# the page in a real browser
# ---------------------------------------------------------------------------


def skip_browser_test(reason):
    """Skip, with the reason, where no browser is at hand; .ci/run sets
    REALALIGN_REQUIRE_BROWSER=1 so that in CI the test fails instead."""
    if os.environ.get("REALALIGN_REQUIRE_BROWSER") == "1":
        pytest.fail(f"REALALIGN_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def chrome_driver(download_dir):
    """A headless Chromium driven by selenium, or a skip with the reason."""
    if importlib.util.find_spec("selenium") is None:
        skip_browser_test("selenium is not installed (pip install selenium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not browser or not driver_path:
        skip_browser_test("Chromium or chromedriver is not installed (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except Exception as err:  # e.g. a browser/driver version mismatch
        skip_browser_test(f"could not start headless Chromium: {str(err).splitlines()[0]}")
    # headless Chrome saves downloads only where it is told to
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    return driver


def test_page_in_headless_chromium(study, tmp_path):
    driver = chrome_driver(tmp_path)  # first: skips, with the reason, where selenium or the browser is missing
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    rng = np.random.default_rng(0)
    keys = {"left": "1", "tie": "2", "right": "3"}
    try:
        driver.get((study["dir"] / "page" / "index.html").resolve().as_uri())
        current = lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-comparison")
        press = lambda key: driver.find_element(By.TAG_NAME, "body").send_keys(key)
        # counterbalancing: the page mirrors the pairs for about half of the participant ids
        forms = driver.execute_script("return Array.from({length: 40}, (_, i) => sidesMirrored('p' + i))")
        assert 10 <= sum(forms) <= 30
        pid, mirrored = f"p{forms.index(True)}", True  # a participant who sees the pairs mirrored
        driver.find_element(By.ID, "pid").send_keys(pid, Keys.ENTER)
        total = len(study["key"]["comparisons"])
        made, seen = {}, []
        while len(made) < total:
            cid = current()
            assert cid in study["key"]["comparisons"] and cid not in seen
            seen.append(cid)
            # the left image is key.json's left one, or its right one for a mirrored participant
            left = driver.find_element(By.ID, "left").get_attribute("src")
            assert left.endswith(f"images/{cid}-{2 if mirrored else 1}.png"), (left, mirrored)
            choice = ["left", "tie", "right"][rng.integers(3)]
            if len(seen) == 2:
                # answer, go back, change the answer: the later one counts
                press(keys["left"])
                press(Keys.BACKSPACE)
                assert current() == cid
                choice = "right"
            press(keys[choice])
            made[cid] = choice
            if len(made) == total // 2:
                next_cid = current()
                driver.refresh()  # progress is kept in localStorage
                assert current() == next_cid
                assert driver.find_element(By.ID, "count").text == f"{len(made)} of {total} answered"
        assert driver.find_element(By.ID, "done").is_displayed()
        assert driver.find_element(By.ID, "bar").get_attribute("style").replace(" ", "") == "width:100%;"
        exported = driver.execute_script("return studyVotes()")
        driver.find_element(By.ID, "download").click()
        votes_file = tmp_path / f"votes-{pid}.json"
        WebDriverWait(driver, 10).until(lambda _: votes_file.is_file())
    finally:
        driver.quit()
    saved = json.loads(votes_file.read_text())
    assert saved["votes"] == exported["votes"] and saved["participant"] == pid and saved["mirrored"]
    assert {v["comparison"]: v["choice"] for v in saved["votes"]} == made
    assert all(isinstance(v["time_ms"], int) and v["time_ms"] >= 0 for v in saved["votes"])

    evaluate.main(["userstudy-tally", str(study["dir"]), str(votes_file)])
    tally = json.loads((study["dir"] / "tally.json").read_text())
    for baseline in BASELINES:
        outcomes = []
        for cid, choice in made.items():
            c = study["key"]["comparisons"][cid]
            ours_side = c["ours_side"] if not mirrored else "right" if c["ours_side"] == "left" else "left"
            if c["baseline"] == baseline:
                outcomes.append("tie" if choice == "tie" else "win" if choice == ours_side else "lose")
        row = tally["baselines"][baseline]
        assert row["votes"] == len(outcomes) == 3
        for outcome in ("win", "tie", "lose"):
            assert row[outcome] == pytest.approx(100 * outcomes.count(outcome) / len(outcomes))


# ---------------------------------------------------------------------------
# paper Figs. 6-7: named prompt sets and the panel
# ---------------------------------------------------------------------------


def test_figure_prompt_sets(tmp_path, repo_root):
    """The panels' prompts are the figure captions' (paper Figs. 6-7), top to bottom, in evaluate.py."""
    assert evaluate.load_prompts("figure6", tmp_path) == [
        "a plant", "a woman sitting on a table drinking coffee, long shot, wide shot, highly detailed, intricate, "
        "professional photography, RAW color, night shot, bokeh, sharp focus, taken with EOS 5D, UHD 8K",
        "a corgi's head"]
    assert evaluate.load_prompts("figure7", tmp_path) == ["a fire hydrant", "a person",
                                                          "Anime illustration of Gundam mech suit on Pixiv"]
    assert evaluate.load_prompts("figure7", tmp_path, max_prompts=1) == ["a fire hydrant"]
    assert not (repo_root / "prompts").exists()  # no prompt folder at the top level


def test_grid_is_methods_by_prompts_with_prompt_text(tmp_path):
    methods, prompts = ["base", "ours", "dpo"], PROMPTS[:2]
    manifest = []
    for m, method in enumerate(methods):
        for index, prompt in enumerate(prompts):
            image = evaluate.image_relpath(method, 42, index)
            common.atomic_save_image(Image.new("RGB", (32, 32), COLOURS[m]), tmp_path / image)
            manifest.append({"image": image, "method": method, "seed": 42, "index": index, "prompt": prompt})
    import matplotlib.pyplot as plt

    drawn = []
    monkeypatch_text = plt.Axes.text

    def spy(self, x, y, s, *args, **kwargs):
        drawn.append(s)
        return monkeypatch_text(self, x, y, s, *args, **kwargs)

    plt.Axes.text = spy
    try:
        assert evaluate.draw_grid(tmp_path, manifest, methods, 4, tmp_path / "grid.png")
    finally:
        plt.Axes.text = monkeypatch_text
    # the prompt text, wrapped, beside each row (not "prompt 0")
    assert [" ".join(s.split()) for s in drawn] == prompts
    grid = pixels(tmp_path / "grid.png")
    # one column per method: each method's colour appears, left to right in order, in the first image row
    row = grid[grid.shape[0] // 3]
    first_x = [np.flatnonzero((row == COLOURS[m]).all(-1)) for m in range(3)]
    assert all(len(x) > 100 for x in first_x)
    assert first_x[0].min() < first_x[1].min() < first_x[2].min()
    assert grid.shape[1] > grid.shape[0]  # 3 columns + text, 2 rows: landscape
