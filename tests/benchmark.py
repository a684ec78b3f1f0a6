"""Throughput, memory and MFU of our trainers against a baseline of the public
code's step structure, side by side on one machine (README "Throughput and
memory").

    python tests/benchmark.py --arch tiny  --resolution 64  --batch 4   # CPU, about a minute
    python tests/benchmark.py --arch sd15  --resolution 512 --batch 4   # GPU, full SD-1.5 UNet
    python tests/benchmark.py --arch sd35m --resolution 512 --batch 2   # GPU, full SD-3.5-M MMDiT
    bash tests/gpu_benchmark.sh                                         # every row, one GPU, < 9 min

The models are the real architectures (configs written below, from the
published model configs) with random weights, so nothing is downloaded. Each
measurement runs in its own process, so peak memory (GPU: max allocated; CPU:
peak RSS) belongs to that measurement alone. Every measurement runs
--warmup untimed steps, then --steps timed ones; the JSON keeps every step's
time and the table shows the median and the min-max spread.

  ours      train_dro.py / train_dpo.py --benchmark_steps N: random latents and
            embeddings (the cache's role), one network with LoRA roles, one
            forward per role over the concatenated batch, the truncated
            policy sampler, bf16 base weights, torch.compile on CUDA.
  baseline  THE PUBLIC CODE'S STEP STRUCTURE, re-implemented here for
            comparison only, row by row (README "Throughput and memory"):
    SD-1.5 Stage 1  three UNets (trainable + LoRA, reference = deep copy,
                    policy snapshot = deep copy) in fp16 (fp32 LoRA weights,
                    fp16 autocast, gradient scaler); VAE encoding and CLIP text
                    encoding of the batch every step; the micro-batch's policy
                    samples drawn in ONE batched sampler call whose UNet
                    forward is batched and whose DPM-Solver++ scheduler step
                    loops per sample (one scheduler per sample: each has its
                    own offset grid); real and policy halves concatenated into
                    one forward per network.
    SD-1.5 Stage 2  trainable UNet with fp32 master weights under fp16
                    autocast, reference UNet in fp16; VAE and text encoding
                    every step; winner and loser concatenated into one forward
                    per network.
    SD-3.5-M        ONE transformer with PEFT adapters `learner` and `ref`
                    (set_adapter to switch), fp32 weights under bf16 autocast;
                    text embeddings precomputed; VAE encoding every step; the
                    Stage-1 policy sample a full 10-step flow-Euler pipeline
                    call per micro-batch, taken to its end and noised with the
                    real image's noise and timestep (its target: the learner's
                    own detached prediction, as in the public code).
  Stage 1 truncation: our sampler stops after the largest drawn step of the
  micro-batch. The SD-1.5 baseline is given, step by step, the SAME number of
  sampler evaluations that our run drew (it truncates exactly as often as we
  did), so a lucky draw cannot flatter either side. The SD-3.5-M public
  structure needs the full 10-step sample, so its baseline runs all 10.

Both sides use the same loss functions from common.py and the same LoRA
config; tests/test_throughput.py checks on CPU that the baseline computes the
same losses as ours on shared inputs.

MFU (model-FLOPs utilization) = the step's network FLOPs / step time / the
device's bf16 dense peak. The network FLOPs are counted with
torch.utils.flop_counter.FlopCounterMode on the real configuration (on the
meta device: shapes only, no memory): the policy sampler's evaluations
actually run, the reference forward, and the learner's forward and backward
(the base is frozen, so autograd computes input gradients and LoRA weight
gradients only: that is what is counted). The baseline's VAE and text
encodings are not model FLOPs of the training step; they are listed apart
(encoder_tflops_per_step).
"""

import argparse
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import tiny_models  # noqa: E402

# Published configs of the two backbones (SD-1.5 unet/config.json and
# vae/config.json, CLIP ViT-L/14 text encoder; SD-3.5-Medium transformer and vae).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, sample_size=512, scaling_factor=0.18215)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                   bos_token_id=512, eos_token_id=513, pad_token_id=513)
SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD3_VAE = dict(SD_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)


