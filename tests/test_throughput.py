"""Tests of the throughput work (README "Throughput and memory"): the compile
flag, host-sync-free loss stats, the FLOP counter, the faithful baseline of
tests/benchmark.py and the sharded bf16 input cache."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import common
import train_dpo
import train_dro
from conftest import ROOT, make_pairs

sys.path.insert(0, str(ROOT / "tests"))
import benchmark  # noqa: E402


@pytest.fixture(scope="module")
def backbones(tiny_models):
    return {kind: common.Backbone(common.load_pipeline(tiny_models[kind]), "cpu") for kind in ("sd15", "sd3")}


# ------------------------------------------------------------ sync removal
def test_loss_stats_are_detached_tensors_without_host_sync():
    err = torch.tensor([0.5, 0.0005, 0.2, 0.0001], requires_grad=True)
    # model_err_policy / model_err_l = 2 err, refs = err: D = inner = -err
    _, dpo_stats = common.diffusion_dpo_loss(err, err * 2, err.detach(), err.detach(), beta=10.0)
    _, dro_stats = common.diffusion_dro_loss(err, err * 2, err.detach(), err.detach())
    for value in {**dpo_stats, **dro_stats}.values():
        assert isinstance(value, torch.Tensor) and value.ndim == 0 and not value.requires_grad
    assert float(dro_stats["active_frac"]) == 0.5  # D + 0.001 > 0 only for err < 0.001
    assert float(dro_stats["D"]) == pytest.approx(-0.17515, abs=1e-6)
    assert float(dpo_stats["implicit_acc"]) == 1.0 and float(dpo_stats["reward_margin"]) == pytest.approx(0.17515)


def test_use_role_flips_the_active_adapter_only(backbones, monkeypatch):
    """A role switch sets each LoRA layer's active adapter and nothing else:
    peft's set_adapter, which also walks every adapter's parameters to reset
    requires_grad (6-60 ms of host time per switch on the full networks,
    `benchmark.py --proxies`), is never called; the layers are looked up once;
    only the learner's parameters require gradients, whatever role is active."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    net = copy.deepcopy(backbones["sd15"].net)
    bb = copy.copy(backbones["sd15"])
    bb.net = net
    common.setup_lora_roles(bb, [common.LEARNER, common.REF, common.POLICY], rank=2, alpha=2)
    monkeypatch.setattr(BaseTunerLayer, "set_adapter", lambda *a, **k: pytest.fail("set_adapter was called"))
    common.use_role(net, common.REF)
    layers = common._ROLE_LOOKUP[net][1]
    assert layers and all(layer.active_adapters == [common.REF] for layer in layers)
    common.use_role(net, common.POLICY)
    assert common._ROLE_LOOKUP[net][1] is layers  # looked up once, not per call
    assert all(layer.active_adapters == [common.POLICY] for layer in layers)
    assert all(p.requires_grad for p in common.role_parameters(net, common.LEARNER))
    assert not any(p.requires_grad for role in (common.REF, common.POLICY) for p in common.role_parameters(net, role))


