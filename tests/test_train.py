"""Tests of train_dro.py (Stage 1) and train_dpo.py (Stage 2) on the tiny models."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import train_dpo
import train_dro
from conftest import ROOT, make_pairs

SMALL = ["--resolution", "32", "--sample_grid_steps", "0", "--checkpoint_every", "2", "--seed", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 training pairs and 2 held-out pairs (different discs)."""
    root = tmp_path_factory.mktemp("data")
    return {"train": make_pairs(root / "train", n=8, seed=0), "heldout": make_pairs(root / "heldout", n=2, seed=1)}


def run(script, out, model, pairs, *extra):
    argv = ["--pretrained_model", model, "--pairs", str(pairs), "--output_dir", str(out), *SMALL, *extra]
    (train_dro if script == "dro" else train_dpo).main([str(a) for a in argv])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def state_of(out):
    return torch.load(out / "state" / "training_state.pt", weights_only=False)


# ----------------------------------------------------------- the logged loss
@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_dro_loss_equals_formula_and_policy_target_is_the_snapshot(kind, tiny_models, data, tmp_path):
    log = run("dro", tmp_path, tiny_models[kind], data["train"], "--train_batch_size", "1",
              "--effective_batch_size", "1", "--max_train_steps", "3", "--learning_rate", "1e-2",
              "--snapshot_every", "100")
    for rec in log:  # batch of one: the logged errors are that sample's errors
        D = (rec["model_err_real"] - rec["ref_err_real"]) - (rec["model_err_policy"] - rec["ref_err_policy"])
        assert rec["loss"] == pytest.approx(max(D + 0.001, 0.0), abs=5e-7)
        assert rec["D"] == pytest.approx(D, abs=5e-7)
        # the target of the policy term is the frozen snapshot's prediction: the
        # reference equals the snapshot here (no refresh yet), so its error is ~0
        assert rec["ref_err_policy"] < 1e-9
    # the learner moved away from the snapshot; with the learner's own
    # prediction as target this error would be exactly 0 (the public SD-3.5-M trainer's defect, README "Differences from the public code")
    assert log[-1]["model_err_policy"] > 1e-7


def test_dro_with_several_points_per_trajectory(tiny_models, data, tmp_path):
    """The opt-in --points_per_trajectory 2: one trajectory serves both samples
    of a micro-batch of 2, and the same real image is used at both timesteps."""
    log = run("dro", tmp_path, tiny_models["sd3"], data["train"], "--train_batch_size", "2",
              "--effective_batch_size", "2", "--max_train_steps", "2", "--points_per_trajectory", "2",
              "--learning_rate", "1e-2")
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)
    assert log[-1]["model_err_policy"] > 0 and log[0]["ref_err_policy"] < 1e-9


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_dpo_loss_equals_formula(kind, tiny_models, data, tmp_path):
    log = run("dpo", tmp_path, tiny_models[kind], data["train"], "--train_batch_size", "1",
              "--effective_batch_size", "1", "--max_train_steps", "2", "--learning_rate", "1e-3",
              "--beta", "50")
    assert log[0]["model_err_w"] == log[0]["ref_err_w"]  # reference = the start point (the base here)
    for rec in log:
        inner = (rec["model_err_w"] - rec["ref_err_w"]) - (rec["model_err_l"] - rec["ref_err_l"])
        assert rec["loss"] == pytest.approx(math.log1p(math.exp(25 * inner)), abs=1e-6)
        assert rec["implicit_acc"] == float(inner < 0)


# ------------------------------------------------------- training does its job
def lora_minus_base_error(model, lora, pairs_csv, side, draws=32):
    """Mean over images and fixed noise draws of err(base + LoRA) - err(base)."""
    bb = common.Backbone(common.load_pipeline(model), "cpu")
    common.load_lora_into(bb, str(lora), common.LEARNER)
    pairs = common.read_pairs_csv(pairs_csv)
    cache = common.build_input_cache(bb, pairs, 32, pairs_csv.parent / f"cache-{bb.kind}.safetensors",
                                     progress=False)
    g = torch.Generator().manual_seed(123)
    rows = torch.arange(len(pairs)).repeat(draws)
    x0, cond = common.sample_inputs(bb, cache, rows, g, ["real", "fake"], flip=False)
    noise = torch.randn(x0["real"].shape, generator=g)
    t = bb.sample_timesteps(len(rows), g)
    gaps = {}
    for name in ("real", "fake"):
        x_t, target = bb.add_noise(x0[name], noise, t), bb.target(x0[name], noise)
        with torch.no_grad():
            bb.net.enable_adapters()
            with_lora = common.per_sample_mse(bb.predict(bb.net, x_t, t, cond), target)
            bb.net.disable_adapters()
            base = common.per_sample_mse(bb.predict(bb.net, x_t, t, cond), target)
        gaps[name] = with_lora - base
    return gaps[side] if side != "margin" else -(gaps["real"] - gaps["fake"])