def build_pipeline(arch, directory):
    """Save a random-weight pipeline of the full architecture (or the tiny one)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, PNDMScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    if arch == "tiny":
        return tiny_models.build_tiny_model("sd15", directory)
    if arch == "tiny-sd3":
        return tiny_models.build_tiny_model("sd3", directory)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = tiny_models._tiny_clip_tokenizer(Path(directory).with_name("tokenizer-src"))
    with torch.device(device):  # random init on the GPU: seconds instead of minutes
        if arch == "sd15":
            pipe = StableDiffusionPipeline(
                unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD_VAE),
                text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)), tokenizer=tokenizer,
                scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
                safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
        else:  # the text encoders are unused by either side's step here: tiny ones keep the folder small
            pipe = StableDiffusion3Pipeline(
                transformer=SD3Transformer2DModel(**SD35M_TRANSFORMER), vae=AutoencoderKL(**SD3_VAE),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                text_encoder=tiny_models._tiny_text_encoder(True), tokenizer=tokenizer,
                text_encoder_2=tiny_models._tiny_text_encoder(True), tokenizer_2=tokenizer,
                text_encoder_3=None, tokenizer_3=None)
    pipe.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(directory)
    return directory


# ------------------------------------------------------------------ FLOPs
# bf16 dense peak of the tensor cores (vendor data sheets; fp16 is the same),
# matched against torch.cuda.get_device_name() in this order.
BF16_DENSE_PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]
# attention sequence length of the text condition: CLIP 77 tokens (SD-1.5);
# CLIP 77 + T5 128 (SD-3.5-M), as common.random_inputs and the cache hold
TEXT_TOKENS = {"sd15": 77, "sd3": 77 + 128}


def device_peak_flops(device_name):
    """The bf16 dense peak of a device name, or None (MFU then omitted)."""
    for key, peak in BF16_DENSE_PEAK_FLOPS:
        if key in device_name:
            return peak
    return None


def _meta_network(model_dir):
    """The model folder's UNet/transformer (config only) on the meta device,
    with the learner's LoRA attached and the base frozen, as in training."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    from peft import LoraConfig

    kind = "sd3" if (Path(model_dir) / "transformer").exists() else "sd15"
    cls, sub = (SD3Transformer2DModel, "transformer") if kind == "sd3" else (UNet2DConditionModel, "unet")
    with torch.device("meta"):
        net = cls.from_config(cls.load_config(Path(model_dir) / sub))
    net.requires_grad_(False)
    defaults = common.BACKBONE_DEFAULTS[kind]
    net.add_adapter(LoraConfig(r=defaults["lora_rank"], lora_alpha=defaults["lora_alpha"],
                               init_lora_weights="gaussian", target_modules=common.LORA_TARGETS[kind]))
    return kind, net


@functools.lru_cache(maxsize=None)
def network_flops(model_dir, resolution, rows):
    """FLOPs of the network at `rows` samples: {"forward": a no-grad forward
    (sampler, reference), "train": the learner's forward + backward}, counted
    by FlopCounterMode on meta tensors. Autograd computes what it needs
    (input gradients through the frozen base, weight gradients of the LoRA
    only), and that is what is counted."""
    from torch.utils.flop_counter import FlopCounterMode

    kind, net = _meta_network(str(model_dir))
    config = net.config
    side = _latent_side(model_dir, resolution)
    x = torch.randn(rows, config.in_channels, side, side, device="meta")
    if kind == "sd3":
        inputs = dict(hidden_states=x, timestep=torch.ones(rows, device="meta"),
                      encoder_hidden_states=torch.randn(rows, TEXT_TOKENS[kind], config.joint_attention_dim,
                                                        device="meta"),
                      pooled_projections=torch.randn(rows, config.pooled_projection_dim, device="meta"))
        call = lambda: net(**inputs, return_dict=False)[0]  # noqa: E731
    else:
        embeds = torch.randn(rows, TEXT_TOKENS[kind], config.cross_attention_dim, device="meta")
        call = lambda: net(x, torch.ones(rows, device="meta"), encoder_hidden_states=embeds,  # noqa: E731
                           return_dict=False)[0]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call()
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        common.per_sample_mse(call(), x).sum().backward()
    return {"forward": forward, "train": counter.get_total_flops()}


def _latent_side(model_dir, resolution):
    vae = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    return resolution // 2 ** (len(vae["block_out_channels"]) - 1)


