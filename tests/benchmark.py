"""Throughput, memory and MFU of our trainers against a baseline of the public
code's step structure, side by side on one machine (README "Throughput and
memory"), and the CPU proxies of what limits a GPU step.

    python tests/benchmark.py --arch tiny --resolution 32 --batch 2     # CPU, a few minutes
    python tests/benchmark.py --arch sd15 --resolution 512 --batch 4    # GPU, full SD-1.5 UNet
    python tests/benchmark.py --plan gpu --out results.json             # every row, one GPU, < 8 min
    bash tests/gpu_benchmark.sh                                         # the same, wheels and all
    python tests/benchmark.py --proxies                                 # CPU proxies, ours and baseline
    python tests/benchmark.py --count_flops --arch sd15 --batch 4 --resolution 512

The models are the real architectures (configs written below, from the
published model configs) with random weights, so nothing is downloaded. Each
measurement runs in its own process, so peak memory (GPU: max allocated;
CPU: peak RSS) belongs to that measurement alone. Every measurement runs
--warmup untimed steps, then --steps timed ones; the JSON keeps every step's
time, the table gives the mean (throughput: samples / time) and the min-max
spread.

  ours      train_dro.py / train_dpo.py --benchmark_steps N, run in the
            measuring process and observed from outside (`ours_worker`
            wraps common.optimize and the policy sampler: the trainers hold
            no timers): random latents and embeddings (the cache's role),
            one network with LoRA roles, one forward per role over the
            concatenated batch, the fixed-slot policy sampler, bf16 base
            weights, the repeated blocks compiled (CUDA default).
  baseline  THE PUBLIC CODE'S STEP STRUCTURE, re-implemented here for
            comparison only, row by row (README "Throughput and memory"):
    SD-1.5 Stage 1  three UNets (trainable + LoRA, reference = deep copy,
                    policy snapshot = deep copy) in fp16 (fp32 LoRA weights,
                    fp16 autocast, gradient scaler); VAE encoding and CLIP text
                    encoding of the batch every step; the micro-batch's policy
                    samples drawn in ONE batched sampler call whose UNet
                    forward is batched and whose DPM-Solver++ scheduler step
                    loops per sample (one scheduler per sample: each has its
                    own offset grid), stopped after the micro-batch's last
                    needed step (the public pipeline call runs all 20: this
                    baseline does less work than the public code); real and
                    policy halves concatenated into one forward per network.
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

Both sides use the same loss functions from common.py and the same LoRA
config; tests/test_throughput.py checks on CPU that the baseline computes the
same losses as ours on shared inputs.

FLOPs, honestly: each row is charged the network FLOPs IT RAN, step by step:
the sampler rows its network calls evaluated (ours: fixed slots, idle ones
included; the baseline: every row of every call), the reference forward and
the learner's forward + backward over 2 x batch rows. Ours runs fewer sampler
rows than the baseline (each trajectory stops at its point; the baseline's
rows run to the micro-batch's last point, or SD-3.5-M's full 10 steps), so a
speed-up also counts work ours skips: the table gives each side's TFLOP per
sample beside the ratio. Achieved TFLOP/s = FLOPs run / time; MFU = achieved
/ the device's bf16 dense peak. The FLOPs are counted with
torch.utils.flop_counter.FlopCounterMode on the real configuration on the
meta device (shapes only): autograd computes input gradients through the
frozen base and the LoRA's weight gradients, and that is what is counted.
The baseline's VAE and text encodings are not model FLOPs of the training
step; they are listed apart (encoder_tflops_per_step).

Stage 1 of ours: theta is frozen for a snapshot window (--snapshot_every
optimizer steps) and the sampler's slots run ahead through the window's
trajectories, so a step's sampling does not happen within that step. Each
timed step is therefore one WHOLE window (--snapshot_every 1, and 8 x the
slots' worth of trajectories per step by gradient accumulation; 2 x for the
tiny models on a CPU): its slots
fill, run, and drain (idle at the window's end) inside the timed step, and
the table shows the idle share (sampler rows run vs needed). A real run's
window holds 16 steps of 256 samples, far more trajectories per slot, so it
idles less (`expected_drain_rows`).
"""

import argparse
import contextlib
import copy
import functools
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    """Save a random-weight pipeline of the full architecture (or the tiny
    one) into `directory`: built in a temporary folder beside it, then
    renamed, so a build killed mid-save leaves no folder that looks complete."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, PNDMScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    directory = Path(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    if arch in ("tiny", "tiny-sd3"):
        tiny_models.build_tiny_model("sd15" if arch == "tiny" else "sd3", tmp / "model")
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer = tiny_models._tiny_clip_tokenizer(tmp / "tokenizer-src")
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
        pipe.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(tmp / "model")
    os.replace(tmp / "model", directory)
    shutil.rmtree(tmp, ignore_errors=True)
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
    """Model FLOPs of one training step of either side: `sampler_rows`
    network rows evaluated by the Stage-1 policy sampler (0 in Stage 2), then
    the reference forward and the learner's forward + backward over 2 x
    `batch` rows. Counted per row and scaled (attention is per sample, so
    the count is linear in the batch; tests/test_throughput.py checks it)."""
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
    [0, steps): the baseline's SD-1.5 sampler calls per micro-batch (it stops
    after the micro-batch's last needed step, every row running to it)."""
    return steps - sum((j / steps) ** trajectories for j in range(1, steps))