@pytest.mark.parametrize("sign", [1, -1])
def test_dro_lowers_heldout_real_error_and_fails_with_flipped_sign(sign, tiny_models, data, tmp_path,
                                                                   monkeypatch):
    if sign < 0:  # the same run with the loss negated must do the opposite
        original = common.diffusion_dro_loss
        monkeypatch.setattr(common, "diffusion_dro_loss",
                            lambda *a, **k: (lambda loss, stats: (-loss, stats))(*original(*a, **k)))
    run("dro", tmp_path, tiny_models["sd15"], data["train"], "--train_batch_size", "4",
        "--effective_batch_size", "8", "--max_train_steps", "8", "--learning_rate", "3e-3", "--no-use_ema",
        "--snapshot_every", "4", "--caption_dropout", "0")
    gap = lora_minus_base_error(tiny_models["sd15"], tmp_path / "checkpoint-8", data["heldout"], "real").mean()
    assert sign * gap < 0, f"held-out real error moved by {gap:.3g}"


@pytest.mark.parametrize("swap", [False, True])
def test_dpo_raises_reward_margin_and_fails_when_swapped(swap, tiny_models, tmp_path):
    """On 4 pairs whose loser is noise (a preference the tiny random SD-3 model
    can pick up in a few steps; the tiny UNet's errors barely depend on image
    content), the trained LoRA prefers the winners; trained on swapped pairs it
    prefers the losers."""
    pairs = make_pairs(tmp_path / "data", n=4, noise_fakes=True)
    train_pairs = pairs
    if swap:
        text = pairs.read_text().replace("real_image_path", "TMP").replace("fake_image_path", "real_image_path")
        train_pairs = pairs.with_name("swapped.csv")
        train_pairs.write_text(text.replace("TMP", "fake_image_path"))
    log = run("dpo", tmp_path / "run", tiny_models["sd3"], train_pairs, "--train_batch_size", "4",
              "--effective_batch_size", "4", "--max_train_steps", "8", "--learning_rate", "3e-3", "--beta", "100",
              "--no-use_ema")  # the checkpoint holds the trained weights (SD-3's EMA would update once, at step 7)
    margin = lora_minus_base_error(tiny_models["sd3"], tmp_path / "run" / "checkpoint-8", pairs, "margin")
    accuracy = (margin > 0).float().mean().item()
    if swap:
        assert margin.mean() < 0 and accuracy < 0.4, (margin.mean(), accuracy)
    else:
        assert margin.mean() > 0 and accuracy > 0.6, (margin.mean(), accuracy)
        assert sum(r["reward_margin"] for r in log[-3:]) > sum(r["reward_margin"] for r in log[:3])


# ------------------------------------------------------------ roles and resume
def test_snapshot_refresh_every_n_steps(tiny_models, data, tmp_path):
    common_args = ["--train_batch_size", "2", "--effective_batch_size", "2", "--learning_rate", "1e-2",
                   "--snapshot_every", "2", "--checkpoint_every", "1"]
    log = run("dro", tmp_path, tiny_models["sd15"], data["train"], *common_args, "--max_train_steps", "2")
    state2 = state_of(tmp_path)
    for a, b in zip(state2["roles"]["policy"], state2["roles"]["learner"]):
        assert torch.equal(a, b)  # refreshed at step 2
    log = run("dro", tmp_path, tiny_models["sd15"], data["train"], *common_args, "--max_train_steps", "5",
              "--resume")
    assert [r["snapshot_refreshed"] for r in log] == [0, 1, 0, 1, 0]
    state5 = state_of(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(state5["roles"]["ref"], state2["roles"]["ref"]))
    assert not all(torch.equal(a, b) for a, b in zip(state5["roles"]["policy"], state5["roles"]["learner"]))
    checkpoint4 = tmp_path / "checkpoint-4"
    assert checkpoint4.exists()


