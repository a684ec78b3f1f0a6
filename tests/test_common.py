"""Tests of common.py: losses, backbone maths, LoRA roles, EMA, input cache."""
import math
import os

import pytest
import torch

import common
from conftest import make_pairs


# ---------------------------------------------------------------- losses
def test_per_sample_mse_is_float32_mean_over_non_batch_dims():
    pred = torch.arange(24, dtype=torch.bfloat16).view(2, 3, 2, 2)
    target = torch.zeros(2, 3, 2, 2, dtype=torch.bfloat16)
    err = common.per_sample_mse(pred, target)
    assert err.dtype == torch.float32 and err.shape == (2,)
    expected = [sum(v * v for v in range(12)) / 12, sum(v * v for v in range(12, 24)) / 12]
    assert err.tolist() == pytest.approx(expected)


def test_dpo_loss_hand_computed():
    model_w, model_l = torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.1])
    ref_w, ref_l = torch.tensor([0.2, 0.2]), torch.tensor([0.2, 0.2])
    loss, stats = common.diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=10.0)
    # inner = (m_w - r_w) - (m_l - r_l) = [-0.1, 0.2]; loss = mean(log(1 + exp(beta/2 * inner)))
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["implicit_acc"] == 0.5  # only the first pair has inner < 0
    assert stats["reward_margin"] == pytest.approx(-0.05, abs=1e-7)


def test_dro_loss_hand_computed():
    model_real, model_policy = torch.tensor([0.5, 0.2]), torch.tensor([0.3, 0.4])
    ref_real, ref_policy = torch.tensor([0.4, 0.4]), torch.tensor([0.3, 0.3])
    loss, stats = common.diffusion_dro_loss(model_real, model_policy, ref_real, ref_policy, margin=0.001)
    # D = [0.1 - 0.0, -0.2 - 0.1] = [0.1, -0.3]; hinge = [0.101, 0]
    assert loss.item() == pytest.approx(0.0505, rel=1e-6)
    assert stats["D"] == pytest.approx(-0.1, abs=1e-7)
    assert stats["active_frac"] == 0.5


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_losses_match_formulas_on_random_inputs(batch):
    g = torch.Generator().manual_seed(batch)
    errs = [torch.rand(batch, generator=g, dtype=torch.float64) for _ in range(4)]
    loss, _ = common.diffusion_dpo_loss(*[e.float() for e in errs], beta=2000.0)
    inner = (errs[0] - errs[2]) - (errs[1] - errs[3])
    expected = torch.log1p(torch.exp(1000.0 * inner.clamp(max=0.5))).where(inner < 0.5, 1000.0 * inner).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)
    loss, _ = common.diffusion_dro_loss(*[e.float() for e in errs], margin=0.001)
    D = (errs[0] - errs[2]) - (errs[1] - errs[3])
    assert loss.item() == pytest.approx(torch.clamp(D + 0.001, min=0).mean().item(), rel=1e-5, abs=1e-7)


def test_loss_gradients_point_the_right_way():
    # DPO: lowering the winner's error (or raising the loser's) lowers the loss
    model_w, model_l = torch.tensor([0.3], requires_grad=True), torch.tensor([0.3], requires_grad=True)
    loss, _ = common.diffusion_dpo_loss(model_w, model_l, torch.tensor([0.3]), torch.tensor([0.3]), beta=100.0)
    loss.backward()
    assert model_w.grad.item() > 0 and model_l.grad.item() < 0
    # DRO: lowering the error on real images (raising it on own samples) lowers the loss
    real, policy = torch.tensor([0.3], requires_grad=True), torch.tensor([0.3], requires_grad=True)
    loss, _ = common.diffusion_dro_loss(real, policy, torch.tensor([0.3]), torch.tensor([0.3]))
    loss.backward()
    assert real.grad.item() > 0 and policy.grad.item() < 0