def expected_stops(kind, steps, draws=20000):
    """E[network evaluations of one policy trajectory] = E[its stops]: SD-1.5
    (k + 1 for k uniform in [0, steps)); SD-3: the shifted grid's points above
    a logit-normal t, plus t (a fixed-seed Monte Carlo estimate). Ours runs
    this per trajectory: no row runs past its point."""
    if kind == "sd15":
        return (steps + 1) / 2
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    table = scheduler.timesteps.clone().float()
    u = compute_density_for_timestep_sampling("logit_normal", draws, logit_mean=0.0, logit_std=1.0,
                                              generator=torch.Generator().manual_seed(0))
    t = table[(u * 1000).long().clamp(0, 999)]
    scheduler.set_timesteps(steps)
    grid = scheduler.sigmas[:-1] * 1000
    return float(((grid.view(1, -1) > t.view(-1, 1) + 1e-3).sum(dim=1) + 1).float().mean())


def expected_drain_rows(slots, kind, steps):
    """Idle slot-rows at the end of a snapshot window, about: the last
    trajectories finish one by one while the freed slots wait. Bounded by
    slots x the longest trajectory; about slots x E[stops] / 2 on average."""
    return slots * expected_stops(kind, steps) / 2


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
    """Per-step model FLOPs each side runs at micro-batch `batch`, at the
    expected sampler rows (no timing, no GPU): the README's FLOP table."""
    model = write_configs(arch, Path(workdir) / f"configs-{arch}") if arch in ("sd15", "sd35m") else \
        Path(workdir) / f"model-{arch}"
    kind = "sd3" if arch in ("sd35m", "tiny-sd3") else "sd15"
    steps = 10 if kind == "sd3" else 20
    per_row = network_flops(str(model), resolution, 1)
    ours_rows = batch * expected_stops(kind, steps)
    base_rows = batch * (steps if kind == "sd3" else expected_sampler_calls(steps, batch))
    rows = {f"stage1 ours (fixed slots: {ours_rows:.1f} sampler rows/step, each trajectory stopped at its point)":
            step_flops(model, resolution, batch, ours_rows),
            f"stage1 baseline ({base_rows:.1f} sampler rows/step"
            + (", the full 10-step sample)" if kind == "sd3" else ", every row to the micro-batch's last point; "
               f"the public code's 20 steps: {step_flops(model, resolution, batch, batch * steps) / 1e12:.1f} "
               "TFLOP)"): step_flops(model, resolution, batch, base_rows),
            "stage2 ours and baseline": step_flops(model, resolution, batch, 0)}
    print(f"{arch}, {resolution} px, batch {batch}: network forward {per_row['forward'] / 1e12:.3f} TFLOP/sample, "
          f"learner forward+backward {per_row['train'] / 1e12:.3f} TFLOP/sample, VAE encoder "
          f"{encoder_flops(str(model), resolution) / 1e12:.3f} TFLOP/image; policy trajectory: "
          f"{expected_stops(kind, steps):.2f} evaluations on average")
    for name, flops in rows.items():
        print(f"  {name}: {flops / 1e12:.2f} TFLOP/step")
    window = 16 * 256 * expected_stops(kind, steps)  # sampler rows of a real snapshot window, all processes
    print("  ours' idle slot-rows at a real window's end (16 steps x 256 samples, 64 slots per process): about "
          + ", ".join(f"{processes * expected_drain_rows(64, kind, steps) / window:.1%} on {processes} GPU(s)"
                      for processes in (1, 8)))
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
    def policy_sd15(self, cond, resolution, generator, num_steps=20):
        """ONE batched sampler call with the snapshot UNet: the forward is
        batched, the DPM-Solver++ step loops per sample (one scheduler each,
        on its own offset grid). Keeps each sample's point at its random step
        k, and stops after the largest k of the micro-batch. Returns the
        points and the number of network calls."""
        from diffusers import DPMSolverMultistepScheduler

        n = cond["prompt_embeds"].shape[0]
        step_ratio = self.bb.num_train_timesteps // num_steps
        offsets = torch.randint(0, step_ratio, (n,), generator=generator).tolist()
        k = torch.randint(0, num_steps, (n,), generator=generator)
        calls = int(k.max()) + 1
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
        return (keep_x, keep_t.to(self.device), keep_pred), calls

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
    """One process: time the public code's step structure (module docstring).
    The sampler's calls and rows are counted here (every call of the batched
    sampler evaluates every row of the micro-batch)."""
    device = torch.device(getattr(args, "device", None) or common.default_device())
    base = Baseline(args.model, args.stage, device)
    params = base.networks()
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    scaler = torch.amp.GradScaler("cuda", enabled=base.half == torch.float16)
    g = torch.Generator().manual_seed(0)
    n, res, bb = args.batch, args.resolution, base.bb
    prompts = [f"a photo of object {i}" for i in range(n)]
    fixed_cond = common.random_inputs(bb, n, res, g, [])[1] if bb.is_flow else None  # precomputed (SD-3.5-M)
    timings, sampling, sampler_calls = [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        pixels = torch.rand((n, 3, res, res), generator=g) * 2 - 1
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
                    x0_policy, calls = base.policy_sd3(cond, res, g), 10
                    t = bb.sample_timesteps(n, g)
                    x_policy = bb.add_noise(x0_policy, noise, t)
                else:
                    (x_policy, t, target_policy), calls = base.policy_sd15(cond, res, g)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                sampling.append(time.perf_counter() - sample_start)
                sampler_calls.append(calls)
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
              "resolution": res, "batch": n, "step_seconds": timings, "peak_memory_gb": common.peak_memory_gb(device),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    if sampling:  # every call evaluates the whole micro-batch
        result.update(sampling_seconds=sampling, sampler_calls=sampler_calls,
                      sampler_rows=[n * calls for calls in sampler_calls])
    print("BENCHMARK " + json.dumps(result), flush=True)
    return result


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


# ---------------------------------------------------------------------- ours
@contextlib.contextmanager
def wrapped_optimize(wrap_loss=None, before=None, records=None):
    """Run a trainer with common.optimize wrapped: `before(backbone)` first,
    every micro-batch loss through `wrap_loss(loss_fn)`, and the per-step
    records kept in `records`. This is how the benchmark observes our
    trainers: they carry no instrumentation of their own."""
    original = common.optimize

    def optimize(args, accelerator, backbone, roles, lora_config, cache, grad_accum, micro_batch_loss, *rest, **kw):
        if before is not None:
            before(backbone)
        loss = wrap_loss(micro_batch_loss) if wrap_loss else micro_batch_loss
        result = original(args, accelerator, backbone, roles, lora_config, cache, grad_accum, loss, *rest, **kw)
        if records is not None:
            records.extend(result)
        return result

    common.optimize = optimize
    try:
        yield
    finally:
        common.optimize = original


def _trainer(stage):
    import train_dpo
    import train_dro

    return train_dro if stage == "dro" else train_dpo


class SamplerMeter:
    """Times the policy sampler (`PolicySampler.next`, CUDA events: no host
    sync) and counts the rows its network calls evaluate (a forward
    pre-hook) and the trajectory stops it needed, per optimizer step."""

    def __init__(self):
        self.per_step, self.step, self.inside, self.events = {}, None, False, []
        self.original = common.PolicySampler.next

    def hook(self, module, args, kwargs):
        if self.inside:
            entry = self.per_step[self.step]
            entry["sampler_rows"] += (args[0] if args else kwargs["hidden_states"]).shape[0]
            entry["sampler_calls"] += 1

    def next(self, sampler):
        entry = self.per_step.setdefault(self.step, dict(sampler_rows=0, sampler_calls=0, sampler_stops=0))
        start = self._mark()
        self.inside = True
        try:
            request = self.original(sampler)
        finally:
            self.inside = False
        self.events.append((self.step, start, self._mark()))
        entry["sampler_stops"] += sum(len(stops) for stops in request.stops)
        entry["slots"] = sampler.slots
        return request

    @staticmethod
    def _mark():
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, step):
        """Sampling seconds of a step (after the run: the events are done)."""
        total = 0.0
        for s, start, end in self.events:
            if s == step:
                total += start.elapsed_time(end) / 1e3 if torch.cuda.is_available() else end - start
        return total