@pytest.mark.parametrize("script,kind", [("dro", "sd15"), ("dpo", "sd3")])
def test_resume_equals_uninterrupted(script, kind, tiny_models, data, tmp_path):
    args = ["--train_batch_size", "2", "--effective_batch_size", "4", "--learning_rate", "1e-3",
            "--snapshot_every", "2"] if script == "dro" else ["--train_batch_size", "2", "--effective_batch_size",
                                                             "4", "--learning_rate", "1e-3", "--use_ema"]
    full = run(script, tmp_path / "full", tiny_models[kind], data["train"], *args, "--max_train_steps", "4")
    run(script, tmp_path / "cut", tiny_models[kind], data["train"], *args, "--max_train_steps", "2")
    resumed = run(script, tmp_path / "cut", tiny_models[kind], data["train"], *args, "--max_train_steps", "4",
                  "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-5, abs=1e-8)
    a, b = state_of(tmp_path / "full"), state_of(tmp_path / "cut")
    for role in a["roles"]:
        for x, y in zip(a["roles"][role], b["roles"][role]):
            assert torch.allclose(x, y, atol=1e-6)
    for x, y in zip(a["ema"]["shadow"], b["ema"]["shadow"]):
        assert torch.allclose(x, y, atol=1e-6)


def test_checkpoint_loads_in_stock_pipeline_and_warm_start(tiny_models, data, tmp_path):
    """Stage 1 checkpoint -> stock pipeline reproduces the EMA weights; Stage 2
    warm-started from it uses it as the frozen reference."""
    run("dro", tmp_path / "s1", tiny_models["sd3"], data["train"], "--train_batch_size", "2",
        "--effective_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-2")
    state = state_of(tmp_path / "s1")
    bb = common.Backbone(common.load_pipeline(tiny_models["sd3"]), "cpu")
    common.setup_lora_roles(bb, [common.LEARNER], rank=32, alpha=64)
    with torch.no_grad():
        for p, value in zip(common.role_parameters(bb.net, common.LEARNER), state["ema"]["shadow"]):
            p.copy_(value)
    stock = common.load_pipeline(tiny_models["sd3"])
    stock.load_lora_weights(str(tmp_path / "s1" / "checkpoint-2"))
    cond = bb.encode_prompts(["a photo"])
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500.0])
    assert torch.allclose(common.Backbone(stock, "cpu").predict(stock.transformer, x, t, cond),
                          bb.predict(bb.net, x, t, cond), atol=1e-5)

    log = run("dpo", tmp_path / "s2", tiny_models["sd3"], data["train"], "--train_batch_size", "2",
              "--effective_batch_size", "2", "--max_train_steps", "1", "--init_lora", tmp_path / "s1" / "checkpoint-2")
    assert log[0]["model_err_w"] == log[0]["ref_err_w"] and log[0]["model_err_l"] == log[0]["ref_err_l"]
    ref = state_of(tmp_path / "s2")["roles"]["ref"]
    assert all(torch.equal(a, b.float()) for a, b in zip(ref, state["ema"]["shadow"]))
    # without --init_lora the reference is the base model: LoRA B matrices at zero
    run("dpo", tmp_path / "s2-base", tiny_models["sd3"], data["train"], "--train_batch_size", "2",
        "--effective_batch_size", "2", "--max_train_steps", "1")
    ref_base = state_of(tmp_path / "s2-base")["roles"]["ref"]
    assert any(r.abs().sum() > 0 for r in ref_base) and sum(int(r.abs().sum() == 0) for r in ref_base) > 0