def step_flops(model_dir, resolution, batch, sampler_rows):
    """Model FLOPs of one training step of either side: the sampler's
    evaluations (`sampler_rows` = network rows run by the Stage-1 policy
    sampler, 0 in Stage 2), then the reference forward and the learner's
    forward + backward over the concatenated batch of 2 x `batch` rows.
    Counted per row and scaled (attention is per sample, so the count is
    linear in the batch; tests/test_throughput.py checks it)."""
    per_row = network_flops(str(model_dir), resolution, 1)
    return sampler_rows * per_row["forward"] + 2 * batch * (per_row["forward"] + per_row["train"])


@functools.lru_cache(maxsize=None)
def encoder_flops(model_dir, resolution):
    """FLOPs per image of the VAE encoder at `resolution` px (the baseline
    re-encodes every step; the README's cache build-time estimate uses it)."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(Path(model_dir) / "vae"))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.encode(torch.randn(1, 3, resolution, resolution, device="meta"))
    return counter.get_total_flops()


def expected_sampler_calls(steps, trajectories):
    """E[max k + 1] for `trajectories` independent uniform draws of k in
    [0, steps): the truncated sampler's expected network calls."""
    return steps - sum((j / steps) ** trajectories for j in range(1, steps))


def write_configs(arch, directory):
    """The full architecture's configs only (no weights): enough to count FLOPs."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

    directory = Path(directory)
    with torch.device("meta"):
        if arch == "sd15":
            UNet2DConditionModel(**SD15_UNET).save_config(directory / "unet")
            AutoencoderKL(**SD_VAE).save_config(directory / "vae")
        else:
            SD3Transformer2DModel(**SD35M_TRANSFORMER).save_config(directory / "transformer")
            AutoencoderKL(**SD3_VAE).save_config(directory / "vae")
    return directory


def count_flops(arch, resolution, batch, workdir):
    """Per-step model FLOPs of every row at the expected sampler-evaluation
    counts (no timing, no GPU): the MFU denominators of the README table."""
    model = write_configs(arch, Path(workdir) / f"configs-{arch}") if arch in ("sd15", "sd35m") else \
        Path(workdir) / f"model-{arch}"
    steps = 10 if arch in ("sd35m", "tiny-sd3") else 20
    truncated = batch * expected_sampler_calls(steps, batch)
    per_row = network_flops(str(model), resolution, 1)
    rows = {"stage1 ours (truncated sampler, expected)": step_flops(model, resolution, batch, truncated),
            "stage1 baseline": step_flops(model, resolution, batch, batch * steps if steps == 10 else truncated),
            "stage2 ours and baseline": step_flops(model, resolution, batch, 0)}
    print(f"{arch}, {resolution} px, batch {batch}: network forward {per_row['forward'] / 1e12:.3f} TFLOP/sample, "
          f"learner forward+backward {per_row['train'] / 1e12:.3f} TFLOP/sample, VAE encoder "
          f"{encoder_flops(str(model), resolution) / 1e12:.3f} TFLOP/image; expected sampler calls/step "
          f"{expected_sampler_calls(steps, batch):.2f} of {steps}")
    for name, flops in rows.items():
        print(f"  {name}: {flops / 1e12:.2f} TFLOP/step")
    return rows


# ------------------------------------------------------------------ baseline
class Baseline:
    """The public code's step structure (module docstring), for one backbone
    and stage. `networks()` builds its models; `loss()` is the loss of one
    micro-batch from prepared inputs (the part tests/test_throughput.py checks
    against ours); `step_inputs()` and `policy_*()` make those inputs the way
    the public code does, every step."""

    def __init__(self, model, stage, device):
        self.stage, self.device = stage, torch.device(device)
        cuda = self.device.type == "cuda"
        self.pipe = common.load_pipeline(model, dtype=torch.float32)
        self.kind = "sd3" if getattr(self.pipe, "transformer", None) is not None else "sd15"
        # public precision: SD-1.5 fp16, SD-3.5-M bf16 autocast; fp32 on CPU
        self.half = (torch.float16 if self.kind == "sd15" else torch.bfloat16) if cuda else torch.float32
        self.autocast = torch.autocast("cuda", self.half) if cuda else torch.autocast("cpu", enabled=False)
        self.bb = common.Backbone(self.pipe, self.device, self.half)
        self.pipe.vae.to(self.device, self.half)
        if self.kind == "sd15":  # CLIP text encoding every step
            self.pipe.text_encoder.to(self.device, self.half)
        defaults = common.BACKBONE_DEFAULTS[self.kind]
        self.rank, self.alpha = defaults["lora_rank"], defaults["lora_alpha"]

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, init_lora_weights="gaussian",
                          target_modules=common.LORA_TARGETS[self.kind])

    def networks(self):
        """trainable (base + LoRA), reference and (Stage 1, SD-1.5) snapshot."""
        net = self.bb.net.requires_grad_(False)
        torch.manual_seed(0)
        if self.kind == "sd3":  # ONE transformer, fp32, adapters learner / ref
            net.to(self.device, torch.float32)
            net.add_adapter(self.lora_config(), adapter_name="learner")
            net.add_adapter(self.lora_config(), adapter_name="ref")
            common.copy_role(net, "learner", "ref")
            net.set_adapter("learner")
            self.trainable, self.reference, self.snapshot = net, net, net
        elif self.stage == "dro":  # three fp16 UNets, the trainable one with fp32 LoRA weights
            net.to(self.device, self.half)
            net.add_adapter(self.lora_config())
            self.trainable = net
            self.reference = copy.deepcopy(net).requires_grad_(False)
            self.snapshot = copy.deepcopy(net).requires_grad_(False)
        else:  # fp32 master weights + fp16 reference
            net.to(self.device, torch.float32)
            net.add_adapter(self.lora_config())
            self.trainable = net
            self.reference = copy.deepcopy(net).to(self.half).requires_grad_(False)
            self.snapshot = None
        self.params = [p for p in self.trainable.parameters() if p.requires_grad]
        for p in self.params:  # LoRA weights train in fp32 (diffusers' cast_training_params)
            p.data = p.data.float()
        return self.params

    def _switch(self, adapter):
        if self.kind == "sd3":  # the public SD-3.5-M code switches adapters on one transformer
            self.trainable.set_adapter(adapter)

    def errors(self, x_t, t, cond, target):
        """ONE forward per network over the concatenated batch."""
        self._switch("learner")
        model_err = common.per_sample_mse(self.bb.predict(self.trainable, x_t, t, cond), target)
        self._switch("ref")
        with torch.no_grad():
            ref_err = common.per_sample_mse(self.bb.predict(self.reference, x_t, t, cond), target)
        self._switch("learner")
        return model_err, ref_err

    def loss(self, x_t, t, cond, target, n, beta=None):
        model_err, ref_err = self.errors(x_t, t, cond, target)
        if self.stage == "dpo":
            return common.diffusion_dpo_loss(model_err[:n], model_err[n:], ref_err[:n], ref_err[n:], beta=beta)
        return common.diffusion_dro_loss(model_err[:n], model_err[n:], ref_err[:n], ref_err[n:])

    # ---- what the public code does every step, before the loss ----
    def encode(self, pixels, generator):
        """VAE encoding of a pixel batch (every step), a posterior sample."""
        with torch.no_grad():
            posterior = self.pipe.vae.encode(pixels.to(self.device, self.half)).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(self.device, posterior.mean.dtype)
        latents = posterior.mean + posterior.std * noise
        return ((latents - self.bb.vae_shift) * self.bb.vae_scale).float()

    def text(self, prompts, fixed):
        """SD-1.5: CLIP text encoding every step. SD-3.5-M: precomputed."""
        if self.kind == "sd3":
            return fixed
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return {"prompt_embeds": embeds}

    @torch.no_grad()
    def policy_sd15(self, cond, resolution, calls, generator, num_steps=20):
        """ONE batched sampler call with the snapshot UNet: the forward is
        batched, the DPM-Solver++ step loops per sample (one scheduler each,
        on its own offset grid). Runs `calls` steps and keeps each sample's
        point at its step k < calls (one sample takes k = calls - 1, so the
        run truncates exactly where ours did)."""
        from diffusers import DPMSolverMultistepScheduler

        n = cond["prompt_embeds"].shape[0]
        step_ratio = self.bb.num_train_timesteps // num_steps
        offsets = torch.randint(0, step_ratio, (n,), generator=generator).tolist()
        k = torch.randint(0, calls, (n,), generator=generator)
        k[0] = calls - 1
        schedulers = []
        for offset in offsets:
            scheduler = DPMSolverMultistepScheduler.from_config(self.pipe.scheduler.config,
                                                                algorithm_type="dpmsolver++")
            scheduler.set_timesteps(timesteps=[offset + step_ratio * (num_steps - 1 - i) for i in range(num_steps)])
            schedulers.append(scheduler)
        x = torch.randn((n, *self.bb.latent_shape(resolution)), generator=generator).to(self.device)
        keep_x, keep_t, keep_pred = torch.zeros_like(x), torch.zeros(n, dtype=torch.long), torch.zeros_like(x)
        for i in range(calls):
            t = torch.tensor([int(s.timesteps[i]) for s in schedulers])
            eps = self.bb.predict(self.snapshot, x, t.to(self.device), cond).float()
            for j in (k == i).nonzero().flatten().tolist():
                keep_x[j], keep_t[j], keep_pred[j] = x[j], t[j], eps[j]
            x = torch.cat([s.step(eps[j : j + 1], s.timesteps[i], x[j : j + 1]).prev_sample
                           for j, s in enumerate(schedulers)])
        return keep_x, keep_t.to(self.device), keep_pred

    @torch.no_grad()
    def policy_sd3(self, cond, resolution, generator, num_steps=10):
        """A full 10-step flow-Euler pipeline call (guidance-free) per
        micro-batch with the learner adapter: the end sample x0."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        n = cond["prompt_embeds"].shape[0]
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(num_steps, device=self.device)
        x = torch.randn((n, *self.bb.latent_shape(resolution)), generator=generator).to(self.device)
        self._switch("learner")
        for t in scheduler.timesteps:
            velocity = self.bb.predict(self.trainable, x, t.expand(n), cond)
            x = scheduler.step(velocity, t, x).prev_sample
        return x.float()