def ours_worker(args, trainer_argv):
    """One measurement of ours in this process: the trainer's main() with
    --benchmark_steps, observed through wrapped_optimize and SamplerMeter."""
    meter, records = SamplerMeter(), []

    def before(backbone):
        backbone.net.register_forward_pre_hook(meter.hook, with_kwargs=True)

    def wrap_loss(loss_fn):
        def loss(micro_batch):
            meter.step = micro_batch.step
            return loss_fn(micro_batch)
        return loss

    if args.compile_backend:  # e.g. aot_eager for a quick CPU rehearsal of the compiled path
        original_compile = common.compile_network
        common.compile_network = functools.partial(original_compile, backend=args.compile_backend)
    common.PolicySampler.next = lambda sampler: meter.next(sampler)
    with wrapped_optimize(wrap_loss=wrap_loss, before=before, records=records):
        _trainer(args.stage).main(trainer_argv)
    device = common.default_device()
    trainer_args = _trainer(args.stage).parse_args(trainer_argv)
    result = {"label": args.label, "backbone": "sd3" if (Path(trainer_args.pretrained_model) / "transformer").exists()
              else "sd15", "resolution": trainer_args.resolution, "batch": trainer_args.effective_batch_size,
              "micro_batch": trainer_args.train_batch_size,
              "step_seconds": [r["step_seconds"] for r in records], "peak_memory_gb": common.peak_memory_gb(device),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    if meter.per_step:
        steps = [r["step"] for r in records]
        result["sampling_seconds"] = [meter.seconds(step) for step in steps]
        for key in ("sampler_calls", "sampler_rows", "sampler_stops"):
            result[key] = [meter.per_step.get(step, {}).get(key, 0) for step in steps]
        result["sampler_slots"] = max(entry.get("slots", 0) for entry in meter.per_step.values())
    print("BENCHMARK " + json.dumps(result), flush=True)
    return result


# ---------------------------------------------------------------- CPU proxies
# What limits a GPU step besides its FLOPs, measured on the CPU (README
# "Throughput"): the aten ops one network forward launches, the host time of
# a LoRA role switch, the ops of one EMA update, the graphs torch.compile
# builds over a run, and the times the host waits for the device. Each is
# printed for ours and, where it has one, the baseline (`--proxies`).

aten = torch.ops.aten


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it: in an eager GPU run each is
    at least one kernel launch and some microseconds of host time."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class HostSyncCounter(TorchDispatchMode):
    """Counts the host's reads of device values (.item(), float(), bool(),
    .tolist(), nonzero, device-to-host copies): on a GPU each waits for every
    queued kernel. Run with the device tensors on the meta device, where such
    a read has no value: it is counted and answered with zeros, so the run
    goes on and every read is seen."""

    SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                aten.equal.default, aten.is_nonzero.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(t.is_meta for t in tensors):
            to_host = (func is aten._to_copy.default and torch.device(kwargs.get("device") or "meta").type == "cpu") \
                or (func is aten.copy_.default and not args[0].is_meta)
            if func in self.SYNC_OPS or to_host:
                self.count += 1
                source = tensors[0] if func is not aten.copy_.default else args[1]
                if func is aten._local_scalar_dense.default:
                    return False if source.dtype == torch.bool else 0
                if func in (aten.equal.default, aten.is_nonzero.default):
                    return False
                if func is aten.nonzero.default:  # one hit at index 0 (a lookup then reads it)
                    return torch.zeros((1, source.dim()), dtype=torch.long, device="meta")
                if func is aten.masked_select.default:
                    return torch.zeros(1, dtype=source.dtype, device="meta")
                if func is aten.copy_.default:
                    return args[0].zero_()
                return torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype)
        return func(*args, **kwargs)