# ---------------------------------------------------------------- backbone
@pytest.fixture(scope="module")
def backbones(tiny_models):
    return {kind: common.Backbone(common.load_pipeline(tiny_models[kind]), "cpu") for kind in ("sd15", "sd3")}


def test_kind_detected_from_pipeline(backbones):
    assert backbones["sd15"].kind == "sd15" and not backbones["sd15"].is_flow
    assert backbones["sd3"].kind == "sd3" and backbones["sd3"].is_flow


def test_sd3_noisy_input_and_velocity_target(backbones):
    bb = backbones["sd3"]
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.0, 250.0, 1000.0])
    x_t = bb.add_noise(x0, noise, t)
    for i, sigma in enumerate([0.0, 0.25, 1.0]):
        assert torch.allclose(x_t[i], (1 - sigma) * x0[i] + sigma * noise[i], atol=1e-6)
    assert torch.equal(bb.target(x0, noise), noise - x0)


def test_sd15_add_noise_matches_ddpm_scheduler(backbones):
    from diffusers import DDPMScheduler

    bb = backbones["sd15"]
    scheduler = DDPMScheduler.from_config(bb.pipe.scheduler.config)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(bb.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t), atol=1e-6)
    assert torch.equal(bb.target(x0, noise), noise)


def test_timestep_sampling_stays_inside_the_schedule(backbones):
    g = torch.Generator().manual_seed(0)
    t15 = backbones["sd15"].sample_timesteps(4000, g)
    assert t15.dtype == torch.long and t15.min() >= 0 and t15.max() <= 999 and len(t15.unique()) > 900
    t3 = backbones["sd3"].sample_timesteps(4000, g)
    assert t3.is_floating_point() and t3.min() > 0 and t3.max() < 1000
    # shift 3 pushes the logit-normal median (sigma 0.5) to 3*0.5/(1+2*0.5) = 0.75
    assert t3.median().item() == pytest.approx(750, abs=25)


def test_latents_from_posterior_apply_shift_and_scale(backbones):
    bb = backbones["sd3"]
    mean, std = torch.full((1, 4, 2, 2), 0.5), torch.zeros(1, 4, 2, 2)
    expected = (0.5 - 0.0609) * 1.5305
    assert torch.allclose(bb.latents_from_posterior(mean, std), torch.full_like(mean, expected))


class RowCounter:
    """Counts the network calls and the batch rows they evaluate (forward pre-hook)."""

    def __init__(self, net):
        self.rows, self.calls = 0, 0
        self.handle = net.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.rows += (args[0] if args else kwargs["hidden_states"]).shape[0]
        self.calls += 1

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("kind,K", [("sd15", 1), ("sd3", 1), ("sd15", 2), ("sd3", 2)])
def test_policy_sampler_matches_the_reference_point_by_point(kind, K, backbones):
    """Three micro-batches' trajectories (7) run through 3 fixed slots, so
    finished trajectories are replaced mid-run by the next ones, across
    micro-batches: every point (x_t, t, prediction) equals the plain
    one-trajectory-at-a-time reference of tests/reference_sampler.py (SD-1.5:
    diffusers' DPM-Solver++ on each sample's offset grid; SD-3: diffusers'
    Euler on each sample's stops). Batched and one-row fp32 forwards differ
    by float rounding only (~1e-6 here): atol 1e-4. Every call evaluates
    exactly 3 rows (static shapes), and only the window's end idles slots."""
    from reference_sampler import reference_points

    bb = backbones[kind]
    num_steps = 10 if kind == "sd3" else 20
    batches = [(["a cat", "a dog"], 11), (["a tree", "a red ball", "a sky"], 12), (["a boat", "a hat"], 13)]
    requests = [bb.policy_request(bb.encode_prompts(prompts), 32, num_steps, torch.Generator().manual_seed(seed), K)
                for prompts, seed in batches]
    sampler = common.PolicySampler(bb, bb.net, slots=3)
    sampler.start(requests, lambda request: request)  # training draws them lazily, as slots free up
    counter = RowCounter(bb.net)
    assert [sampler.next() for _ in requests] == requests
    counter.remove()
    for request, (prompts, seed) in zip(requests, batches):
        x, t, prediction = request.points()
        expected = reference_points(bb, bb.net, bb.encode_prompts(prompts), 32, num_steps,
                                    torch.Generator().manual_seed(seed), K)
        assert len(expected) == len(prompts) * K == len(t)
        for i, (x_ref, t_ref, prediction_ref) in enumerate(expected):
            assert float(t[i]) == float(t_ref)
            torch.testing.assert_close(x[i], x_ref, atol=1e-4, rtol=0)
            torch.testing.assert_close(prediction[i], prediction_ref, atol=1e-4, rtol=0)
    assert sampler.idle()
    assert counter.rows == 3 * counter.calls
    stops = [len(s) for request in requests for s in request.stops]
    assert len(set(stops)) > 1  # trajectories of different lengths
    # each trajectory's stops run once; the idle slot-calls are at the window's end only
    assert sum(stops) <= counter.rows < sum(stops) + 3 * max(stops)