def baseline(args):
    """One process: time the public code's step structure (module docstring)."""
    device = common.default_device()
    base = Baseline(args.model, args.stage, device)
    params = base.networks()
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    scaler = torch.amp.GradScaler("cuda", enabled=base.half == torch.float16)
    g = torch.Generator().manual_seed(0)
    n, res, bb = args.batch, args.resolution, base.bb
    prompts = [f"a photo of object {i}" for i in range(n)]
    fixed_cond = common.random_inputs(bb, n, res, g, [])[1] if bb.is_flow else None  # precomputed (SD-3.5-M)
    total = args.warmup + args.steps
    calls = [int(c) for c in args.sampler_calls.split(",")] if args.sampler_calls else [20] * total
    if len(calls) < total:
        raise common.UserError(f"--sampler_calls lists {len(calls)} steps, the run has {total}")
    timings, sampling, sampler_calls, sampler_rows = [], [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(total):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        pixels = torch.rand((n, 3, res, res), generator=g) * 2 - 1
        calls_before, rows_before = bb.network_calls, bb.network_rows
        with base.autocast:
            cond = base.text(prompts, fixed_cond)
            cond2 = common.cat_cond(cond, cond)
            if args.stage == "dpo":  # winner and loser: one VAE call, one forward per network
                x0 = base.encode(torch.cat([pixels, pixels.flip(-1)]), g)
                noise = torch.randn(x0[:n].shape, generator=g).to(device)
                t = bb.sample_timesteps(n, g)
                noise2, t2 = torch.cat([noise, noise]), torch.cat([t, t])
                x_t = bb.add_noise(x0, noise2, t2)
                loss, _ = base.loss(x_t, t2, cond2, bb.target(x0, noise2), n, beta=2000.0 if bb.kind == "sd15" else 100.0)
            else:
                x0_real = base.encode(pixels, g)
                noise = torch.randn(x0_real.shape, generator=g).to(device)
                sample_start = time.perf_counter()
                if bb.is_flow:  # full sample, then noised like the real image, same noise and t
                    x0_policy = base.policy_sd3(cond, res, g)
                    t = bb.sample_timesteps(n, g)
                    x_policy = bb.add_noise(x0_policy, noise, t)
                else:
                    x_policy, t, target_policy = base.policy_sd15(cond, res, calls[step], g)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                sampling.append(time.perf_counter() - sample_start)
                sampler_calls.append(bb.network_calls - calls_before)
                sampler_rows.append(bb.network_rows - rows_before)
                x_t = torch.cat([bb.add_noise(x0_real, noise, t), x_policy])
                if bb.is_flow:  # public SD-3.5-M: the policy target is the learner's own prediction
                    loss = public_sd3_dro_loss(base, x_t, torch.cat([t, t]), cond2, bb.target(x0_real, noise), n)
                else:
                    target = torch.cat([bb.target(x0_real, noise), target_policy])
                    loss, _ = base.loss(x_t, torch.cat([t, t]), cond2, target, n)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    result = {"label": f"stage{1 if args.stage == 'dro' else 2} (baseline)", "backbone": bb.kind,
              "resolution": res, "batch": n, "warmup": args.warmup, "step_seconds": timings,
              "peak_memory_gb": common.peak_memory_gb(device),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    if sampling:
        result.update(sampling_seconds=sampling, sampler_calls=sampler_calls, sampler_rows=sampler_rows)
    print("BENCHMARK " + json.dumps(result), flush=True)


def public_sd3_dro_loss(base, x_t, t, cond, target_real, n):
    """The public SD-3.5-M Stage-1 loss structure: one learner forward over
    [real; policy], the policy half's target its own detached prediction,
    then one reference forward."""
    base._switch("learner")
    pred = base.bb.predict(base.trainable, x_t, t, cond)
    target = torch.cat([target_real.to(pred.dtype), pred[n:].detach()])
    model_err = common.per_sample_mse(pred, target)
    base._switch("ref")
    with torch.no_grad():
        ref_err = common.per_sample_mse(base.bb.predict(base.reference, x_t, t, cond), target)
    base._switch("learner")
    return common.diffusion_dro_loss(model_err[:n], model_err[n:], ref_err[:n], ref_err[n:])[0]


# -------------------------------------------------------------------- driver
def measure(command, env, deadline):
    """Run one measurement in its own process; None (and the error printed)
    if it fails or runs past the `deadline` (time.monotonic()), so one
    failure costs only its own slot."""
    timeout = deadline - time.monotonic()
    if timeout < 5:
        print(f"benchmark skipped, no time left: {' '.join(command)}", flush=True)
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"benchmark timed out after {timeout:.0f} s: {' '.join(command)}", flush=True)
        return None
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCHMARK ")]
    if result.returncode or not lines:
        print(f"benchmark failed: {' '.join(command)}\n{result.stderr[-3000:]}", flush=True)
        return None
    return json.loads(lines[-1][len("BENCHMARK "):])


def summarise(result, model_dir, warmup):
    """Median and spread of the timed steps, samples/s, FLOPs and MFU."""
    timed = result["step_seconds"][warmup:]
    median = statistics.median(timed)
    quartiles = statistics.quantiles(timed, n=4) if len(timed) > 1 else [median, median, median]
    n = result["batch"]
    rows = result.get("sampler_rows", [0] * len(result["step_seconds"]))[warmup:]
    flops = statistics.mean(step_flops(model_dir, result["resolution"], n, r) for r in rows)
    peak = device_peak_flops(result["device"])
    result.update(timed_steps=len(timed), seconds_per_step=median, seconds_min=min(timed), seconds_max=max(timed),
                  seconds_iqr=[quartiles[0], quartiles[2]], samples_per_s=n / median,
                  model_tflops_per_step=flops / 1e12, achieved_tflops=flops / median / 1e12,
                  mfu=flops / median / peak if peak else None)
    if peak is None:
        result["mfu_note"] = f"no bf16 peak known for device '{result['device']}': MFU omitted"
    if "sampler_calls" in result:
        result["sampler_calls_per_step"] = statistics.mean(result["sampler_calls"][warmup:])
        result["sampling_share"] = sum(result["sampling_seconds"][warmup:]) / sum(timed)
    if result["label"].endswith("(baseline)"):
        images = n * (2 if result["label"].startswith("stage2") else 1)
        result["encoder_tflops_per_step"] = images * encoder_flops(str(model_dir), result["resolution"]) / 1e12
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["tiny", "tiny-sd3", "sd15", "sd35m"], default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="samples per optimizer step (one micro-batch)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--stages", default="dro,dpo")
    parser.add_argument("--sides", default="ours,baseline", help="which implementations to time")
    parser.add_argument("--points_per_trajectory", type=int, default=0,
                        help="also time Stage 1 with train_dro.py --points_per_trajectory K (0: skip)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="passed to our trainers (default: theirs, on with CUDA)")
    parser.add_argument("--timeout", type=int, default=1800,
                        help="seconds for this whole call: each measurement gets what is left and is abandoned "
                             "(its process killed) when that runs out; later ones are then skipped")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("--workdir", default=None, help="where the random-weight model is saved (default: temp)")
    parser.add_argument("--count_flops", action="store_true",
                        help="only print each row's model FLOPs per step at --batch (no GPU, no weights)")
    # internal: one baseline measurement in this process
    parser.add_argument("--baseline_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--sampler_calls", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        return baseline(args)

    deadline = time.monotonic() + args.timeout
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="realalign-bench-"))
    if args.count_flops and args.arch in ("sd15", "sd35m"):
        return count_flops(args.arch, args.resolution, args.batch, workdir)
    model = workdir / f"model-{args.arch}"
    if not model.exists():
        t0 = time.perf_counter()
        build_pipeline(args.arch, model)
        print(f"built {args.arch} in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.count_flops:
        return count_flops(args.arch, args.resolution, args.batch, workdir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sides = args.sides.split(",")
    results = []
    total = args.warmup + args.steps

    def record(result):
        """Summarise one measurement and rewrite --out at once, so a later
        measurement that fails or is killed leaves the earlier ones saved."""
        if result is None:
            return None
        if args.compile is False:  # our default on CUDA compiles: say when it did not
            result["label"] = result["label"].replace("(ours", "(ours-eager")
        results.append(summarise(result, model, args.warmup))
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2))
        return result

    for stage in args.stages.split(","):
        script = ROOT / ("train_dro.py" if stage == "dro" else "train_dpo.py")
        ours = [sys.executable, str(script), "--pretrained_model", str(model), "--output_dir",
                str(workdir / f"run-{stage}-{args.batch}"), "--benchmark_steps", str(total), "--train_batch_size",
                str(args.batch), "--effective_batch_size", str(args.batch), "--resolution", str(args.resolution)]
        if args.compile is not None:
            ours.append("--compile" if args.compile else "--no-compile")
        base = [sys.executable, __file__, "--baseline_worker", "--model", str(model), "--stage", stage,
                "--batch", str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps),
                "--resolution", str(args.resolution)]
        ours_result = record(measure(ours, env, deadline)) if "ours" in sides else None
        if "baseline" in sides:
            if stage == "dro" and ours_result and "sampler_calls" in ours_result:
                # the same sampler-evaluation count per step as ours (module docstring)
                base += ["--sampler_calls", ",".join(str(round(c)) for c in ours_result["sampler_calls"])]
            record(measure(base, env, deadline))
        K = args.points_per_trajectory
        if "ours" in sides and stage == "dro" and K > 1 and args.batch % K == 0:
            record(measure(ours + ["--points_per_trajectory", str(K)], env, deadline))
    print(markdown_table(results))