def _full_config_network(arch, dtype):
    """The full SD-1.5 UNet / SD-3.5-M transformer on the meta device (shapes only)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    with torch.device("meta"):
        net = SD3Transformer2DModel(**SD35M_TRANSFORMER) if arch == "sd35m" else UNet2DConditionModel(**SD15_UNET)
    return net.to(dtype).requires_grad_(False)


def _forward_call(net, kind, rows=1, side=64):
    """A no-argument closure running one forward of `net` on meta inputs."""
    config, dtype = net.config, next(net.parameters()).dtype
    x = torch.randn(rows, config.in_channels, side, side, device="meta", dtype=dtype)
    t = torch.ones(rows, device="meta")
    if kind == "sd3":
        embeds = torch.randn(rows, TEXT_TOKENS[kind], config.joint_attention_dim, device="meta", dtype=dtype)
        pooled = torch.randn(rows, config.pooled_projection_dim, device="meta", dtype=dtype)
        return lambda: net(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                           return_dict=False)[0]
    embeds = torch.randn(rows, TEXT_TOKENS[kind], config.cross_attention_dim, device="meta", dtype=dtype)
    return lambda: net(x, t, encoder_hidden_states=embeds, return_dict=False)[0]


def ours_meta_network(arch, roles=(common.LEARNER, common.REF, common.POLICY)):
    """Our network as the trainer holds it on a GPU (bf16 base, LoRA roles set
    up by common.setup_lora_roles), on the meta device."""
    import types

    kind = "sd3" if arch == "sd35m" else "sd15"
    net = _full_config_network(arch, torch.bfloat16)
    stand_in = types.SimpleNamespace(net=net, kind=kind, dtype=torch.bfloat16, device=torch.device("meta"),
                                     net_name="transformer" if kind == "sd3" else "unet")
    defaults = common.BACKBONE_DEFAULTS[kind]
    with torch.device("meta"):  # peft makes a second adapter on the default device
        common.setup_lora_roles(stand_in, list(roles), defaults["lora_rank"], defaults["lora_alpha"])
    return kind, net


def baseline_meta_network(arch):
    """The baseline's network (public code): SD-1.5 fp16 UNets with an fp32
    LoRA each; SD-3.5-M one fp32 transformer with adapters learner and ref."""
    from peft import LoraConfig

    kind = "sd3" if arch == "sd35m" else "sd15"
    net = _full_config_network(arch, torch.float32 if kind == "sd3" else torch.float16)
    defaults = common.BACKBONE_DEFAULTS[kind]
    for name in ("learner", "ref") if kind == "sd3" else ("default",):
        with torch.device("meta"):
            net.add_adapter(LoraConfig(r=defaults["lora_rank"], lora_alpha=defaults["lora_alpha"],
                                       init_lora_weights="gaussian", target_modules=common.LORA_TARGETS[kind]),
                            adapter_name=name)
    return kind, net


def proxy_ops_per_forward(arch):
    """aten ops of one eager no-grad forward (a sampler or reference call) on
    the meta device: ours with the policy role active, and the baseline's.
    Autocast inserts no casts on the meta device: its casts are not counted
    (on a GPU they add to the fp32-LoRA paths, today's and the baseline's)."""
    out = {}
    for side, build in (("ours", ours_meta_network), ("baseline", baseline_meta_network)):
        kind, net = build(arch)
        if side == "ours":
            common.use_role(net, common.POLICY)
        call = _forward_call(net, kind)
        with torch.no_grad(), OpCounter() as counter:
            call()
        net.disable_adapters()
        with torch.no_grad(), OpCounter() as plain:
            call()
        out[side] = {"ops": counter.count, "ops_without_lora": plain.count}
    return out


def proxy_role_switch_ms(arch, repeats=60):
    """Host time per role switch (learner -> ref -> policy -> ...), ms: ours
    (common.use_role) and the baseline's SD-3.5-M set_adapter (the public
    SD-1.5 code keeps separate UNets: no switch)."""
    kind, net = ours_meta_network(arch)
    roles = [common.LEARNER, common.REF, common.POLICY]
    common.use_role(net, common.LEARNER)
    start = time.perf_counter()
    for i in range(repeats):
        common.use_role(net, roles[(i + 1) % 3])
    ours = (time.perf_counter() - start) / repeats * 1e3
    base = None
    if kind == "sd3":
        _, net = baseline_meta_network(arch)
        start = time.perf_counter()
        for i in range(repeats):
            net.set_adapter(["ref", "learner"][i % 2])
        base = (time.perf_counter() - start) / repeats * 1e3
    return {"ours": ours, "baseline": base}


def proxy_ema_ops(arch):
    """aten ops of one EMA update of the learner's LoRA (common.LoraEMA)."""
    kind, net = ours_meta_network(arch, roles=(common.LEARNER,))
    params = common.role_parameters(net, common.LEARNER)
    ema = common.LoraEMA(params, update_every=1)
    with OpCounter() as counter:
        ema.step(params, 1)
    return {"ours": counter.count, "tensors": len(params)}