def policy_points(bb, cond, num_steps, generator, K=1):
    """One micro-batch's policy points: its request run in one slot per trajectory."""
    sampler = common.PolicySampler(bb, bb.net, cond["prompt_embeds"].shape[0])
    sampler.start([bb.policy_request(cond, 32, num_steps, generator, K)], lambda request: request)
    return sampler.next().points()


def test_one_micro_batch_policy_points_are_truncated_and_land_on_their_timesteps(backbones):
    """One micro-batch in one slot per trajectory:
    SD-1.5 points lie on their offset grid; SD-3 points land exactly on
    their drawn logit-normal t, from the scheduler's 1000-step table; each
    trajectory stops at its point."""
    for kind, num_steps in (("sd15", 20), ("sd3", 10)):
        bb = backbones[kind]
        counter = RowCounter(bb.net)
        x, t, prediction = policy_points(bb, bb.encode_prompts(["a", "b", "c", "d"]), num_steps,
                                         torch.Generator().manual_seed(3))
        counter.remove()
        assert x.shape[0] == t.shape[0] == prediction.shape[0] == 4
        if kind == "sd3":
            assert all(float(v) in bb.train_timesteps.tolist() for v in t)
        else:  # t = offset + 50 (19 - k), offset in [0, 50)
            assert t.dtype == torch.long and bool(((t >= 0) & (t < 1000)).all())
        assert counter.calls < num_steps + 4  # truncated: about half the steps, not all of them


def test_several_points_per_trajectory(backbones):
    """--points_per_trajectory K: K distinct grid steps of each trajectory."""
    for kind, num_steps in (("sd3", 4), ("sd15", 4)):
        bb = backbones[kind]
        cond = bb.encode_prompts(["a", "b", "c"])
        x, t, pred = policy_points(bb, cond, num_steps, torch.Generator().manual_seed(0), K=num_steps)
        assert x.shape[0] == t.shape[0] == pred.shape[0] == 3 * num_steps
        for trajectory in t.view(3, num_steps):
            assert len(trajectory.unique()) == num_steps  # every step of the trajectory, once each
        # the trajectory's first step (the highest t) starts from pure noise: its x is that noise
        first = t.view(3, num_steps).argmax(dim=1) + torch.arange(3) * num_steps
        assert x[first].std().item() == pytest.approx(1.0, abs=0.15)