def test_frozen_roles_hold_the_compute_dtype_and_give_the_learners_outputs(tiny_models):
    """In bf16 (a GPU's --mixed_precision), the learner's LoRA weights stay
    fp32 master weights and the frozen roles are held in bf16: the values
    autocast would cast them to at every call, so no cast runs per call, and
    no layer casts its input to the LoRA's dtype. Nothing changes in the
    mathematics: under bf16 autocast a frozen copy of the learner gives the
    learner's outputs bit for bit (so learner - reference errors start at
    exactly 0, as before)."""
    bb = common.Backbone(common.load_pipeline(tiny_models["sd3"], dtype=torch.bfloat16), "cpu", torch.bfloat16)
    common.setup_lora_roles(bb, [common.LEARNER, common.REF, common.POLICY], rank=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in common.role_parameters(bb.net, common.LEARNER):  # a learner with non-zero LoRA deltas
            p.add_(0.05 * torch.randn_like(p))
    common.copy_role(bb.net, common.LEARNER, common.POLICY)
    assert {p.dtype for p in common.role_parameters(bb.net, common.LEARNER)} == {torch.float32}
    assert {p.dtype for role in (common.REF, common.POLICY)
            for p in common.role_parameters(bb.net, role)} == {torch.bfloat16}
    assert not any(layer.cast_input_dtype_enabled for layer in common._tuner_layers(bb.net))
    x0, cond = common.random_inputs(bb, 2, 32, torch.Generator().manual_seed(0), ["real"])
    t = bb.sample_timesteps(2, torch.Generator().manual_seed(1))
    outputs = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for role in (common.LEARNER, common.POLICY, common.REF):
            common.use_role(bb.net, role)
            outputs[role] = bb.predict(bb.net, x0["real"], t, cond)
    assert torch.equal(outputs[common.LEARNER], outputs[common.POLICY])
    assert not torch.equal(outputs[common.LEARNER], outputs[common.REF])  # the LoRA counts


def test_ema_update_is_one_multi_tensor_op():
    """The EMA of the learner's LoRA (hundreds of tensors) is one fused
    _foreach_lerp_ per update, not a Python loop of two ops per tensor."""
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(50)]
    ema = common.LoraEMA(params, update_every=1)
    with benchmark.OpCounter() as counter:
        ema.step(params, 1)
        ema.step(params, 2)
    assert counter.count == 2


# ------------------------------------------------------------ torch.compile
def test_compile_flag_defaults_off_on_cpu_and_parses():
    assert train_dro.parse_args(["--output_dir", "x"]).compile is None  # resolved by prepare_training
    assert train_dpo.parse_args(["--output_dir", "x", "--compile"]).compile is True
    assert train_dpo.parse_args(["--output_dir", "x", "--no-compile"]).compile is False


def test_compile_default_resolves_off_on_cpu_and_training_runs(tiny_models, tmp_path):
    out = tmp_path / "run"
    train_dpo.main(["--pretrained_model", tiny_models["sd15"], "--output_dir", str(out), "--resolution", "32",
                    "--benchmark_steps", "1", "--train_batch_size", "1", "--effective_batch_size", "1"])
    assert json.loads((out / "args.json").read_text())["compile"] is False