def proxy_compiled_graphs(model, stage, steps=20, batch=4, resolution=32):
    """Graphs torch.compile builds over a `steps`-step run of ours (tiny model,
    the compile counted with dynamo's CompileCounter backend: tracing only),
    after each optimizer step. Must stop growing after the warm-up."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter, per_step, original = CompileCounter(), [], common.compile_network
    common.compile_network = functools.partial(original, backend=counter)
    argv = ["--pretrained_model", str(model), "--output_dir", tempfile.mkdtemp(prefix="realalign-graphs-"),
            "--benchmark_steps", str(steps), "--train_batch_size", str(batch), "--effective_batch_size", str(batch),
            "--resolution", str(resolution), "--compile"]
    if stage == "dro":
        argv += ["--snapshot_every", "2"]  # windows end and start within the run

    def wrap(loss_fn):
        def loss(*args, **kwargs):
            result = loss_fn(*args, **kwargs)
            per_step.append(counter.frame_count)  # batch == effective batch: one micro-batch per step
            return result
        return loss

    try:
        with wrapped_optimize(wrap_loss=wrap), contextlib.redirect_stdout(io.StringIO()):
            _trainer(stage).main(argv)
    finally:
        common.compile_network = original
        torch._dynamo.reset()
    return per_step


def _to_meta(backbone):
    """Move the backbone's device state to the meta device (HostSyncCounter)."""
    backbone.net.to("meta")  # new parameter objects: forget use_role's cached lookups of the old ones
    common._ROLE_LOOKUP.pop(backbone.net, None)
    backbone.device = torch.device("meta")
    if hasattr(backbone, "alphas_cumprod"):
        backbone.alphas_cumprod = backbone.alphas_cumprod.to("meta")


def proxy_host_syncs(model, stage, steps=2, batch=2, resolution=32):
    """Host syncs per micro-batch (inside the loss closure: sampler, forwards,
    loss) and per optimizer step (everything: the step's log reads its
    numbers once), of ours on the meta device (HostSyncCounter)."""
    argv = ["--pretrained_model", str(model), "--output_dir", tempfile.mkdtemp(prefix="realalign-syncs-"),
            "--benchmark_steps", str(steps), "--train_batch_size", str(batch), "--effective_batch_size",
            str(2 * batch), "--resolution", str(resolution), "--no-compile"]
    inside = []
    counter = HostSyncCounter()

    def wrap(loss_fn):
        def loss(*args, **kwargs):
            before = counter.count
            result = loss_fn(*args, **kwargs)
            inside.append(counter.count - before)
            return result
        return loss

    with wrapped_optimize(wrap_loss=wrap, before=_to_meta), contextlib.redirect_stdout(io.StringIO()), counter:
        _trainer(stage).main(argv)
    return {"per_micro_batch": max(inside), "per_step": counter.count / steps}


def baseline_host_syncs(model, stage, batch=2, resolution=32):
    """The baseline's host syncs per micro-batch (one micro-batch per step,
    the mean of 2), on the meta device."""
    args = argparse.Namespace(model=str(model), stage=stage, batch=batch, resolution=resolution, warmup=0, steps=2,
                              device="meta")
    counter = HostSyncCounter()
    with counter, contextlib.redirect_stdout(io.StringIO()):
        baseline(args)
    return {"per_micro_batch": counter.count / 2}




def print_proxies(workdir):
    """Every CPU proxy, ours beside the baseline (README "Throughput")."""
    for arch in ("sd15", "sd35m"):
        ops, switch, ema = proxy_ops_per_forward(arch), proxy_role_switch_ms(arch), proxy_ema_ops(arch)
        base_switch = "-" if switch["baseline"] is None else f"{switch['baseline']:.2f} ms"
        print(f"{arch}: aten ops per no-grad forward: ours {ops['ours']['ops']} (without LoRA "
              f"{ops['ours']['ops_without_lora']}), baseline {ops['baseline']['ops']} (without LoRA "
              f"{ops['baseline']['ops_without_lora']}); role switch: ours {switch['ours']:.3f} ms, baseline "
              f"{base_switch}; EMA update: ours {ema['ours']} ops over {ema['tensors']} tensors", flush=True)
    for arch in ("tiny", "tiny-sd3"):
        model = Path(workdir) / f"model-{arch}"
        if not model.exists():
            build_pipeline(arch, model)
        for stage in ("dro", "dpo"):
            syncs, base_syncs = proxy_host_syncs(model, stage), baseline_host_syncs(model, stage)
            print(f"{arch} {stage}: host syncs: ours {syncs['per_micro_batch']} per micro-batch, "
                  f"{syncs['per_step']:g} per optimizer step; baseline {base_syncs['per_micro_batch']:g} per "
                  "micro-batch", flush=True)
            print(f"{arch} {stage}: compiled graphs after each of 20 steps {proxy_compiled_graphs(model, stage)}",
                  flush=True)