# ---------------------------------------------------------------- LoRA roles
@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_lora_roles_and_checkpoint_round_trip(kind, tiny_models, tmp_path):
    bb = common.Backbone(common.load_pipeline(tiny_models[kind]), "cpu")
    roles = [common.LEARNER, common.REF, common.POLICY]
    config = common.setup_lora_roles(bb, roles, rank=4, alpha=8)
    cond = bb.encode_prompts(["a cat", "a dog"])
    x, t = torch.randn(2, 4, 16, 16), bb.sample_timesteps(2, torch.Generator().manual_seed(0))

    def output(role):
        common.use_role(bb.net, role)
        return bb.predict(bb.net, x, t, cond).detach()

    start = output(common.LEARNER)
    assert torch.equal(start, output(common.REF))
    params = common.role_parameters(bb.net, common.LEARNER)
    assert [p for p in bb.net.parameters() if p.requires_grad] == params  # only the learner trains
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        common.use_role(bb.net, common.LEARNER)
        bb.predict(bb.net, x, t, cond).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = output(common.LEARNER)
    assert (trained - start).abs().max() > 1e-3
    assert torch.equal(output(common.REF), start) and torch.equal(output(common.POLICY), start)
    common.copy_role(bb.net, common.LEARNER, common.POLICY)
    assert torch.equal(output(common.POLICY), trained)

    common.save_lora_checkpoint(bb, common.lora_state_dict(bb.net, common.LEARNER), config, tmp_path)
    stock = common.load_pipeline(tiny_models[kind])
    stock.load_lora_weights(str(tmp_path))  # a stock pipeline, as a user would
    net = stock.transformer if kind == "sd3" else stock.unet
    stock_bb = common.Backbone(stock, "cpu")
    assert torch.allclose(stock_bb.predict(net, x, t, cond), trained, atol=1e-5)
    assert next(iter(net.peft_config.values())).lora_alpha == 8  # alpha != rank survives


# the public SD-3.5-M LoRA's target names (joint attention only)
PUBLIC_SD3_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                      "attn.add_v_proj", "attn.to_add_out"]