def markdown_table(results):
    rows = ["| stage | implementation | device | backbone | px | batch | s/step median (min-max) | samples/s "
            "| peak memory (GB) | model TFLOP/step | MFU | sampler evals/step | sampling share |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        stage, impl = r["label"].split(" ")
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        evals = f"{r['sampler_calls_per_step']:.1f}" if "sampler_calls_per_step" in r else ""
        share = f"{r['sampling_share']:.0%}" if "sampling_share" in r else ""
        rows.append(f"| {stage} | {impl.strip('()')} | {r['device']} | {r['backbone']} | {r['resolution']} | "
                    f"{r['batch']} | {r['seconds_per_step']:.3f} ({r['seconds_min']:.3f}-{r['seconds_max']:.3f}) | "
                    f"{r['samples_per_s']:.2f} | {r['peak_memory_gb']:.2f} | {r['model_tflops_per_step']:.3g} | "
                    f"{mfu} | {evals} | {share} |")
    groups = dict.fromkeys((r["label"].split(" ")[0], r["backbone"], r["batch"]) for r in results)
    for stage, backbone, batch in groups:
        runs = {r["label"].split(" ")[1].strip("()"): r for r in results
                if (r["label"].split(" ")[0], r["backbone"], r["batch"]) == (stage, backbone, batch)}
        base = runs.pop("baseline", None)
        for name, ours in runs.items() if base else ():
            rows.append(f"\n{stage} {backbone} batch {batch}: {name} / baseline = "
                        f"{ours['samples_per_s'] / base['samples_per_s']:.2f}x samples/s, "
                        f"{ours['peak_memory_gb'] / base['peak_memory_gb']:.2f}x peak memory")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