# -------------------------------------------------------------------- driver
def plan_rows(plan, args):
    """The rows to measure, most important first. --plan gpu: the rows that
    decide the targets (MFU of ours compiled, ours / baseline), SD-1.5 then
    SD-3.5-M, Stage 2 then Stage 1; then ours eager (what compiling buys);
    then larger micro-batches (what fits on an 80 GB card); then CUDA graphs
    (inductor's cudagraph trees under the compiled blocks, an experiment:
    not our default until measured). --plan rehearsal:
    the same rows on the tiny models (CPU, 1 warm-up + 1 timed step, dynamo's
    "eager" backend for the compiled rows: the per-block compiled path, its
    guards and graphs, without code generation). Without a
    plan: --arch, --stages, --sides and --batch."""
    def row(arch, stage, side, batch, cap, compile=None, **extra):
        return dict(arch=arch, stage=stage, side=side, batch=batch, cap=cap, compile=compile, **extra)

    if plan is None:
        rows = []
        for stage in args.stages.split(","):
            rows += [row(args.arch, stage, side, args.batch, args.timeout, args.compile)
                     for side in args.sides.split(",")]
            if stage == "dro" and "ours" in args.sides and args.points_per_trajectory > 1:
                rows.append(row(args.arch, stage, "ours", args.batch, args.timeout, args.compile,
                                points_per_trajectory=args.points_per_trajectory))
        return rows
    gpu = plan == "gpu"
    sd15, sd3 = ("sd15", "sd35m") if gpu else ("tiny", "tiny-sd3")
    cap = (lambda seconds: seconds) if gpu else (lambda seconds: 2 * seconds)
    rows = []
    for arch, batch in ((sd15, 4), (sd3, 2)):
        for stage in ("dpo", "dro"):
            rows += [row(arch, stage, "ours", batch, cap(150), compile=True),
                     row(arch, stage, "baseline", batch, cap(90))]
    rows += [row(arch, stage, "ours", batch, cap(90), compile=False)
             for stage in ("dpo", "dro") for arch, batch in ((sd15, 4), (sd3, 2))]
    rows += [row(sd15, stage, "ours", 16, cap(90), compile=True) for stage in ("dpo", "dro")]
    rows += [row(sd3, stage, "ours", 8, cap(90), compile=True) for stage in ("dpo", "dro")]
    rows.append(row(sd15, "dpo", "ours", 4, cap(120), compile=True, cudagraphs=True))
    return rows


def row_name(row):
    return f"{row['arch']} stage{1 if row['stage'] == 'dro' else 2} {row['side']} batch {row['batch']}" + \
        {True: " compiled", False: " eager", None: ""}[row["compile"] if row["side"] == "ours" else None] + \
        (" + CUDA graphs" if row.get("cudagraphs") else "")


RUNNING = []  # the measuring processes now running (killed with the driver)


def start(command, env, **kwargs):
    """A child process in its own process group (so that it and everything
    it starts, e.g. compile workers, can be killed together), same session."""
    process = subprocess.Popen(command, env=env, process_group=0, **kwargs)
    RUNNING.append(process)
    return process