def test_sd3_lora_adapts_joint_attention_only_and_loads_the_public_key_set(tiny_models, tmp_path):
    """The tiny SD-3 has a dual-attention block (attn + attn2) like SD-3.5-M.
    Our checkpoint holds exactly the public key set (no attn2), and a LoRA
    saved with that key set loads key for key."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    bb = common.Backbone(common.load_pipeline(tiny_models["sd3"]), "cpu")
    modules = dict(bb.net.named_modules())
    assert any(name.endswith("attn2.to_q") for name in modules)  # the test model has an attn2 to leave alone
    expected = sorted(f"transformer_blocks.{i}.{target}.lora_{ab}.weight"
                      for i in range(len(bb.net.transformer_blocks)) for target in PUBLIC_SD3_TARGETS
                      if f"transformer_blocks.{i}.{target}" in modules for ab in "AB")
    config = common.setup_lora_roles(bb, [common.LEARNER], rank=4, alpha=8)
    ours = common.lora_state_dict(bb.net, common.LEARNER)
    assert sorted(ours) == expected
    common.save_lora_checkpoint(bb, ours, config, tmp_path / "ours")
    saved = sorted(load_file(tmp_path / "ours" / "pytorch_lora_weights.safetensors"))
    assert saved == ["transformer." + key for key in expected] and not any("attn2" in key for key in saved)

    # a LoRA with the public key set (random values, rank 4, no adapter metadata)
    g = torch.Generator().manual_seed(0)
    public = {}
    for key in expected:
        layer = modules[key.split(".lora_")[0]]
        shape = (4, layer.in_features) if ".lora_A." in key else (layer.out_features, 4)
        public[key] = torch.randn(shape, generator=g)
    type(bb.pipe).save_lora_weights(str(tmp_path / "public"), transformer_lora_layers=public)
    fresh = common.Backbone(common.load_pipeline(tiny_models["sd3"]), "cpu")
    common.load_lora_into(fresh, str(tmp_path / "public"), "loaded")
    loaded = get_peft_model_state_dict(fresh.net, adapter_name="loaded")
    assert sorted(loaded) == expected  # nothing missing, nothing unexpected
    assert all(torch.equal(loaded[key], public[key]) for key in expected)


def test_lora_of_the_other_backbone_is_refused(tiny_models, tmp_path):
    bb = common.Backbone(common.load_pipeline(tiny_models["sd15"]), "cpu")
    config = common.setup_lora_roles(bb, [common.LEARNER], rank=4, alpha=4)
    common.save_lora_checkpoint(bb, common.lora_state_dict(bb.net, common.LEARNER), config, tmp_path)
    other = common.Backbone(common.load_pipeline(tiny_models["sd3"]), "cpu")
    with pytest.raises(common.UserError, match="does not fit this sd3 transformer .*other backbone"):
        common.load_lora_into(other, str(tmp_path), common.LEARNER)


def test_ema_follows_diffusers_default_schedule():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = common.LoraEMA([p], max_decay=0.9999)
    p.data.fill_(1.0)
    ema.step([p], 1)  # first update: decay 0 -> a copy
    assert torch.equal(ema.shadow[0], torch.ones(3))
    p.data.fill_(0.0)
    ema.step([p], 2)  # second: decay (1 + 1) / (10 + 1)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 2 / 11))


def test_ema_follows_flow_grpo_schedule_over_24_steps():
    """SD-3.5-M (flow_grpo's EMA, decay 0.9, interval 8): the shadow starts at
    the stage's initial LoRA and is updated only after optimizer steps 7, 15
    and 23, with decay min((1 + s) / (10 + s), 0.9). The weight after step s
    is s here, the initial weight 0; by hand:
      s = 7:  d = 8/17,  shadow = 9/17 * 7                  = 63/17
      s = 15: d = 16/25, shadow = 16/25 * 63/17 + 9/25 * 15 = 3303/425
      s = 23: d = 24/33, shadow = 8/11 * 3303/425 + 3/11 * 23"""
    p = torch.nn.Parameter(torch.zeros(2))
    ema = common.LoraEMA([p], max_decay=0.9, update_every=8, schedule="flow_grpo")
    expected = {7: 63 / 17, 15: 3303 / 425, 23: 8 / 11 * 3303 / 425 + 3 / 11 * 23}
    value, seen = 0.0, []
    for step in range(1, 25):
        p.data.fill_(float(step))
        ema.step([p], step)
        value = expected.get(step, value)  # unchanged between updates
        seen.append(ema.shadow[0][0].item())
        assert ema.shadow[0].tolist() == pytest.approx([value, value], rel=1e-6), step
    assert ema.num_updates == 3
    print("flow_grpo EMA shadow after steps 1..24:", [round(v, 4) for v in seen])
    # the cap: from s = 80 on, (1 + s) / (10 + s) > 0.9, so the decay is 0.9
    assert ema.decay(79) == pytest.approx(80 / 89) and ema.decay(81) == 0.9 and ema.decay(1000) == 0.9


# ---------------------------------------------------------------- input cache
def test_cache_round_trip_and_invalidation(backbones, tmp_path):
    from accelerate import PartialState

    csv_path = make_pairs(tmp_path / "data", n=3)
    bb = backbones["sd15"]
    pairs = common.read_pairs_csv(csv_path)
    state = type("S", (), {"is_main_process": True, "wait_for_everyone": lambda self: None})()
    built = common.load_or_build_cache(bb, "tiny", csv_path, pairs, 32, tmp_path / "cache", True, state)
    loaded = common.load_or_build_cache(bb, "tiny", csv_path, pairs, 32, tmp_path / "cache", True, state)
    assert set(built) >= {"real_mean", "real_std", "fake_mean", "fake_std", "prompt_embeds", "prompt_index"}
    assert built["real_mean"].shape == (3, 2, 4, 16, 16)
    for key in built:  # [:] reads every row of the memory-mapped cache
        assert torch.equal(built[key][:], loaded[key][:])
    # the stored posterior is the VAE's, for the unflipped and the flipped image
    from PIL import Image

    image = common.center_crop_resize(Image.open(pairs[1]["real_image_path"]), 32)
    pixels = common.pil_to_tensor(image)
    mean, _ = bb.encode_images(torch.stack([pixels, pixels.flip(-1)]))
    # stored in bf16 (8 significant bits): equal to the fp32 values up to bf16 rounding, 2^-8 relative
    assert built["real_mean"].dtype == torch.bfloat16
    assert torch.allclose(built["real_mean"][1].float(), mean, rtol=2**-8, atol=1e-6)
    assert torch.allclose(built["prompt_embeds"][0].float(), bb.encode_prompts([""])["prompt_embeds"][0],
                          rtol=2**-8, atol=1e-5)
    # editing the CSV gives another key, hence a rebuild
    files = set((tmp_path / "cache").iterdir())
    csv_path.write_text(csv_path.read_text().replace("disc number 0", "disc number zero"))
    common.load_or_build_cache(bb, "tiny", csv_path, common.read_pairs_csv(csv_path), 32,
                               tmp_path / "cache", True, state)
    assert len(set((tmp_path / "cache").iterdir()) - files) == 1
    assert PartialState  # accelerate is importable (the trainers use it)


def test_a_pair_shares_one_flip(backbones):
    """Winner and loser latents of a pair come from the same flip index."""
    bb = backbones["sd15"]
    n = 64
    # real and fake share the posterior, but flipped (index 1) differs from unflipped (0)
    mean = torch.stack([torch.zeros(n, 4, 2, 2), torch.ones(n, 4, 2, 2)], dim=1)
    cache = {"real_mean": mean, "real_std": torch.zeros_like(mean), "fake_mean": mean.clone(),
             "fake_std": torch.zeros_like(mean), "prompt_index": torch.zeros(n, dtype=torch.long),
             "prompt_embeds": torch.zeros(1, 77, 32)}
    x0, _ = common.sample_inputs(bb, cache, torch.arange(n), torch.Generator().manual_seed(0), ["real", "fake"])
    assert torch.equal(x0["real"], x0["fake"])
    flipped = x0["real"].flatten(1).mean(1) > 0
    assert 0 < flipped.sum() < n  # both flips occur


def test_pairs_csv_errors_are_clear(tmp_path):
    with pytest.raises(common.UserError, match="not found"):
        common.read_pairs_csv(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("uid,prompt\n1,a cat\n")
    with pytest.raises(common.UserError, match="real_image_path"):
        common.read_pairs_csv(bad)
    bad.write_text("uid,prompt,win_image_path,lose_image_path\n1,a cat,nope.png,nope2.png\n")
    with pytest.raises(common.UserError, match="not a file"):
        common.read_pairs_csv(bad)


def test_win_lose_aliases_and_relative_paths(tmp_path):
    csv_path = make_pairs(tmp_path, n=2)
    text = csv_path.read_text().replace("real_image_path", "win_image_path").replace("fake_image_path",
                                                                                     "lose_image_path")
    csv_path.write_text(text)
    pairs = common.read_pairs_csv(csv_path)
    assert pairs[0]["real_image_path"] == str(tmp_path / "real" / "img000.png")
    assert pairs[1]["fake_image_path"] == str(tmp_path / "fake" / "img001.png")


# ---------------------------------------------------------------- reliability
def test_16_bit_and_transparent_images_become_proper_rgb(tmp_path):
    import numpy as np
    from PIL import Image

    grey16 = np.full((8, 8), 32896, dtype=np.uint16)  # mid-grey in 16 bits: 32896 / 257 = 128
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    rgb = np.asarray(common.center_crop_resize(Image.open(tmp_path / "grey16.png"), 8))
    assert rgb.shape == (8, 8, 3) and np.all(rgb == 128)  # not clipped to white
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4] = (255, 0, 0, 255)  # top half opaque red, bottom half fully transparent (black hidden pixels)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    rgb = np.asarray(common.to_rgb(Image.open(tmp_path / "rgba.png")))
    assert np.all(rgb[:4] == (255, 0, 0)) and np.all(rgb[4:] == 255)  # composited on white


def test_pairs_of_different_sizes_and_duplicate_uids_are_refused(tmp_path):
    from PIL import Image

    csv_path = make_pairs(tmp_path, n=3)
    Image.new("RGB", (40, 32)).save(tmp_path / "fake" / "img001.png")
    with pytest.raises(common.UserError, match="uid 'img001'.* 32x32 but the fake is 40x32"):
        common.read_pairs_csv(csv_path)
    assert len(common.read_pairs_csv(csv_path, need_fake=False)) == 3  # Stage 1 reads the real images only
    csv_path = make_pairs(tmp_path / "dup", n=3)
    csv_path.write_text(csv_path.read_text().replace("img002,", "img000,"))
    with pytest.raises(common.UserError, match="uid 'img000' appears twice"):
        common.read_pairs_csv(csv_path)


def test_replace_dir_always_leaves_a_folder_and_a_cut_replacement_is_recovered(tmp_path):
    final = tmp_path / "state"
    for version in ("one", "two"):
        tmp = common.make_temp_dir(final)
        (tmp / "v").write_text(version)
        common.replace_dir(tmp, final)
        assert (final / "v").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # no temporaries left
    # a run killed between the two renames of the fallback: state.old, no state
    final.rename(tmp_path / "state.old")
    common.recover_dir(final)
    assert (final / "v").read_text() == "two" and not (tmp_path / "state.old").exists()


def test_written_files_follow_the_umask(tmp_path):
    old_mask = os.umask(0o027)
    try:
        common.atomic_write_text(tmp_path / "a.txt", "x")
        folder = common.make_temp_dir(tmp_path / "folder")
    finally:
        os.umask(old_mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640  # mkstemp alone gives 0600
    assert folder.stat().st_mode & 0o777 == 0o750


def test_write_errors_become_one_message(tmp_path, monkeypatch):
    import errno

    def no_permission(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", no_permission)
    with pytest.raises(common.UserError, match=r"cannot write .*out\.txt: Permission denied \(no permission\)"):
        common.atomic_write_text(tmp_path / "out.txt", "x")
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(common.UserError, match="is a file, not a folder"):
        common.atomic_write_text(tmp_path / "file" / "out.txt", "x")


def test_lock_names_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        lock = tmp_path / common.LOCK_FILE
        lock.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "what": "curate.py"}))
        with pytest.raises(common.UserError, match=f"pid {live.pid} on host {socket.gethostname()}, curate.py"):
            common.lock_output_dir(tmp_path, "evaluate.py")
        lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
        assert common.lock_output_dir(tmp_path, "evaluate.py") == lock
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    finally:
        live.kill()
        live.wait()


def test_asking_for_n_processes_and_getting_one_is_reported(caplog):
    assert common.requested_num_processes({"WORLD_SIZE": "4"}) == 4
    launcher = ["/usr/bin/python", "/usr/bin/accelerate", "launch", "--num_processes", "2", "--cpu", "train_dro.py"]
    assert common.requested_num_processes({}, launcher) == 2
    assert common.requested_num_processes({}, ["accelerate", "launch", "--num_processes=8", "x.py"]) == 8
    assert common.requested_num_processes({}, ["bash"]) is None
    os.environ["WORLD_SIZE"] = "2"
    try:
        with caplog.at_level("INFO", logger="realalign"):
            common.log_world_size(1, "stage 1")
    finally:
        del os.environ["WORLD_SIZE"]
    assert "stage 1: 1 process(es)" in caplog.text and "2 processes were asked for" in caplog.text
    assert "torchrun --nproc_per_node" in caplog.text