def test_gradient_checkpointing_gives_the_same_training(tiny_models, data, tmp_path):
    args = ["--train_batch_size", "2", "--effective_batch_size", "2", "--max_train_steps", "3",
            "--learning_rate", "1e-2"]
    plain = run("dro", tmp_path / "plain", tiny_models["sd3"], data["train"], *args)
    checkpointed = run("dro", tmp_path / "gc", tiny_models["sd3"], data["train"], *args, "--gradient_checkpointing")
    for a, b in zip(plain, checkpointed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
        assert a["model_err_policy"] == pytest.approx(b["model_err_policy"], rel=1e-4, abs=1e-9)
    assert checkpointed[-1]["model_err_policy"] > 0  # gradients reached the LoRA through the checkpoints


def test_micro_batches_cover_distinct_rows_across_processes():
    rows = [common.micro_batch_rows(step=1, micro=m, grad_accum=2, rank=r, world=2, batch_size=3, num_rows=12,
                                    seed=0).tolist() for m in range(2) for r in range(2)]
    flat = sum(rows, [])
    assert len(flat) == 12 and sorted(flat) == list(range(12))  # one epoch = one optimizer step here


@pytest.mark.multiprocess
@pytest.mark.parametrize("script", ["train_dro.py", "train_dpo.py"])
def test_two_processes_train_the_same_lora_as_one(script, tiny_models, data, tmp_path):
    """2 processes x accumulation 2 (torchrun, a gloo group on the CPU) and 1
    process x accumulation 4 draw the same inputs for every sample, so they
    train the same LoRA."""
    argv = ["--pretrained_model", tiny_models["sd15"], "--pairs", str(data["train"]), *SMALL,
            "--train_batch_size", "1", "--effective_batch_size", "4", "--max_train_steps", "2",
            "--learning_rate", "1e-3", "--lr_warmup_steps", "0"]
    # --standalone: a free port of torchrun's choosing (a fixed one may be taken by another run on the machine)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / script), *argv, "--output_dir", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    args = json.loads((tmp_path / "two" / "args.json").read_text())
    assert args["num_processes"] == 2 and args["gradient_accumulation_steps"] == 2  # 1 x 2 x 2 = 4
    # one line of the main process's log (one write), so the other process's output cannot split it
    assert "stage %d: 2 process(es)" % (1 if script == "train_dro.py" else 2) in result.stderr
    log = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert (tmp_path / "two" / "checkpoint-2" / "pytorch_lora_weights.safetensors").exists()

    one = run("dro" if script == "train_dro.py" else "dpo", tmp_path / "one", tiny_models["sd15"], data["train"],
              *argv[4:])
    assert json.loads((tmp_path / "one" / "args.json").read_text())["gradient_accumulation_steps"] == 4
    # Same inputs, same per-sample computations; only the order of the float
    # sums differs (4 gradients accumulated in one process vs 2 + 2 averaged
    # over processes, relative error ~1e-7). AdamW moves each weight by about
    # the learning rate (1e-3) per step whatever the gradient's size, so other
    # draws differ by ~1e-3; rounding differs by far less, except where AdamW
    # normalises a gradient near rounding level (the A matrices' first
    # gradients, at step 2, pass through B ~ 1e-3, and DPO's beta 2000
    # amplifies the cancellation in its error differences; 0.05% of the
    # weights differ by 1e-6 to 1e-5, and a gradient that is all rounding
    # can flip its sign, a whole step): all but 0.1% of the weights within 5%
    # of a step, and on average within 1e-7 (other draws: nearly every weight
    # a step apart, 1e-4 and more on average).
    start = state_of(tmp_path / "one")["roles"]["ref"]
    diffs = torch.cat([(a - b).abs().flatten() for a, b in zip(state_of(tmp_path / "two")["roles"]["learner"],
                                                              state_of(tmp_path / "one")["roles"]["learner"])])
    far = (diffs > 5e-5).float().mean()
    assert far < 1e-3 and diffs.mean() < 1e-7, (far, diffs.max(), diffs.mean())
    moved = max((b - s).abs().max().item() for b, s in zip(state_of(tmp_path / "one")["roles"]["learner"], start))
    assert moved > 1e-4
    # the losses are functions of differences of errors of size ~1 (absolute
    # float noise ~1e-7), which DPO multiplies by beta/2 = 1000
    noise = 3e-7 * (1000 if script == "train_dpo.py" else 1)
    for a, b in zip(log, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=noise)


# ------------------------------------------------------------------ bad input
def run_cli(script, *argv):
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], capture_output=True, text=True,
                            timeout=120)
    return result.returncode, result.stderr