def test_role_switch_compiles_each_role_once(backbones):
    """Compiled network: learner / ref / policy switches inside a micro-batch
    compile one graph per (role, shape, grad mode) at first use; the next
    micro-batches reuse them (no recompile per micro-batch)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    bb = copy.copy(backbones["sd15"])
    bb.net = copy.deepcopy(bb.net)
    common.setup_lora_roles(bb, [common.LEARNER, common.REF, common.POLICY], rank=2, alpha=2)
    counter = CompileCounter()
    common.compile_network(bb.net, backend=counter)
    g = torch.Generator().manual_seed(0)

    def micro_batch():
        x0, cond = common.random_inputs(bb, 2, 32, g, ["real"])
        t = bb.sample_timesteps(2, g)
        common.use_role(bb.net, common.POLICY)
        with torch.no_grad():
            bb.predict(bb.net, x0["real"], t, cond)
        model_err, _ = common.learner_and_ref_errors(bb, x0["real"], t, cond, x0["real"])
        model_err.sum().backward()

    micro_batch()
    compiled = counter.frame_count
    assert compiled >= 3  # at least one graph per role
    for _ in range(2):
        micro_batch()
    assert counter.frame_count == compiled
    torch._dynamo.reset()


def test_compiled_graphs_stop_growing_after_the_first_step(tiny_models):
    """Stage 1, compiled repeated blocks (counted with dynamo's CompileCounter):
    every network call has a fixed shape (the sampler's slots, the learner's
    and reference's 2 x batch), so the graphs are all built in the first
    step and no later step, new snapshot window or refresh adds one."""
    per_step = benchmark.proxy_compiled_graphs(tiny_models["sd15"], "dro", steps=3, batch=2)
    assert per_step[0] >= 3 and per_step == [per_step[0]] * 3, per_step


@pytest.mark.parametrize("stage", ["dro", "dpo"])
def test_no_host_sync_inside_a_micro_batch(stage, tiny_models):
    """The host never waits for the device inside a micro-batch (sampler,
    forwards, loss: every device tensor on the meta device, where a read has
    no value and is counted); the optimizer step reads its log once."""
    syncs = benchmark.proxy_host_syncs(tiny_models["sd15"], stage, steps=1, batch=1)
    assert syncs == {"per_micro_batch": 0, "per_step": 1}
    with benchmark.HostSyncCounter() as counter:  # the instrument counts a read
        float(torch.ones(2, device="meta").sum())
    assert counter.count == 1


# ------------------------------------------------------------ FLOP counting
def test_flop_counter_counts_what_autograd_runs():
    """Hand count for one linear layer y = x W^T, x [4, 8], W [16, 8]: the
    forward is 2*4*8*16 = 1024 FLOPs; the backward to the input another 1024;
    the weight gradient another 1024, but only when W trains (a frozen base
    skips it, which is why our counts run a real backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    layer = torch.nn.Linear(8, 16, bias=False)
    x = torch.randn(4, 8, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == 3 * 1024
    layer.requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == 2 * 1024


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_network_flops_scale_with_the_batch(kind, tiny_models):
    one = benchmark.network_flops(tiny_models[kind], 32, 1)
    two = benchmark.network_flops(tiny_models[kind], 32, 2)
    assert one["forward"] > 0 and one["train"] > one["forward"]
    assert two == {"forward": 2 * one["forward"], "train": 2 * one["train"]}  # linear in the batch
    # a step: the sampler's rows, then reference forward + learner train over 2 x batch rows
    assert benchmark.step_flops(tiny_models[kind], 32, 2, 6) == 6 * one["forward"] + 4 * (one["forward"] + one["train"])


def test_mfu_peaks_by_device_name():
    assert benchmark.device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert benchmark.device_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert benchmark.device_peak_flops("NVIDIA H200") == 989e12
    assert benchmark.device_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert benchmark.device_peak_flops("cpu") is None


# ------------------------------------------------- the faithful baseline
@pytest.mark.parametrize("kind,stage", [("sd15", "dro"), ("sd15", "dpo"), ("sd3", "dro"), ("sd3", "dpo")])
def test_baseline_computes_the_same_losses_as_ours(kind, stage, tiny_models):
    """On shared inputs (latents, noise, timesteps, policy points, and the
    learner's LoRA weights), the baseline's networks and concatenated forwards
    give the loss, the stats and the LoRA gradients of ours. Both run in fp32
    on the CPU over the same weights and shapes, so only summation order can
    differ: rtol 1e-5 is ~100x float32 rounding over these small sums."""
    defaults = common.BACKBONE_DEFAULTS[kind]
    bb = common.Backbone(common.load_pipeline(tiny_models[kind]), "cpu")
    common.setup_lora_roles(bb, [common.LEARNER, common.REF], defaults["lora_rank"], defaults["lora_alpha"])
    learner = common.role_parameters(bb.net, common.LEARNER)
    torch.manual_seed(1)
    with torch.no_grad():  # a learner that has moved away from the reference
        for p in learner:
            p.add_(0.05 * torch.randn_like(p))
    base = benchmark.Baseline(tiny_models[kind], stage, "cpu")
    base_params = base.networks()
    assert len(base_params) == len(learner)  # only the learner's LoRA trains
    with torch.no_grad():
        for p_base, p_ours in zip(base_params, learner, strict=True):
            p_base.copy_(p_ours)
    if kind == "sd15":  # separate full copies of the UNet in the public SD-1.5 code
        assert base.reference is not base.trainable
        assert (base.snapshot is not None) == (stage == "dro")
    else:  # one transformer with adapters
        assert base.reference is base.trainable and set(base.trainable.peft_config) == {"learner", "ref"}

    g = torch.Generator().manual_seed(0)
    n = 2
    x0, cond = common.random_inputs(bb, n, 32, g, ["real", "fake"])
    noise = torch.randn(x0["real"].shape, generator=g)
    t = bb.sample_timesteps(n, g)
    if stage == "dpo":
        x_t = torch.cat([bb.add_noise(x0["real"], noise, t), bb.add_noise(x0["fake"], noise, t)])
        target = torch.cat([bb.target(x0["real"], noise), bb.target(x0["fake"], noise)])
    else:  # a policy point (x_t, its target) shared by both sides
        x_t = torch.cat([bb.add_noise(x0["real"], noise, t), torch.randn(x0["real"].shape, generator=g)])
        target = torch.cat([bb.target(x0["real"], noise), torch.randn(x0["real"].shape, generator=g)])
    t2, cond2 = torch.cat([t, t]), common.cat_cond(cond, cond)
    beta = 100.0

    model_err, ref_err = common.learner_and_ref_errors(bb, x_t, t2, cond2, target)
    if stage == "dpo":
        ours, ours_stats = common.diffusion_dpo_loss(model_err[:n], model_err[n:], ref_err[:n], ref_err[n:], beta)
    else:
        ours, ours_stats = common.diffusion_dro_loss(model_err[:n], model_err[n:], ref_err[:n], ref_err[n:])
    theirs, their_stats = base.loss(x_t, t2, cond2, target, n, beta=beta)
    assert float(ours) > 0
    assert float(theirs) == pytest.approx(float(ours), rel=1e-5)
    for key in ours_stats:
        assert float(their_stats[key]) == pytest.approx(float(ours_stats[key]), rel=1e-5, abs=1e-9)
    ours.backward()
    theirs.backward()
    for p_base, p_ours in zip(base_params, learner, strict=True):
        torch.testing.assert_close(p_base.grad, p_ours.grad, rtol=1e-4, atol=1e-9)


# ------------------------------------------------------------- input cache
BUILD_CACHE = """
import sys
sys.path.insert(0, {root!r})
import json, common
from accelerate import Accelerator
accelerator = Accelerator(cpu=True)
bb = common.Backbone(common.load_pipeline({model!r}), accelerator.device)
pairs = common.read_pairs_csv({csv!r})
cache = common.load_or_build_cache(bb, "tiny", {csv!r}, pairs, 32, {cache_dir!r}, True, accelerator)
print("RESULT", json.dumps({{"rank": accelerator.process_index, "processes": accelerator.num_processes,
                            "rows": len(cache["prompt_index"])}}), flush=True)
"""


def test_cache_built_sharded_over_two_processes_equals_one_process_build(tiny_models, tmp_path):
    csv_path = make_pairs(tmp_path / "data", n=5)
    pairs = common.read_pairs_csv(csv_path)
    bb = common.Backbone(common.load_pipeline(tiny_models["sd3"]), "cpu")
    state = type("S", (), {"is_main_process": True, "wait_for_everyone": lambda self: None})()
    single = common.load_or_build_cache(bb, "tiny", csv_path, pairs, 32, tmp_path / "one", True, state)
    script = tmp_path / "build_cache.py"
    script.write_text(BUILD_CACHE.format(root=str(ROOT), model=tiny_models["sd3"], csv=str(csv_path),
                                         cache_dir=str(tmp_path / "two")))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29531", str(script)], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line.split("RESULT ", 1)[1]) for line in result.stdout.splitlines() if "RESULT " in line]
    assert sorted(r["rank"] for r in reports) == [0, 1] and all(r["processes"] == 2 for r in reports)
    assert all(r["rows"] == 5 for r in reports)  # every process reads the whole cache
    (folder,) = (tmp_path / "two").iterdir()
    shards = sorted(path.name for path in folder.glob("shard-*"))
    assert shards == ["shard-000-of-002.safetensors", "shard-001-of-002.safetensors"]
    from safetensors.torch import load_file

    for name in shards:  # both processes encoded images and prompts
        shard = load_file(str(folder / name))
        assert len(shard["real_mean"]) in (2, 3) and len(shard["prompt_embeds"]) == 3  # 5 rows, 6 prompts
    sharded = common.read_input_cache(folder)
    assert set(sharded) == set(single)
    assert torch.equal(sharded["prompt_index"], single["prompt_index"])
    for key in single:  # bf16 values; the encoders saw other batch compositions: one bf16 ulp (2^-7 relative)
        assert sharded[key].dtype == single[key].dtype
        torch.testing.assert_close(sharded[key].float(), single[key].float(), rtol=2**-7, atol=1e-5)