def kill(process):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def measure(command, env, deadline):
    """Run one measurement in its own process, killed with all it started at
    the deadline, so nothing keeps the device busy under the next one.
    Returns (result or None, why not)."""
    timeout = deadline - time.monotonic()
    if timeout < 10:
        return None, "no time left"
    process = start(command, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(process)
        return None, f"timed out after {timeout:.0f} s"
    lines = [line for line in stdout.splitlines() if line.startswith("BENCHMARK ")]
    if process.returncode or not lines:
        return None, f"failed (exit {process.returncode}): {stderr[-2000:]}"
    return json.loads(lines[-1][len("BENCHMARK "):]), None


def summarise(result, model_dir, timed):
    """Mean and spread of the timed steps (slice `timed`), samples/s, FLOPs
    run, achieved TFLOP/s and MFU."""
    steps = result["step_seconds"][timed]
    mean = statistics.fmean(steps)
    n = result["batch"]
    rows = result.get("sampler_rows", [0] * len(result["step_seconds"]))[timed]
    flops = statistics.fmean(step_flops(model_dir, result["resolution"], n, r) for r in rows)
    peak = device_peak_flops(result["device"])
    result.update(timed_steps=len(steps), seconds_per_step=mean, seconds_min=min(steps), seconds_max=max(steps),
                  samples_per_s=n / mean, model_tflops_per_step=flops / 1e12, tflops_per_sample=flops / n / 1e12,
                  achieved_tflops=flops / mean / 1e12, mfu=flops / mean / peak if peak else None)
    if peak is None:
        result["mfu_note"] = f"no bf16 peak known for device '{result['device']}': MFU omitted"
    if "sampler_rows" in result:
        result["sampler_rows_per_sample"] = sum(rows) / (n * len(steps))
        result["sampling_share"] = sum(result["sampling_seconds"][timed]) / sum(steps)
    if "sampler_stops" in result:  # the rows its trajectories needed; the rest idled at a window's end
        result["sampler_stops_per_sample"] = sum(result["sampler_stops"][timed]) / (n * len(steps))
    if result["label"].endswith("(baseline)"):
        images = n * (2 if result["label"].startswith("stage2") else 1)
        result["encoder_tflops_per_step"] = images * encoder_flops(str(model_dir), result["resolution"]) / 1e12
    return result


def row_command(row, model, args, workdir):
    """The measuring process's command line and its (warmup, steps)."""
    gpu = torch.cuda.is_available()
    stage, batch = row["stage"], row["batch"]
    if row["side"] == "baseline":
        warmup, steps = (1, 4) if args.plan == "gpu" else (args.warmup, args.steps)
        return [sys.executable, __file__, "--baseline_worker", "--model", str(model), "--stage", stage, "--batch",
                str(batch), "--warmup", str(warmup), "--steps", str(steps), "--resolution",
                str(args.resolution)], (warmup, steps)
    K, compiled = row.get("points_per_trajectory", 1), row["compile"]
    warmup, steps, accumulation = args.warmup, args.steps, 1
    if stage == "dro":  # each step one whole snapshot window, 8 x the slots' trajectories (module docstring)
        full_size = args.resolution >= 256  # (the tiny models on a CPU: 4 slots, 2 x their trajectories)
        slots = args.sampler_slots or (min(64, 4 * batch // K) if full_size else 4)
        accumulation = -(-(8 if full_size else 2) * slots // (batch // K))
        warmup, steps = 1, min(args.steps, 2)  # the first window compiles
    label = f"stage{1 if stage == 'dro' else 2} (ours{'' if compiled or (compiled is None and gpu) else '-eager'}" \
        f"{f'-{K}pts' if K > 1 else ''}{'-cudagraphs' if row.get('cudagraphs') else ''})"
    trainer = ["--pretrained_model", str(model), "--output_dir", str(workdir / f"run-{stage}-{batch}"),
               "--benchmark_steps", str(warmup + steps), "--train_batch_size", str(batch),
               "--effective_batch_size", str(batch * accumulation), "--resolution", str(args.resolution)]
    if compiled is not None:
        trainer.append("--compile" if compiled else "--no-compile")
    if stage == "dro":
        trainer += ["--snapshot_every", "1", "--sampler_slots", str(slots), "--points_per_trajectory", str(K)]
    worker = [sys.executable, __file__, "--ours_worker", "--stage", stage, "--label", label]
    if compiled and args.compile_backend:
        worker += ["--compile_backend", args.compile_backend]
    return worker + ["--", *trainer], (warmup, steps)


def run_rows(rows, args, workdir):
    """Measure `rows` in order within --budget (or --timeout) seconds, each
    within its cap, rewriting --out after every row; models are built first,
    in parallel, each into a temporary folder then renamed."""
    budget = args.budget or args.timeout
    deadline = time.monotonic() + budget
    report = {"plan": args.plan, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "budget_s": budget, "resolution": args.resolution, "rows": [], "skipped": [], "complete": False}

    def save():
        if args.out:
            common.atomic_write_text(Path(args.out), json.dumps(report, indent=2))

    def interrupted(signum, frame):  # a SIGTERM from the caller's timeout: keep what was measured
        for process in RUNNING:
            kill(process)
        report["skipped"].append({"row": "the rest", "why": f"interrupted (signal {signum})"})
        save()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    builds = {}
    for arch in dict.fromkeys(row["arch"] for row in rows):
        model = workdir / f"model-{arch}"
        if not model.exists():
            print(f"building {arch} ...", flush=True)
            builds[arch] = start([sys.executable, __file__, "--build", arch, "--workdir", str(workdir)], env)
    save()
    for row in rows:
        name = row_name(row)
        model = workdir / f"model-{row['arch']}"
        if row["arch"] in builds:
            try:
                builds.pop(row["arch"]).wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if not model.exists():
            report["skipped"].append({"row": name, "why": "the model was not built"})
            save()
            continue
        command, (warmup, steps) = row_command(row, model, args, workdir)
        started = time.monotonic()
        print(f"=== {name} (cap {row['cap']} s, {budget - (deadline - started):.0f} s elapsed)", flush=True)
        row_env = {**env, "TORCHINDUCTOR_CUDAGRAPHS": "1"} if row.get("cudagraphs") else env
        result, why = measure(command, row_env, min(started + row["cap"], deadline))
        if result is None:
            print(f"--- {name}: {why}", flush=True)
            report["skipped"].append({"row": name, "why": why})
        else:
            result.update(row=name, warmup=warmup, wall_seconds=time.monotonic() - started)
            report["rows"].append(summarise(result, model, slice(warmup, warmup + steps)))
            print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}), flush=True)
        report["device"] = next((r["device"] for r in report["rows"]), report["device"])
        save()
    for process in builds.values():
        kill(process)
    report["complete"] = True
    save()
    if not args.plan:  # (tests/gpu_benchmark.sh prints it from its EXIT trap)
        print(markdown_table(report["rows"]), flush=True)
    return report


def markdown_table(results):
    rows = ["| stage | implementation | backbone | px | micro-batch x accumulation | s/step mean (min-max) | "
            "samples/s | peak memory (GB) | TFLOP/sample run | achieved TFLOP/s | MFU | sampler rows/sample "
            "(needed) | sampling share |", "|" + "---|" * 13]
    for r in results:
        stage, impl = r["label"].split(" ", 1)
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        sampler = ""
        if "sampler_rows_per_sample" in r:
            sampler = f"{r['sampler_rows_per_sample']:.2f}"
            if "sampler_stops_per_sample" in r:
                sampler += f" ({r['sampler_stops_per_sample']:.2f})"
        share = f"{r['sampling_share']:.0%}" if "sampling_share" in r else ""
        micro = r.get("micro_batch", r["batch"])
        rows.append(f"| {stage} | {impl.strip('()')} | {r['backbone']} | {r['resolution']} | {micro} x "
                    f"{r['batch'] // micro} | {r['seconds_per_step']:.3f} ({r['seconds_min']:.3f}-"
                    f"{r['seconds_max']:.3f}) | {r['samples_per_s']:.2f} | {r['peak_memory_gb']:.2f} | "
                    f"{r['tflops_per_sample']:.3g} | {r['achieved_tflops']:.3g} | {mfu} | {sampler} | {share} |")
    for stage, backbone in dict.fromkeys((r["label"].split(" ")[0], r["backbone"]) for r in results):
        runs = [r for r in results if (r["label"].split(" ")[0], r["backbone"]) == (stage, backbone)]
        base = next((r for r in runs if r["label"].endswith("(baseline)")), None)
        for ours in runs if base else ():
            if ours is not base:
                work = ours["tflops_per_sample"] / base["tflops_per_sample"]
                rows.append(f"\n{stage} {backbone}: {ours['label'].split(' ', 1)[1].strip('()')} (micro-batch "
                            f"{ours.get('micro_batch', ours['batch'])}) / baseline (micro-batch {base['batch']}) = "
                            f"{ours['samples_per_s'] / base['samples_per_s']:.2f}x samples/s, "
                            f"{ours['peak_memory_gb'] / base['peak_memory_gb']:.2f}x peak memory; ours ran "
                            f"{work:.2f}x the baseline's FLOPs per sample" +
                            (" (it skips sampler rows the baseline runs: the speed-up includes that work)"
                             if work < 0.99 else ""))
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", choices=["gpu", "rehearsal"], default=None,
                        help="a fixed list of rows, most important first (plan_rows): gpu = the full models at "
                             "512 px; rehearsal = the same rows on the tiny models (CPU)")
    parser.add_argument("--only", default="",
                        help="only the rows whose name contains one of these comma-separated parts, e.g. "
                             "'sd35m' or 'sd15 stage1' (names as printed: 'sd15 stage2 ours batch 4 compiled')")
    parser.add_argument("--budget", type=int, default=0,
                        help="seconds for all the rows together (default: --timeout); rows that do not fit are "
                             "listed as skipped")
    parser.add_argument("--arch", choices=["tiny", "tiny-sd3", "sd15", "sd35m"], default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="default: 512 (--plan gpu), else 32")
    parser.add_argument("--batch", type=int, default=2, help="samples per micro-batch")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (compilation, allocator); default 3 (GPU), else 1")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps; default 8 (GPU), else 2; ours' Stage-1 steps are whole windows: 2")
    parser.add_argument("--stages", default="dro,dpo")
    parser.add_argument("--sides", default="ours,baseline", help="which implementations to time")
    parser.add_argument("--points_per_trajectory", type=int, default=0,
                        help="also time Stage 1 with train_dro.py --points_per_trajectory K (0: skip)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="passed to our trainers (default: theirs, on with CUDA)")
    parser.add_argument("--compile_backend", default=None,
                        help="torch.compile backend of our compiled rows (default: inductor; --plan rehearsal: "
                             "eager)")
    parser.add_argument("--sampler_slots", type=int, default=0,
                        help="train_dro.py --sampler_slots of our Stage-1 rows (default: 4 per trajectory of a "
                             "micro-batch at 512 px, at most 64; else 4)")
    parser.add_argument("--timeout", type=int, default=1800,
                        help="seconds for this whole call without --budget: each measurement gets what is left")
    parser.add_argument("--out", default=None, help="write the results here as JSON, after every row")
    parser.add_argument("--workdir", default=None, help="where the random-weight models are saved (default: temp)")
    parser.add_argument("--count_flops", action="store_true",
                        help="only print each row's model FLOPs per step at --batch (no GPU, no weights)")
    parser.add_argument("--proxies", action="store_true",
                        help="only print the CPU proxies (ops per forward, role switch, EMA, compiled graphs, host "
                             "syncs) for ours and the baseline")
    parser.add_argument("--table", default=None, help="only print the markdown table of a results JSON")
    # internal: one measurement, or one model build, in this process
    parser.add_argument("--baseline_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ours_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    trainer_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    gpu = args.plan == "gpu" or (args.plan is None and args.arch in ("sd15", "sd35m"))
    args.resolution = args.resolution or (512 if gpu else 32)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.steps = args.steps or (8 if gpu else 1 if args.plan == "rehearsal" else 2)
    if args.plan == "rehearsal" and args.compile_backend is None:
        args.compile_backend = "eager"
    if args.table:
        return print(markdown_table(json.loads(Path(args.table).read_text())["rows"]))
    if args.baseline_worker:
        return baseline(args)
    if args.ours_worker:
        return ours_worker(args, trainer_argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="realalign-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.build:
        return build_pipeline(args.build, workdir / f"model-{args.build}")
    if args.proxies:
        return print_proxies(workdir)
    if args.count_flops:
        if args.arch not in ("sd15", "sd35m") and not (workdir / f"model-{args.arch}").exists():
            build_pipeline(args.arch, workdir / f"model-{args.arch}")
        return count_flops(args.arch, args.resolution, args.batch, workdir)
    rows = [row for row in plan_rows(args.plan, args)
            if not args.only or any(part in row_name(row) for part in args.only.split(","))]
    run_rows(rows, args, workdir)


if __name__ == "__main__":
    main()