def expect_error(capsys, script, argv, message):
    module = train_dro if script == "dro" else train_dpo
    with pytest.raises(SystemExit) as exit_info:
        common.run_main(lambda: module.main([str(a) for a in argv]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err


def test_bad_inputs_stop_with_one_clear_message(tiny_models, data, tmp_path, capsys):
    base = ["--pairs", data["train"], "--resolution", "32", "--train_batch_size", "2"]
    sd15 = ["--pretrained_model", tiny_models["sd15"]]
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("uid,caption\n1,a cat\n")
    expect_error(capsys, "dro", [*sd15, "--pairs", bad_csv, "--output_dir", tmp_path / "a"], "real_image_path")
    missing = tmp_path / "missing.csv"
    missing.write_text("prompt,real_image_path,fake_image_path\na,nope.png,nope.png\n")
    expect_error(capsys, "dpo", [*sd15, "--pairs", missing, "--output_dir", tmp_path / "a"], "is not a file")
    expect_error(capsys, "dro", [*base, "--pretrained_model", tmp_path / "no-such-model",
                                 "--output_dir", tmp_path / "a"], "could not load the diffusers pipeline")
    expect_error(capsys, "dro", [*base, "--pretrained_model", tmp_path, "--output_dir", tmp_path / "a"],
                 "not a diffusers pipeline")
    expect_error(capsys, "dro", [*base, *sd15, "--output_dir", tmp_path / "a", "--resume"], "no saved state")
    expect_error(capsys, "dro", [*base, *sd15, "--output_dir", tmp_path / "a", "--effective_batch_size", "5"],
                 "not a multiple")
    expect_error(capsys, "dro", [*base, *sd15, "--output_dir", tmp_path / "a", "--effective_batch_size", "2",
                                 "--points_per_trajectory", "3"], "must divide")
    # a LoRA of the other backbone
    bb = common.Backbone(common.load_pipeline(tiny_models["sd3"]), "cpu")
    config = common.setup_lora_roles(bb, [common.LEARNER], rank=4, alpha=4)
    common.save_lora_checkpoint(bb, common.lora_state_dict(bb.net, common.LEARNER), config, tmp_path / "sd3-lora")
    expect_error(capsys, "dpo", [*base, *sd15, "--output_dir", tmp_path / "b", "--effective_batch_size", "2",
                                 "--init_lora", tmp_path / "sd3-lora"], "other backbone")
    # a finished run is not overwritten without --resume
    run("dro", tmp_path / "done", tiny_models["sd15"], data["train"], "--train_batch_size", "2",
        "--effective_batch_size", "2", "--max_train_steps", "1")
    before = (tmp_path / "done" / "metrics.jsonl").read_text()
    expect_error(capsys, "dro", [*base, *sd15, "--output_dir", tmp_path / "done"], "already holds a run")
    assert (tmp_path / "done" / "metrics.jsonl").read_text() == before
    # and the real command line: exit status 2, one line, no traceback
    code, err = run_cli("train_dro.py", *sd15, "--pairs", bad_csv, "--output_dir", tmp_path / "c")
    assert code == 2 and err.strip().startswith("error:") and "Traceback" not in err


# ------------------------------------------- Stage-1 timesteps on SD-3.5-M
def logit_normal_shift_cdf(t, shift=3.0):
    """CDF of t = 1000 sigma, sigma = s u / (1 + (s - 1) u), u = sigmoid(z),
    z ~ N(0, 1) (paper Sec. 3, SD-3's "logit-normal" with the scheduler's shift):
    P(t <= x) = Phi(logit(u(x))), u(sigma) = sigma / (s - (s - 1) sigma)."""
    from math import erf, sqrt

    sigma = np.clip(np.asarray(t, dtype=np.float64) / 1000.0, 1e-12, 1 - 1e-12)
    u = sigma / (shift - (shift - 1) * sigma)
    z = np.log(u / (1 - u))
    return np.array([0.5 * (1 + erf(v / sqrt(2))) for v in z])


def test_sd3_stage1_timesteps_follow_the_logit_normal_shift_law(tiny_models, data, tmp_path, monkeypatch):
    """The learner's Stage-1 timesteps, recorded from the real training code
    path (train_dro.main -> common.learner_and_ref_errors), must follow the
    logit-normal law through the shift 3, not sit on the points of the
    sampler's grid (2 steps here: sampling is most of this test's time, and the
    law of the learner's timesteps does not depend on it).

    Threshold 0.095: the Kolmogorov-Smirnov critical value at alpha = 0.001 for
    n = 512 draws is 1.95 / sqrt(n) = 0.086, plus 0.001 for drawing t from
    the scheduler's 1000-point timestep table (floor(u * 1000)) instead of the
    continuous law, plus a small margin. On a grid of 2 points the
    empirical CDF jumps by 0.5 at each: off by 0.25 at least."""
    recorded = []
    original = common.learner_and_ref_errors

    def recording(backbone, x_t, t, cond, target, **kwargs):
        recorded.append(t[: len(t) // 2].detach().cpu())  # [real; policy] share t: keep one half
        return original(backbone, x_t, t, cond, target, **kwargs)

    monkeypatch.setattr(common, "learner_and_ref_errors", recording)
    run("dro", tmp_path, tiny_models["sd3"], data["train"], "--train_batch_size", "256",
        "--effective_batch_size", "512", "--max_train_steps", "1", "--no-use_ema", "--checkpoint_every", "100",
        "--sampler_steps", "2", "--allow_unusual")  # 256 timesteps per micro-batch from 8 pairs
    t = torch.cat(recorded)
    assert len(t) == 512
    ks = ks_distance(t)
    print(f"KS distance of {len(t)} Stage-1 timesteps to the logit-normal (shift 3) law: {ks:.4f}")
    assert ks < 0.095


def ks_distance(t):
    """Kolmogorov-Smirnov distance of the timesteps `t` to logit_normal_shift_cdf."""
    t = np.sort(t.double().cpu().numpy())
    cdf, n = logit_normal_shift_cdf(t), len(t)
    return max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max())


# ----------------------------- SD-3 Stage 1 as the public SD-3.5-M trainer has it
def test_sd3_endpoint_policy_point_is_the_noised_end_of_thetas_sample(tiny_models):
    """--sd3_policy_point endpoint: theta's 10-step flow-Euler sample (no
    guidance) taken to its end x0, then x_t = (1 - sigma) x0 + sigma eps at a
    drawn t, checked against a plain Euler loop; K = 2 points share one
    sample. Its timesteps pass the KS test above (threshold 0.07 for 1024
    draws; t does not depend on the sample, so these run one step at 8 px)."""
    bb = common.Backbone(common.load_pipeline(tiny_models["sd3"]), "cpu")
    cond = bb.encode_prompts(["a", "b", "c"])
    x_t, t, prediction, eps = bb.policy_endpoint_point(bb.net, cond, 32, 10, torch.Generator().manual_seed(5),
                                                       points_per_trajectory=2)
    g = torch.Generator().manual_seed(5)  # the same draws: initial noise, t, eps
    x = torch.randn((3, *bb.latent_shape(32)), generator=g)
    assert torch.equal(t, bb.sample_timesteps(6, g)) and torch.equal(eps, torch.randn(eps.shape, generator=g))
    bb.scheduler.set_timesteps(10)
    sigmas = bb.scheduler.sigmas
    with torch.no_grad():
        for i in range(10):
            x = x + (sigmas[i + 1] - sigmas[i]) * bb.predict(bb.net, x, (1000 * sigmas[i]).expand(3), cond)
        sigma = (t / 1000).view(-1, 1, 1, 1)
        assert torch.allclose(x_t, (1 - sigma) * x.repeat_interleave(2, dim=0) + sigma * eps, atol=1e-5)
        two = {key: value.repeat_interleave(2, dim=0) for key, value in cond.items()}
        assert torch.allclose(prediction, bb.predict(bb.net, x_t, t, two), atol=1e-5)
    many = {"prompt_embeds": cond["prompt_embeds"][:1, :1].expand(1024, 1, -1),
            "pooled_prompt_embeds": cond["pooled_prompt_embeds"][:1].expand(1024, -1)}
    _, t, none, _ = bb.policy_endpoint_point(bb.net, many, 8, 1, torch.Generator().manual_seed(1),
                                             with_prediction=False)
    assert none is None and len(t) == 1024 and ks_distance(t) < 0.07


def test_learner_target_zeroes_the_policy_term_and_its_gradient(tiny_models):
    """--policy_target learner (a diagnostic): the policy rows' target is the
    learner's own prediction, detached, so the learner's policy error is
    exactly 0 and has exactly zero gradient; the real rows keep theirs."""
    bb = common.Backbone(common.load_pipeline(tiny_models["sd3"]), "cpu")
    common.setup_lora_roles(bb, [common.LEARNER, common.REF], rank=4, alpha=4)
    params = common.role_parameters(bb.net, common.LEARNER)
    with torch.no_grad():  # a learner away from the reference, so every LoRA weight has a gradient
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = torch.Generator().manual_seed(0)
    cond = bb.encode_prompts(["a", "b", "a", "b"])
    x_t, t, target = (torch.randn((4, *bb.latent_shape(32)), generator=g), bb.sample_timesteps(4, g),
                      torch.randn((2, *bb.latent_shape(32)), generator=g))
    model_err, ref_err = common.learner_and_ref_errors(bb, x_t, t, cond, target, own_target_from=2)
    assert torch.equal(model_err[2:], torch.zeros(2)) and (model_err[:2] > 0).all() and (ref_err[2:] > 0).all()
    zero = torch.autograd.grad(model_err[2:].sum(), params, retain_graph=True, materialize_grads=True)
    real = torch.autograd.grad(model_err[:2].sum(), params)
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in zero)
    assert sum(grad.abs().sum() for grad in real) > 0  # (the last block's text-stream output is unused)


@pytest.mark.parametrize("policy_target", ["snapshot", "learner"])
def test_sd3_endpoint_training_shares_noise_and_timestep_with_the_real_side(policy_target, tiny_models, data,
                                                                             tmp_path, monkeypatch):
    """train_dro.py --sd3_policy_point endpoint: the learner sees the policy
    point the sampler returned and the real latent noised with the SAME eps
    at the SAME t; with --policy_target learner the logged policy error is
    exactly 0, with the snapshot's target it is not once the learner moved."""
    seen = []
    originals = (common.sample_inputs, common.Backbone.policy_endpoint_point, common.learner_and_ref_errors)

    def endpoint(self, *args, **kwargs):  # the policy side comes first in a micro-batch
        seen.append({"endpoint": originals[1](self, *args, **kwargs)})
        return seen[-1]["endpoint"]

    def sample_inputs(*args, **kwargs):
        x0, cond = originals[0](*args, **kwargs)
        seen[-1]["x0"] = x0["real"].clone()
        return x0, cond

    def errors(backbone, x_t, t, cond, target, **kwargs):
        seen[-1].update(x_t=x_t.detach().clone(), t=t.clone())
        return originals[2](backbone, x_t, t, cond, target, **kwargs)

    monkeypatch.setattr(common, "sample_inputs", sample_inputs)
    monkeypatch.setattr(common.Backbone, "policy_endpoint_point", endpoint)
    monkeypatch.setattr(common, "learner_and_ref_errors", errors)
    log = run("dro", tmp_path, tiny_models["sd3"], data["train"], "--train_batch_size", "2",
              "--effective_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-2",
              "--sd3_policy_point", "endpoint", "--policy_target", policy_target,
              *(["--snapshot_every", "1"] if policy_target == "learner" else []))  # learner: as the public trainer
    assert len(seen) == 2
    for record in seen:
        x_policy, t, _, eps = record["endpoint"]
        sigma = (t / 1000).view(-1, 1, 1, 1)
        assert torch.equal(record["t"], torch.cat([t, t])) and torch.equal(record["x_t"][2:], x_policy)
        assert torch.allclose(record["x_t"][:2], (1 - sigma) * record["x0"] + sigma * eps, atol=1e-6)
    for rec in log:
        D = (rec["model_err_real"] - rec["ref_err_real"]) - (rec["model_err_policy"] - rec["ref_err_policy"])
        assert rec["loss"] == pytest.approx(max(D + 0.001, 0.0), abs=5e-7)
    if policy_target == "learner":
        assert all(rec["model_err_policy"] == 0.0 for rec in log) and log[-1]["ref_err_policy"] > 0
    else:
        assert log[0]["ref_err_policy"] < 1e-9 < log[-1]["model_err_policy"]


# ------------------------------------------------------------- reliability
def test_diverging_run_stops_and_keeps_the_last_good_state(tiny_models, data, tmp_path, monkeypatch, capsys):
    """A NaN loss at step 3 stops the run with a message naming the step; the
    state of step 2 stays, nothing of step 3 is logged or saved."""
    original, calls = common.diffusion_dpo_loss, []

    def nan_from_step_3(*a, **k):
        loss, stats = original(*a, **k)
        calls.append(1)
        return (loss * math.nan, stats) if len(calls) >= 3 else (loss, stats)

    monkeypatch.setattr(common, "diffusion_dpo_loss", nan_from_step_3)
    argv = ["--pretrained_model", tiny_models["sd15"], "--pairs", data["train"], "--output_dir", tmp_path, *SMALL,
            "--train_batch_size", "2", "--effective_batch_size", "2", "--max_train_steps", "4"]
    expect_error(capsys, "dpo", argv, "step 3: non-finite")
    assert state_of(tmp_path)["step"] == 2
    assert all(torch.isfinite(p).all() for p in state_of(tmp_path)["roles"]["learner"])
    assert not (tmp_path / "checkpoint-3").exists() and not (tmp_path / "checkpoint-4").exists()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # weights that overflow while the loss was finite are never saved
    monkeypatch.setattr(common, "diffusion_dpo_loss", original)
    make_optimizer = common.make_optimizer

    def overflowing_optimizer(args, params):
        optimizer, scheduler = make_optimizer(args, params)
        step = optimizer.step
        optimizer.step = lambda: (step(), params[0].data.fill_(math.inf))
        return optimizer, scheduler

    monkeypatch.setattr(common, "make_optimizer", overflowing_optimizer)
    argv = [*argv[:5], tmp_path / "overflow", *argv[6:], "--checkpoint_every", "1"]
    expect_error(capsys, "dpo", argv, "step 1: non-finite LoRA weights")
    assert not (tmp_path / "overflow" / "checkpoint-1").exists() and not (tmp_path / "overflow" / "state").exists()


def test_resume_refuses_changed_settings_and_allows_the_safe_ones(tiny_models, data, tmp_path, capsys):
    argv = ["--pretrained_model", tiny_models["sd15"], "--pairs", data["train"], "--output_dir", tmp_path, *SMALL,
            "--train_batch_size", "2", "--effective_batch_size", "2", "--max_train_steps", "2"]
    run("dpo", tmp_path, tiny_models["sd15"], data["train"], *argv[6:])
    expect_error(capsys, "dpo", [*argv, "--resume", "--lora_rank", "8", "--seed", "1"],
                 "--lora_rank 4 -> 8; --seed 0 -> 1")
    assert state_of(tmp_path)["step"] == 2
    # the safe ones (common.RESUME_SAFE_FLAGS) may change; and a last line of
    # metrics.jsonl cut short by a kill does not block the resume
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    log = run("dpo", tmp_path, tiny_models["sd15"], data["train"], *argv[6:-1], "3", "--checkpoint_every", "3",
              "--resume")
    assert [r["step"] for r in log] == [1, 2, 3]


def test_write_failures_name_the_path_and_the_cause(tiny_models, data, tmp_path, monkeypatch, capsys):
    import errno
    from pathlib import Path

    argv = ["--pretrained_model", tiny_models["sd15"], "--pairs", data["train"], *SMALL,
            "--train_batch_size", "2", "--effective_batch_size", "2", "--max_train_steps", "2"]
    run("dro", tmp_path / "run", tiny_models["sd15"], data["train"], *argv[4:])
    before = (tmp_path / "run" / "state" / "training_state.pt").read_bytes()
    for code, words in ((errno.ENOSPC, "the disk is full"), (errno.EACCES, "no permission"),
                        (errno.EROFS, "the file system is read-only")):
        def fail(self, *a, code=code, **k):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(Path, "write_bytes", fail)  # the state's writer
        expect_error(capsys, "dro", [*argv[:-1], "4", "--output_dir", tmp_path / "run", "--resume"],
                     f"rng_rank0.pt: {os.strerror(code)} ({words})")
        monkeypatch.undo()
        assert (tmp_path / "run" / "state" / "training_state.pt").read_bytes() == before  # the earlier state
    # an output path that is a file
    (tmp_path / "file").write_text("x")
    expect_error(capsys, "dro", [*argv, "--output_dir", tmp_path / "file"], "is a file, not a folder")


def test_nonsense_values_and_missing_init_lora_are_refused(tiny_models, data, tmp_path, capsys):
    base = ["--pretrained_model", tiny_models["sd15"], "--pairs", data["train"], "--resolution", "32",
            "--train_batch_size", "2", "--effective_batch_size", "2", "--output_dir", tmp_path / "a"]
    expect_error(capsys, "dro", [*base, "--max_train_steps", "0"], "--max_train_steps: must be an integer >= 1")
    for lr in ("0", "-1e-4", "nan", "inf"):
        expect_error(capsys, "dpo", [*base, f"--learning_rate={lr}"], "--learning_rate: must be a finite number > 0")
    expect_error(capsys, "dpo", [*base, "--init_lora", tmp_path / "no-such-lora"], "was not found")
    expect_error(capsys, "dro", [*base, "--sd3_policy_point", "endpoint"], "needs an SD-3 pipeline")


def test_state_loads_with_weights_only_and_files_follow_the_umask(tiny_models, data, tmp_path):
    old_mask = os.umask(0o022)
    try:
        run("dro", tmp_path, tiny_models["sd15"], data["train"], "--train_batch_size", "2",
            "--effective_batch_size", "2", "--max_train_steps", "2")
    finally:
        os.umask(old_mask)
    for name in ("training_state.pt", "rng_rank0.pt"):  # no pickle: a shared folder cannot run code
        torch.load(tmp_path / "state" / name, weights_only=True)
    for path in [tmp_path / "args.json", tmp_path / "state" / "training_state.pt",
                 tmp_path / "checkpoint-2" / "pytorch_lora_weights.safetensors",
                 tmp_path / "checkpoint-2" / "lora" / "learner" / "adapter_model.safetensors"]:
        assert path.stat().st_mode & 0o777 == 0o644, path
    for path in (tmp_path / "state", tmp_path / "checkpoint-2", tmp_path / "checkpoint-2" / "lora" / "learner"):
        assert path.stat().st_mode & 0o777 == 0o755, path


def test_a_live_run_holds_its_folder(tiny_models, data, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / common.LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": __import__("socket")
                                                            .gethostname(), "what": "training run"}))
        argv = ["--pretrained_model", tiny_models["sd15"], "--pairs", data["train"], "--output_dir", tmp_path,
                *SMALL, "--train_batch_size", "2", "--effective_batch_size", "2", "--max_train_steps", "1"]
        expect_error(capsys, "dro", argv, f"in use by another run (pid {holder.pid} on host")
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is taken over
    run("dro", tmp_path, tiny_models["sd15"], data["train"], "--train_batch_size", "2", "--effective_batch_size",
        "2", "--max_train_steps", "1")
    assert json.loads((tmp_path / common.LOCK_FILE).read_text())["pid"] == os.getpid()
