"""The handles of diffusers' training examples (README "Trackers, the hub,
precision, more than one node"): trackers, model cards, the hub upload,
precision and checkpoint flags, run_all.sh's multi-node launch and DRY_RUN."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import train_dpo
import train_dro
from conftest import ROOT, make_pairs

SMALL = ["--resolution", "32", "--seed", "0", "--train_batch_size", "2", "--effective_batch_size", "2"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("data") / "train", n=6, seed=0)


def train(script, out, model, pairs_csv, *extra):
    argv = ["--pretrained_model", model, "--pairs", pairs_csv, "--output_dir", out, *SMALL, *extra]
    (train_dro if script == "dro" else train_dpo).main([str(a) for a in argv])
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def tensorboard_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def stage1(tiny_models, pairs, tmp_path_factory, request):
    """A Stage-1 run with TensorBoard (the default) that is interrupted after
    logging step 3 (its last saved state is step 2), then resumed with
    diffusers' `--resume_from_checkpoint latest` to step 4."""
    out = tmp_path_factory.mktemp("stage1")
    args = ["--max_train_steps", "4", "--checkpoint_every", "2", "--sample_grid_steps", "2", "--learning_rate", "1e-2"]
    trackers = []
    original_init, original_write = common.init_trackers, common.MetricsLog.write

    def init_and_keep(args_, accelerator, start_step):
        original_init(args_, accelerator, start_step)
        trackers[:] = accelerator.trackers

    def crash_at_step_4(self, record):
        if record["step"] == 4:  # steps 1-3 are logged, the state is at step 2
            for tracker in trackers:
                tracker.writer.flush()
            raise KeyboardInterrupt
        original_write(self, record)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "init_trackers", init_and_keep)
        patch.setattr(common.MetricsLog, "write", crash_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            train("dro", out, tiny_models["sd15"], pairs, *args)
    for tracker in trackers:
        tracker.finish()
    log = train("dro", out, tiny_models["sd15"], pairs, *args, "--resume_from_checkpoint", "latest")
    return out, log


# ------------------------------------------------------------------ 1. trackers
def test_tensorboard_scalars_match_metrics_jsonl_after_resume(stage1):
    out, log = stage1
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    events = tensorboard_events(out / "logs" / "realalign-stage1")
    for key in ("loss", "D", "model_err_real", "ref_err_policy", "grad_norm", "lr", "snapshot_refreshed"):
        scalars = events.Scalars(key)
        # once per step: the step 3 the interrupted run logged is purged, as in metrics.jsonl
        assert [e.step for e in scalars] == [1, 2, 3, 4], key
        for event, record in zip(scalars, log):
            # TensorBoard stores float32: 1e-6 relative is float32 rounding
            assert event.value == pytest.approx(record[key], rel=1e-6, abs=1e-30), key
    assert set(events.Tags()["scalars"]) >= set(log[0]) - {"step"}  # every metric of metrics.jsonl
    grids = events.Images("validation")  # the checkpoint grids, as drawn in grid.png (prompts and seeds labelled)
    from PIL import Image

    with Image.open(out / "checkpoint-4" / "grid.png") as grid:
        assert [(g.step, g.width, g.height) for g in grids] == [(2, *grid.size), (4, *grid.size)]


def expect_error(capsys, module, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        common.run_main(lambda: module.main([str(a) for a in argv]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err


def test_missing_tracker_or_bad_flag_stops_before_any_model_loads(tiny_models, pairs, tmp_path, capsys, monkeypatch):
    import accelerate.utils

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(common, "load_pipeline", no_loading)
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    base = ["--pretrained_model", tiny_models["sd15"], "--pairs", pairs, "--output_dir", tmp_path / "a"]
    expect_error(capsys, train_dro, [*base, "--report_to", "wandb"], "wandb is not installed")
    expect_error(capsys, train_dpo, base, "tensorboard is not installed")  # the default
    expect_error(capsys, train_dro, [*base, "--report_to", "none", "--checkpoints_total_limit", "0"],
                 "--checkpoints_total_limit: must be an integer >= 1")
    expect_error(capsys, train_dro, [*base, "--report_to", "none", "--hub_model_id", "me/x"], "--push_to_hub")
    assert not (tmp_path / "a").exists()


# -------------------------------------------------------- 2. model card, hub
def test_model_card_in_every_checkpoint(stage1, tiny_models, pairs):
    from huggingface_hub import ModelCard

    out, _ = stage1
    args = json.loads((out / "args.json").read_text())
    assert args["mixed_precision"] == "no"  # the CPU default
    # the default grid prompts: the first four distinct prompts of the pairs
    assert args["validation_prompts"] == [f"a photo of disc number {i}" for i in range(4)]
    for step in (2, 4):
        card = ModelCard.load(out / f"checkpoint-{step}" / "README.md")
        assert card.data.base_model == tiny_models["sd15"] and card.data.library_name == "diffusers"
        assert {"lora", "realalign", "diffusion-dro"} <= set(card.data.tags)
        text = card.text
        assert f"step {step}" in text and "Stage 1, Diffusion-DRO on real images" in text
        assert "**Warm start:** none" in text and f"`{pairs}`: 6 (real, inpainted) pairs" in text
        assert "![checkpoint grid](./grid.png)" in text and (out / f"checkpoint-{step}" / "grid.png").is_file()
        assert f'pipe.load_lora_weights("{(out / f"checkpoint-{step}").resolve()}")' in text
        for key, value in args.items():  # every hyperparameter, with its value
            assert f"| {key} | `" in text, key
        assert "| learning_rate | `0.01` |" in text and "TODO" not in text


def test_push_to_hub_uploads_the_final_checkpoint(stage1, tiny_models, pairs, tmp_path, monkeypatch):
    """Stage 2 from the Stage-1 LoRA with --push_to_hub; huggingface_hub's
    create_repo / upload_folder are replaced by a local stand-in of the hub.
    Also: --checkpoints_total_limit keeps --final_checkpoint, and
    --validation_prompts sets the grid's columns."""
    import huggingface_hub
    from huggingface_hub import ModelCard

    hub = tmp_path / "hub"
    calls = []

    def create_repo(repo_id, exist_ok=False, token=None, **kwargs):
        calls.append(("create_repo", repo_id, token))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(repo_id, folder_path, token=None, commit_message=None, **kwargs):
        calls.append(("upload_folder", repo_id, token))
        shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True)

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    out = tmp_path / "stage2"
    init = stage1[0] / "checkpoint-4"
    train("dpo", out, tiny_models["sd15"], pairs, "--max_train_steps", "4", "--checkpoint_every", "1",
          "--sample_grid_steps", "2", "--init_lora", init, "--report_to", "none",
          "--checkpoints_total_limit", "2", "--final_checkpoint", "2",
          "--validation_prompts", "a red disc", "a blue disc",
          "--push_to_hub", "--hub_model_id", "me/realalign-test", "--hub_token", "hf_secret_token")
    assert calls == [("create_repo", "me/realalign-test", "hf_secret_token"),
                     ("upload_folder", "me/realalign-test", "hf_secret_token")]
    # checkpoint 1 deleted; 2 kept as the final one; the newest two kept
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    uploaded = hub / "me" / "realalign-test"
    assert sorted(p.relative_to(uploaded).as_posix() for p in uploaded.rglob("*") if p.is_file()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "grid.png", "lora/learner/adapter_config.json",
        "lora/learner/adapter_model.safetensors", "pytorch_lora_weights.safetensors"]
    assert (uploaded / "pytorch_lora_weights.safetensors").read_bytes() == \
        (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").read_bytes()
    assert (uploaded / "grid.png").read_bytes() == (out / "checkpoint-2" / "grid.png").read_bytes()
    card = ModelCard.load(uploaded / "README.md")
    assert 'pipe.load_lora_weights("me/realalign-test")' in card.text and "step 2" in card.text
    assert f"**Warm start:** `{init}`" in card.text and "diffusion-dpo" in card.data.tags
    assert '"a red disc"; "a blue disc"' in card.text
    # the token is written nowhere
    for path in [*out.rglob("*"), *uploaded.rglob("*")]:
        if path.is_file():
            assert b"hf_secret_token" not in path.read_bytes(), path


# ----------------------------------------------------------------- 3. flags
def test_diffusers_flag_names_are_aliases():
    args = train_dro.parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", "o",
                                 "--checkpointing_steps", "7", "--resume_from_checkpoint", "latest"])
    assert (args.pretrained_model, args.checkpoint_every, args.resume) == ("m", 7, True)
    args = train_dpo.parse_args(["--output_dir", "o"])
    assert (args.resume, args.report_to, args.mixed_precision, args.allow_tf32) == (False, "tensorboard", None, True)
    with pytest.raises(SystemExit):  # OUTPUT_DIR/state is the only state there is: 'latest' is the only value
        train_dro.parse_args(["--output_dir", "o", "--resume_from_checkpoint", "checkpoint-100"])


def test_checkpoint_limit_keeps_the_newest_and_the_final_one(tmp_path):
    for step in (2, 4, 6, 8, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "state").mkdir()
    args = argparse_namespace(output_dir=str(tmp_path), checkpoints_total_limit=2, final_checkpoint=4)
    common.prune_checkpoints(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-4", "checkpoint-8", "state"]


def argparse_namespace(**kwargs):
    import argparse

    return argparse.Namespace(**kwargs)


def test_final_checkpoint_must_be_a_checkpoint_step(tiny_models, pairs, tmp_path, capsys):
    expect_error(capsys, train_dro, ["--pretrained_model", tiny_models["sd15"], "--pairs", pairs, "--output_dir",
                                     tmp_path, *SMALL, "--report_to", "none", "--max_train_steps", "4",
                                     "--checkpoint_every", "2", "--final_checkpoint", "3"],
                 "--final_checkpoint 3 is not a step that gets a checkpoint")


def test_fp16_trains_with_a_gradient_scaler_and_resumes_its_scale(tiny_models, pairs, tmp_path):
    """fp16 autocast on CPU (subprocesses: accelerate's precision is fixed per
    process). Overflowing steps are skipped and halve the scale; the weights
    stay finite; --resume goes on with the saved scale (it restarted at 65536)."""
    out = tmp_path / "fp16"
    cmd = [sys.executable, str(ROOT / "train_dpo.py"), "--pretrained_model", tiny_models["sd15"], "--pairs",
           str(pairs), "--output_dir", str(out), *SMALL, "--checkpoint_every", "2", "--sample_grid_steps", "0",
           "--report_to", "none", "--mixed_precision", "fp16", "--learning_rate", "1e-3"]
    for more in (["--max_train_steps", "2"], ["--max_train_steps", "3", "--resume"]):
        result = subprocess.run(cmd + more, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and log[1]["grad_scale"] < 65536.0  # an overflow before the stop
    scale = 65536.0  # GradScaler's initial scale
    for record in log:
        if not math.isfinite(record["grad_norm"]):
            scale /= 2  # an overflow: the step is skipped and the scale halved
        assert record["grad_scale"] == scale
        assert math.isfinite(record["loss"])
    state = torch.load(out / "state" / "training_state.pt", weights_only=False)
    assert state["grad_scaler"]["scale"] == log[-1]["grad_scale"]
    assert all(torch.isfinite(p).all() for p in state["roles"]["learner"])
    assert json.loads((out / "args.json").read_text())["mixed_precision"] == "fp16"


# ----------------------------------------------------------- 4. more nodes
def test_dry_run_prints_the_multi_node_launch(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "NUM_GPUS": "8", "NUM_MACHINES": "2", "MACHINE_RANK": "1",
           "MAIN_PROCESS_IP": "10.1.2.3", "MAIN_PROCESS_PORT": "29600", "HUB_MODEL_ID": "me/realalign",
           "OUTPUT_DIR": str(out), "CHECKPOINTS_TOTAL_LIMIT": "3"}
    env.pop("SMOKE", None)
    env.pop("HF_HUB_OFFLINE", None)  # the hub check would run (and fail here) without DRY_RUN
    result = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    launch = ("accelerate launch --num_processes 16 --mixed_precision bf16 --num_machines 2 --dynamo_backend no "
              "--machine_rank 1 --main_process_ip 10.1.2.3 --main_process_port 29600")
    lines = {line.split(" (dry run): ")[0].removeprefix("[run_all] "): line.split(" (dry run): ")[1]
             for line in result.stdout.splitlines() if " (dry run): " in line}
    for name, script in (("curate", "curate.py"), ("stage1", "train_dro.py"), ("stage2", "train_dpo.py"),
                         ("eval", "evaluate.py")):
        assert lines[name].startswith(f"{launch} {script} "), lines.get(name)
    assert "--final_checkpoint 1600" in lines["stage1"] and "--checkpoints_total_limit 3" in lines["stage1"]
    assert "--final_checkpoint 800 --push_to_hub --hub_model_id me/realalign" in lines["stage2"]
    assert "--push_to_hub" not in lines["stage1"]
    assert not out.exists()  # a dry run writes nothing
    env.pop("MAIN_PROCESS_IP")
    result = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0 and "needs MAIN_PROCESS_IP" in result.stderr


@pytest.mark.multiprocess
def test_training_across_two_nodes_on_localhost(tiny_models, pairs, tmp_path, tmp_path_factory):
    """torchrun --nnodes 2, one process per "node", both on this machine and
    one shared output folder (as a shared filesystem would be)."""
    with socket.socket() as probe:  # a free port (a fixed one may be taken by another run on the machine)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logs_dir, processes = tmp_path_factory.mktemp("logs"), []
    logs = [logs_dir / f"node{node_rank}.log" for node_rank in (0, 1)]
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(ROOT / "train_dro.py"), "--pretrained_model", tiny_models["sd15"], "--pairs", str(pairs),
               "--output_dir", str(tmp_path), "--resolution", "32", "--train_batch_size", "1",
               "--effective_batch_size", "4", "--max_train_steps", "2", "--checkpoint_every", "2",
               "--sample_grid_steps", "0"]
        # each node's output to its own file: pipes read one after the other can fill up and stall a node
        with open(logs[node_rank], "w") as log_file:
            processes.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                              env={**os.environ, "OMP_NUM_THREADS": "1"}))
    for process, log_path in zip(processes, logs):
        assert process.wait(timeout=400) == 0, log_path.read_text()[-3000:]
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["num_processes"] == 2 and args["gradient_accumulation_steps"] == 2  # 1 x 2 nodes x 2 = 4
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    # each node wrote its own random state into the shared folder (every draw of training comes from the
    # per-micro-batch generators, so these are the global RNGs, seeded alike on every process)
    for rank in (0, 1):
        assert "torch" in torch.load(tmp_path / "state" / f"rng_rank{rank}.pt", weights_only=True)
    assert torch.load(tmp_path / "state" / "training_state.pt", weights_only=False)["num_processes"] == 2
    # one TensorBoard run: only the main process of node 0 logs
    event_files = list((tmp_path / "logs" / "realalign-stage1").glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    assert [e.step for e in tensorboard_events(tmp_path / "logs" / "realalign-stage1").Scalars("loss")] == [1, 2]
