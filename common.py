"""Shared helpers of the RealAlign reproduction.

RealAlign ("When Preference Labels Fall Short: Aligning Diffusion Models from
Real Data", ICML 2026) trains a diffusion model in two stages:

  Stage 1, Diffusion-DRO (train_dro.py): pull the model toward real photos and
           away from its own samples (hinge loss, `diffusion_dro_loss`).
  Stage 2, Diffusion-DPO (train_dpo.py): prefer each real photo over the same
           photo with its salient region inpainted (`diffusion_dpo_loss`).

This file holds everything the scripts share, in this order:

  1. the losses (pure functions of per-sample errors: copy them anywhere),
  2. small utilities (clear errors, atomic writes, image cropping),
  3. `Backbone`: one interface over SD-1.5 (UNet, epsilon-prediction) and
     SD-3.5-M (MMDiT, flow matching), detected from the loaded pipeline,
  4. LoRA "roles" on one base network (learner / ref / policy) and their EMA,
  5. the pairs CSV and the cache of VAE latents and prompt embeddings,
  6. PickScore (used by curation and evaluation),
  7. the training skeleton both trainers share (flags, state, logging),
  8. tiny random-weight models for tests and the offline smoke run.

Section numbers in comments refer to ../shared/SPEC.md of the project.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger("realalign")


class _DropMessages(logging.Filter):
    """Drops the records of one library logger whose text contains a fragment."""

    def __init__(self, *fragments):
        super().__init__()
        self.fragments = fragments

    def filter(self, record):
        return not any(fragment in record.getMessage() for fragment in self.fragments)


# Known-harmless library notices, silenced at their loggers and nowhere else
# (every other message of these loggers still shows):
# - transformers: without torchvision, CLIPImageProcessor falls back to its PIL
#   version, the one PickScore and CLIP were trained with; nothing to fix.
logging.getLogger("transformers.utils.import_utils").addFilter(
    _DropMessages("requires torchvision (not installed)"))
# - diffusers: saving a pipeline with an absent optional component (the tiny
#   SD-3 has no T5, text_encoder_3=None) warns that None "cannot be saved".
logging.getLogger("diffusers.pipelines.pipeline_utils").addFilter(
    _DropMessages("=None of type <class 'NoneType'> cannot be saved"))


# =============================================================================
# 1. Losses
# =============================================================================
# The losses only see per-sample regression errors, so they work unchanged for
# epsilon-prediction (SD-1.5) and velocity-prediction (SD-3.5-M) models.


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error ||pred - target||^2 / numel, shape [B].

    Mean over every non-batch dimension, computed in float32 whatever the input
    dtype (bf16 errors are too coarse for the small differences the two losses
    below take between model and reference).
    """
    diff = pred.float() - target.float()
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def diffusion_dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta):
    """Diffusion-DPO loss (Wallace et al. 2024, eq. 14; RealAlign Sec. 3.3, SPEC §4).

        inner = (model_err_w - ref_err_w) - (model_err_l - ref_err_l)
        loss  = -mean log sigmoid( -beta/2 * inner )

    `*_err_*` are per-sample errors [B] of the trainable model and the frozen
    reference on the winner (w, the real photo) and loser (l, its inpainted
    copy), both noised with the same noise and timestep. A model that lowers
    its error on the winner relative to the reference (inner < 0) lowers the
    loss.

    Returns (loss, stats); stats are detached floats:
      implicit_acc  fraction of pairs with inner < 0 (the model prefers w)
      reward_margin mean of -inner (> 0 when the model prefers w)
    Note on signs: the implicit reward of a sample is minus its error gap, so
    the reward margin is -inner; both stats rise as training succeeds.
    """
    inner = (model_err_w - ref_err_w) - (model_err_l - ref_err_l)
    loss = -F.logsigmoid(-0.5 * beta * inner).mean()
    with torch.no_grad():
        stats = {
            "implicit_acc": (inner < 0).float().mean().item(),
            "reward_margin": (-inner).mean().item(),
            "inner": inner.mean().item(),
        }
    return loss, stats


def diffusion_dro_loss(model_err_real, model_err_policy, ref_err_real, ref_err_policy, margin=0.001):
    """Diffusion-DRO hinge loss (Diffusion-DRO, Eq. 9; RealAlign Sec. 3.2, SPEC §3).

        D    = (model_err_real - ref_err_real) - (model_err_policy - ref_err_policy)
        loss = mean( max(D + margin, 0) )

    `model_err_real`: error of the trainable model on a real image noised with
    fresh noise, `model_err_policy`: its error against the sampling snapshot's
    own prediction on the snapshot's trajectory, `ref_*`: the same for the
    frozen reference. Pushing D down makes the real images more likely and the
    model's own samples less likely than under the reference.

    Returns (loss, stats); stats are detached floats:
      D           mean of D
      active_frac fraction of samples with D + margin > 0 (hinge not saturated)
    """
    D = (model_err_real - ref_err_real) - (model_err_policy - ref_err_policy)
    loss = torch.clamp(D + margin, min=0).mean()
    with torch.no_grad():
        stats = {"D": D.mean().item(), "active_frac": (D + margin > 0).float().mean().item()}
    return loss, stats


# =============================================================================
# 2. Utilities
# =============================================================================


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def run_main(main):
    """Run `main()`; a UserError ends with one clear message and exit 2."""
    import warnings

    import diffusers
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO, datefmt="%H:%M:%S")
    # keep the console to our own messages: the libraries' loading chatter and
    # peft's "several adapters" note (intended: one adapter per role) are noise
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*peft_config.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def atomic_write(path, write_fn, suffix=None):
    """Write a file through `write_fn(tmp_path)` then rename, so a killed run
    never leaves a half-written file behind (os.replace is atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix)
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save_image(image: Image.Image, path):
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def atomic_write_text(path, text: str):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def replace_dir(tmp_dir, final_dir):
    """Move a fully written folder into place (old one removed only after)."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def check_same_settings(path, settings, what):
    """Refuse to mix outputs made with different settings in one folder: if
    the JSON at `path` (written by an earlier run) differs from `settings`,
    stop with a message naming every changed key. An absent or unreadable
    file passes (the caller writes it)."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text())
    except ValueError:
        return
    changed = [f"{key}: {previous.get(key)!r} -> {value!r}" for key, value in settings.items()
               if previous.get(key) != value]
    if changed:
        raise UserError(f"{what} was made with other settings ({'; '.join(changed)}); use another output folder, "
                        "the same settings to resume, or delete it")


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """SPEC §2 preprocessing: shorter side to `resolution` (Lanczos), then a
    centre crop of resolution x resolution."""
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), Image.LANCZOS)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [-1, 1] (the VAE's input range)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (CPU bf16 kernels are slow and imprecise)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def peak_memory_gb(device) -> float:
    """Peak GPU memory allocated, or the process's peak RSS on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# =============================================================================
# 3. Backbone: one interface over SD-1.5 and SD-3.5-M
# =============================================================================


def load_pipeline(model, dtype=torch.float32, inpainting=False):
    """Load a diffusers pipeline from a hub id or a local folder.

    Components that the folder lists as null (a tiny SD-3 model without T5, say)
    load as None. Any loading failure becomes one UserError naming the model.
    """
    from diffusers import DiffusionPipeline, StableDiffusionInpaintPipeline

    kwargs = {"dtype": dtype}
    index_file = Path(model) / "model_index.json"
    if Path(model).exists() and not index_file.exists():
        raise UserError(f"{model} is a folder but not a diffusers pipeline (no model_index.json)")
    if index_file.exists():
        # pass explicit None for components saved as null (SD-3 without T5)
        for name, value in json.loads(index_file.read_text()).items():
            if isinstance(value, list) and value[0] is None:
                kwargs[name] = None
    cls = StableDiffusionInpaintPipeline if inpainting else DiffusionPipeline
    try:
        pipe = cls.from_pretrained(model, **kwargs)
    except Exception as err:  # OSError, EnvironmentError, HF hub errors, ...
        raise UserError(
            f"could not load the diffusers pipeline '{model}': {type(err).__name__}: {str(err).splitlines()[0]}"
            " (check the hub id or path; offline, use a local folder or SMOKE=1)"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Backbone:
    """The model-specific half of training, for SD-1.5 and SD-3(.5) pipelines.

    The trainers only talk to this class, so they have one code path:

      encode_prompts(prompts)      -> cond dict (prompt_embeds [+ pooled])
      encode_images(pixels)        -> (mean, std) of the VAE latent posterior
      latents_from_posterior(...)  -> a scaled latent x0 (fresh sample)
      sample_timesteps(n, gen)     -> training timesteps t
      add_noise(x0, noise, t)      -> x_t
      target(x0, noise)            -> regression target (eps, or eps - x0)
      predict(net, x_t, t, cond)   -> network output
      policy_trajectory_point(...) -> (x_t, t, prediction) at one random
                                      step of a guidance-free sampling run
    """

    def __init__(self, pipe, device=None, dtype=torch.float32):
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        self.pipe = pipe
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype
        # SD-3 pipelines carry an MMDiT "transformer", SD-1.5 ones a "unet".
        self.is_flow = getattr(pipe, "transformer", None) is not None
        self.kind = "sd3" if self.is_flow else "sd15"
        self.net = pipe.transformer if self.is_flow else pipe.unet
        self.net_name = "transformer" if self.is_flow else "unet"
        self.vae = pipe.vae
        if self.is_flow:
            self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
            self.shift = float(self.scheduler.config.shift)
        else:
            # Training noise follows DDPM whatever sampler the pipeline ships.
            self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.vae_scale = float(self.vae.config.scaling_factor)
        self.vae_shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    # ---- text and images (only used to build the cache and for sampling) ----
    @torch.no_grad()
    def encode_prompts(self, prompts, batch_size=32, max_sequence_length=128):
        """Prompt embeddings, batched. SD-3 also returns pooled embeddings
        (T5 max length 128 as in SPEC §3)."""
        out = {}
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            if self.is_flow:
                embeds, _, pooled, _ = self.pipe.encode_prompt(
                    chunk, chunk, chunk, device=self.device, do_classifier_free_guidance=False,
                    max_sequence_length=max_sequence_length,
                )
                parts = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
            else:
                embeds, _ = self.pipe.encode_prompt(chunk, self.device, 1, False)
                parts = {"prompt_embeds": embeds}
            for key, value in parts.items():
                out.setdefault(key, []).append(value.float().cpu())
        return {key: torch.cat(values) for key, values in out.items()}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor):
        """VAE posterior (mean, std) of images in [-1, 1], in float32.

        Storing the posterior rather than one sample lets every training step
        draw a fresh latent for free (as re-encoding every step would)."""
        posterior = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return posterior.mean.float().cpu(), posterior.std.float().cpu()

    def latents_from_posterior(self, mean, std, generator=None):
        """A fresh latent sample, shifted and scaled as the network expects
        (SD-3: (z - shift) * scale; SD-1.5: z * scale)."""
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return (mean + std * noise - self.vae_shift) * self.vae_scale

    @torch.no_grad()
    def decode(self, latents):
        latents = latents.to(self.vae.dtype) / self.vae_scale + self.vae_shift
        images = self.vae.decode(latents).sample.float().clamp(-1, 1)
        images = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(image) for image in images]

    # ---- the forward process -------------------------------------------------
    def sample_timesteps(self, n, generator=None, device=None):
        """SD-1.5: uniform over the 1000 DDPM steps (integers).
        SD-3: logit-normal u = sigmoid(N(0, 1)) mapped through the flow
        scheduler's shift, sigma = s*u / (1 + (s-1)*u); t = 1000 * sigma."""
        device = device or self.device
        if self.is_flow:
            u = torch.sigmoid(torch.randn(n, generator=generator))
            sigma = self.shift * u / (1 + (self.shift - 1) * u)
            return (sigma * self.num_train_timesteps).to(device)
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(device)

    def _broadcast(self, values, like):
        return values.to(like.device, torch.float32).view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0, noise, t):
        """SD-1.5: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (DDPM add_noise).
        SD-3:   x_t = (1 - sigma) x0 + sigma eps, sigma = t / 1000."""
        if self.is_flow:
            sigma = self._broadcast(t / self.num_train_timesteps, x0)
            return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)
        a = self._broadcast(self.alphas_cumprod[t.long()], x0)
        return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)

    def target(self, x0, noise):
        """Regression target: eps (SD-1.5) or the velocity eps - x0 (SD-3)."""
        return noise - x0 if self.is_flow else noise

    def predict(self, net, x_t, t, cond):
        """One network call; `net` may be the DDP-wrapped or the bare network."""
        x_t = x_t.to(self.dtype)
        embeds = cond["prompt_embeds"].to(x_t.device, self.dtype)
        if self.is_flow:
            pooled = cond["pooled_prompt_embeds"].to(x_t.device, self.dtype)
            return net(hidden_states=x_t, encoder_hidden_states=embeds, pooled_projections=pooled,
                       timestep=t, return_dict=False)[0]
        return net(x_t, t, encoder_hidden_states=embeds, return_dict=False)[0]

    def latent_shape(self, resolution):
        scale = self.pipe.vae_scale_factor
        return (self.net.config.in_channels, resolution // scale, resolution // scale)

    # ---- Stage-1 policy sampling (SPEC §3 step 1) ----------------------------
    @torch.no_grad()
    def policy_trajectory_point(self, net, cond, resolution, num_steps, generator, points_per_trajectory=1):
        """Run the guidance-free sampler with `net` (the frozen snapshot role),
        one trajectory per entry of `cond`, and return the trajectory point
        (x_t, t, prediction at x_t) of one random step k of each. Steps after
        the largest k are never needed, so the loop stops there (exact, and
        half the work on average).

        SD-1.5: DPM-Solver++(2M), `num_steps` steps on the grid
                t_i = offset + step_ratio * (num_steps - 1 - i), with a per-sample
                integer offset in [0, step_ratio) so every training timestep can
                be drawn (the Diffusion-DRO "timestep offset" trick).
        SD-3:   flow-match Euler on the scheduler's shifted sigma grid.

        `points_per_trajectory` K > 1 (opt-in, train_dro.py's flag of the same
        name) returns K points at distinct random steps of each trajectory,
        trajectory-major: [traj0 point0, traj0 point1, ..., traj1 point0, ...].
        """
        n = cond["prompt_embeds"].shape[0]
        K = points_per_trajectory
        x = torch.randn((n, *self.latent_shape(resolution)), generator=generator).to(self.device, torch.float32)
        if K == 1:
            k = torch.randint(0, num_steps, (n, 1), generator=generator)
        else:  # K distinct steps per trajectory
            k = torch.stack([torch.randperm(num_steps, generator=generator)[:K] for _ in range(n)])
        last_step = int(k.max())  # on the CPU: no host sync
        k = k.to(self.device)
        # outputs [n, K, ...], filled with torch.where: no host sync per step
        out_x = torch.zeros((n, K, *x.shape[1:]), device=self.device)
        out_pred = torch.zeros_like(out_x)
        out_t = torch.zeros((n, K), device=self.device, dtype=torch.float32 if self.is_flow else torch.long)

        def record(i, t, prediction):
            hit = k == i  # [n, K]: the points taken at step i
            mask = hit.view(n, K, *([1] * (x.ndim - 1)))
            out_x.copy_(torch.where(mask, x.unsqueeze(1), out_x))
            out_pred.copy_(torch.where(mask, prediction.unsqueeze(1), out_pred))
            out_t.copy_(torch.where(hit, t.unsqueeze(1).to(out_t.dtype), out_t))

        def trajectory_major():  # [n, K, ...] -> [n*K, ...]: traj0 point0, traj0 point1, ...
            return out_x.flatten(0, 1), out_t.flatten(), out_pred.flatten(0, 1)

        if self.is_flow:
            self.scheduler.set_timesteps(num_steps, device=self.device)
            sigmas = self.scheduler.sigmas.to(self.device, torch.float32)
            for i in range(last_step + 1):
                t = (sigmas[i] * self.num_train_timesteps).expand(n)
                velocity = self.predict(net, x, t, cond).float()
                record(i, t, velocity)
                x = x + (sigmas[i + 1] - sigmas[i]) * velocity
            return trajectory_major()

        step_ratio = self.num_train_timesteps // num_steps
        offset = torch.randint(0, step_ratio, (n,), generator=generator).to(self.device)
        alpha_sigma = lambda t: (self.alphas_cumprod[t].sqrt(), (1 - self.alphas_cumprod[t]).sqrt())
        x0_prev, h_prev = None, None
        for i in range(last_step + 1):
            t = offset + step_ratio * (num_steps - 1 - i)
            eps = self.predict(net, x, t, cond).float()
            record(i, t, eps)
            # DPM-Solver++(2M) update to the next grid point (x0-parameterised).
            a_t, s_t = (v.view(-1, 1, 1, 1) for v in alpha_sigma(t))
            x0 = (x - s_t * eps) / a_t
            if i + 1 < num_steps:
                a_n, s_n = (v.view(-1, 1, 1, 1) for v in alpha_sigma(t - step_ratio))
            else:  # the last step lands on the clean image (alpha=1, sigma=0)
                a_n, s_n = torch.ones_like(a_t), torch.zeros_like(s_t)
            h = torch.log(a_n / s_n.clamp_min(1e-12)) - torch.log(a_t / s_t)
            if x0_prev is None:
                d = x0  # first step: first order
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (s_n / s_t) * x - a_n * torch.expm1(-h) * d
            x0_prev, h_prev = x0, h
        return trajectory_major()


# =============================================================================
# 4. LoRA roles on one base network, and their EMA
# =============================================================================
# Three views of one network (SPEC §3, §6.5): the trainable `learner`, the
# frozen reference `ref` and, in Stage 1, the frozen sampling snapshot
# `policy`. Each is a LoRA adapter on the same frozen base weights; switching
# role only changes which adapter is active, so only one network is in memory.

LEARNER, REF, POLICY = "learner", "ref", "policy"

LORA_TARGETS = {
    # SD-1.5: UNet attention projections (SPEC §3)
    "sd15": ["to_q", "to_k", "to_v", "to_out.0"],
    # SD-3.5-M: MMDiT joint-attention projections, image and text stream
    "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
}


def _tuner_layers(net):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in net.modules() if isinstance(module, BaseTunerLayer)]


def role_parameters(net, role):
    """The LoRA parameters of one role, in a fixed order."""
    return [param for name, param in net.named_parameters() if f".{role}." in name]


def use_role(net, role):
    """Make `role` the active adapter. Only the learner's parameters ever
    require gradients, whichever role is active (peft's set_adapter would
    otherwise flip requires_grad as adapters are switched)."""
    for layer in _tuner_layers(net):
        layer.set_adapter(role, inference_mode=True)
    for param in role_parameters(net, LEARNER):
        param.requires_grad_(True)


def copy_role(net, source, dest):
    """dest <- source, weights only (e.g. learner -> policy snapshot)."""
    with torch.no_grad():
        for p_src, p_dst in zip(role_parameters(net, source), role_parameters(net, dest), strict=True):
            p_dst.copy_(p_src)


def setup_lora_roles(backbone, roles, rank, alpha, init_lora=None, seed=0):
    """Add the LoRA roles to the backbone's network.

    Without `init_lora` the learner starts as a fresh LoRA (B = 0, so it equals
    the base network). With it, the learner is loaded from that checkpoint
    (rank and alpha then come from the checkpoint's own metadata). Every other
    role starts as a copy of the learner, so `ref` is "the model at the start
    of the stage" in both cases.
    """
    from peft import LoraConfig

    net = backbone.net
    net.requires_grad_(False)
    # peft draws the LoRA A matrices from the global RNG: seed it, so runs are
    # reproducible and every process starts from the same weights.
    torch.manual_seed(seed)
    if init_lora is not None:
        load_lora_into(backbone, init_lora, adapter_name=LEARNER)
        config = copy.deepcopy(net.peft_config[LEARNER])
    else:
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                            target_modules=LORA_TARGETS[backbone.kind])
        net.add_adapter(copy.deepcopy(config), adapter_name=LEARNER)
    for role in roles:
        if role != LEARNER:
            net.add_adapter(copy.deepcopy(config), adapter_name=role)
            copy_role(net, LEARNER, role)
    # LoRA weights train in fp32 even when the base runs in bf16.
    for role in roles:
        for param in role_parameters(net, role):
            param.data = param.data.float()
    use_role(net, LEARNER)
    return config


def load_lora_into(backbone, lora, adapter_name):
    """Load a LoRA checkpoint (folder or hub id, `load_lora_weights` format)
    into the backbone's network under `adapter_name`; checks it matched."""
    net = backbone.net
    try:
        backbone.pipe.load_lora_weights(lora, adapter_name=adapter_name)
    except Exception as err:
        raise UserError(f"could not load the LoRA '{lora}': {type(err).__name__}: {str(err).splitlines()[0]}") from None
    if adapter_name not in getattr(net, "peft_config", {}) or not role_parameters(net, adapter_name):
        raise UserError(f"the LoRA '{lora}' has no weights for this {backbone.kind} {backbone.net_name} "
                        "(is it a LoRA of the other backbone?)")


@contextlib.contextmanager
def weights_swapped(params, values):
    """Temporarily give `params` the `values` (e.g. the EMA weights); restored
    on exit. `values=None` leaves them as they are."""
    if values is None:
        yield
        return
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, value in zip(params, values, strict=True):
            p.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, backup, strict=True):
                p.copy_(value)


def lora_state_dict(net, role, params=None):
    """The role's LoRA weights, keyed as `load_lora_weights` expects. `params` (same order
    as role_parameters) substitutes other values, e.g. the EMA weights."""
    from peft.utils import get_peft_model_state_dict

    with weights_swapped(role_parameters(net, role), params):
        state = get_peft_model_state_dict(net, adapter_name=role)
        state = {key: value.detach().to("cpu", torch.float32).clone() for key, value in state.items()}
    # PEFT key format ("...to_q.lora_A.weight"): what the SD-1.5 and SD-3
    # loaders of diffusers read (the older "lora.down" format breaks SD-3).
    return state


def save_lora_checkpoint(backbone, state_dict, config, directory):
    """Save LoRA weights so that a stock pipeline's `load_lora_weights(dir)`
    reads them, with the adapter config (rank, alpha, targets) as metadata:
    SD-3.5-M uses alpha != rank and would otherwise load at the wrong scale."""
    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"]) if metadata.get("target_modules") else None
    kwargs = {f"{backbone.net_name}_lora_layers": state_dict,
              f"{backbone.net_name}_lora_adapter_metadata": metadata}
    type(backbone.pipe).save_lora_weights(str(directory), **kwargs)


class LoraEMA:
    """Exponential moving average of the learner's LoRA weights (SPEC §3).

    SD-1.5 follows diffusers' EMAModel defaults: at the n-th update (n = 0, 1,
    ...) decay = 0 for n = 0, else min(max_decay, (1 + n) / (10 + n)).
    SD-3.5-M (flow_grpo): a fixed decay 0.9 applied every 8 optimizer steps.
    """

    def __init__(self, params, max_decay=0.9999, update_every=1, warmup=True):
        self.shadow = [p.detach().clone().float() for p in params]
        self.max_decay, self.update_every, self.warmup = max_decay, update_every, warmup
        self.num_updates = 0

    def decay(self):
        n = self.num_updates
        if not self.warmup:
            return self.max_decay
        return 0.0 if n == 0 else min(self.max_decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def step(self, params, optimizer_step):
        """Call after optimizer step number `optimizer_step` (1-based)."""
        if optimizer_step % self.update_every:
            return
        decay = self.decay()
        for shadow, p in zip(self.shadow, params, strict=True):
            shadow.mul_(decay).add_(p.detach().float(), alpha=1 - decay)
        self.num_updates += 1

    def state_dict(self):
        return {"shadow": self.shadow, "num_updates": self.num_updates}

    def load_state_dict(self, state):
        self.shadow = [s.clone() for s in state["shadow"]]
        self.num_updates = int(state["num_updates"])


def load_network_override(backbone, path):
    """Replace the base UNet/transformer with another one (a folder or hub id,
    at its root or in a unet/transformer subfolder), for the complementarity
    experiments (SPEC §4, e.g. mhdang/dpo-sd1.5-text2image-v1)."""
    cls = type(backbone.net)
    errors = []
    for subfolder in (None, backbone.net_name):
        try:
            net = cls.from_pretrained(path, subfolder=subfolder, dtype=backbone.net.dtype)
            break
        except Exception as err:
            errors.append(f"{type(err).__name__}: {str(err).splitlines()[0]}")
    else:
        raise UserError(f"could not load a {cls.__name__} from '{path}' ({'; '.join(errors)})")
    if net.config.get("in_channels") != backbone.net.config.get("in_channels"):
        raise UserError(f"'{path}' does not fit this pipeline's {backbone.net_name}")
    setattr(backbone.pipe, backbone.net_name, net)
    backbone.net = net
    return net


# =============================================================================
# 5. Pairs CSV and the input cache
# =============================================================================

PAIR_COLUMNS = ["uid", "prompt", "real_image_path", "fake_image_path"]
# the public trainers' names for the same columns (SPEC §6.1)
PAIR_ALIASES = {"win_image_path": "real_image_path", "lose_image_path": "fake_image_path", "caption": "prompt"}


def read_pairs_csv(path, need_fake=True):
    """Read a pairs CSV (curate.py's schema, SPEC §2; win/lose names accepted).

    Image paths may be relative to the CSV's folder. Returns a list of dicts
    with absolute paths; every problem is a UserError that names it."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise UserError(f"pairs CSV not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [PAIR_ALIASES.get(col, col) for col in (reader.fieldnames or [])]
        rows = [{PAIR_ALIASES.get(k, k): v for k, v in row.items()} for row in reader]
    required = ["prompt", "real_image_path"] + (["fake_image_path"] if need_fake else [])
    missing = [col for col in required if col not in header]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)} (has: {', '.join(header) or 'nothing'})")
    if not rows:
        raise UserError(f"{path} has no rows")
    pairs = []
    for i, row in enumerate(rows):
        pair = {"uid": row.get("uid") or str(i), "prompt": row["prompt"] or ""}
        for col in required[1:]:
            image_path = Path(row[col] or "")
            image_path = image_path if image_path.is_absolute() else path.parent / image_path
            if not row[col] or not image_path.is_file():
                raise UserError(f"{path}, row {i + 2}: {col} '{row[col]}' is not a file")
            pair[col] = str(image_path)
        pairs.append(pair)
    return pairs


def cache_key(model_name, resolution, pairs_csv, need_fake):
    digest = hashlib.sha256()
    for part in (str(model_name), str(resolution), str(need_fake)):
        digest.update(part.encode() + b"\0")
    digest.update(Path(pairs_csv).read_bytes())
    return digest.hexdigest()[:16]


def build_input_cache(backbone, pairs, resolution, cache_file, need_fake=True, batch_size=8, progress=True):
    """Encode every image and prompt once (SPEC §6.5) and save with safetensors.

    Stored, for N pairs and the U unique prompts (index 0 = the empty prompt,
    used for caption dropout):
      real_mean, real_std  [N, 2, C, h, w] VAE posterior of the real image,
                           unflipped (index 0) and horizontally flipped (1)
      fake_mean, fake_std  the same for the inpainted image (Stage 2)
      prompt_embeds        [U, L, D] (and pooled_prompt_embeds [U, D] for SD-3)
      prompt_index         [N] row -> prompt
    The flipped image is encoded separately: flipping a latent is not exactly
    the latent of the flipped image.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    prompts = [""] + sorted({pair["prompt"] for pair in pairs})
    prompt_id = {prompt: i for i, prompt in enumerate(prompts)}
    # the text encoders (T5-XXL alone is ~9.5 GB for SD-3.5-M) visit the device
    # only for this one pass; training reads the cached embeddings
    encoders = [getattr(backbone.pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    encoders = [encoder for encoder in encoders if encoder is not None]
    for encoder in encoders:
        encoder.to(backbone.device)
    tensors = dict(backbone.encode_prompts(prompts))
    for encoder in encoders:
        encoder.to("cpu")
    if backbone.device.type == "cuda":
        torch.cuda.empty_cache()
    tensors["prompt_index"] = torch.tensor([prompt_id[p["prompt"]] for p in pairs])
    sides = ["real"] + (["fake"] if need_fake else [])
    for side in sides:
        means, stds = [], []
        for start in tqdm(range(0, len(pairs), batch_size), desc=f"encoding {side} images", disable=not progress):
            batch = []
            for pair in pairs[start : start + batch_size]:
                try:
                    image = center_crop_resize(Image.open(pair[f"{side}_image_path"]), resolution)
                except Exception as err:
                    raise UserError(f"cannot read {pair[f'{side}_image_path']}: {err}") from None
                pixels = pil_to_tensor(image)
                batch += [pixels, pixels.flip(-1)]
            mean, std = backbone.encode_images(torch.stack(batch))
            means.append(mean.view(-1, 2, *mean.shape[1:]))
            stds.append(std.view(-1, 2, *std.shape[1:]))
        tensors[f"{side}_mean"], tensors[f"{side}_std"] = torch.cat(means), torch.cat(stds)
    tensors = {key: value.contiguous() for key, value in tensors.items()}
    atomic_write(cache_file, lambda tmp: save_file(tensors, tmp), suffix=".safetensors")
    return tensors


def load_or_build_cache(backbone, model_name, pairs_csv, pairs, resolution, cache_dir, need_fake, accelerator):
    """The cache for (model, resolution, CSV content): built by the main
    process if missing (a changed CSV or model gives a new key), read by all."""
    from safetensors.torch import load_file

    cache_file = Path(cache_dir) / f"inputs-{cache_key(model_name, resolution, pairs_csv, need_fake)}.safetensors"
    if accelerator.is_main_process and not cache_file.exists():
        logger.info("building the input cache %s", cache_file)
        build_input_cache(backbone, pairs, resolution, cache_file, need_fake)
    accelerator.wait_for_everyone()
    return load_file(str(cache_file))


def cond_from_cache(cache, prompt_ids, device):
    """Prompt embeddings of the given prompt indices, as a cond dict."""
    cond = {"prompt_embeds": cache["prompt_embeds"][prompt_ids].to(device)}
    if "pooled_prompt_embeds" in cache:
        cond["pooled_prompt_embeds"] = cache["pooled_prompt_embeds"][prompt_ids].to(device)
    return cond


def cat_cond(*conds):
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


# =============================================================================
# 6. PickScore (SPEC §2): curation filter and evaluation metric
# =============================================================================


class PickScorer:
    """Raw PickScore: exp(logit_scale) * cos(image embedding, text embedding),
    both L2-normalised, text truncated to 77 tokens (SPEC §2). Raw units
    (about 20-23 for SD images); never divided by 26."""

    def __init__(self, model="yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                 device=None, dtype=None):
        from transformers import AutoProcessor, CLIPModel

        self.device = torch.device(device) if device else default_device()
        dtype = dtype or default_dtype(self.device)
        try:
            self.processor = AutoProcessor.from_pretrained(processor)
            self.model = CLIPModel.from_pretrained(model, dtype=dtype).to(self.device).eval()
        except Exception as err:
            raise UserError(f"could not load PickScore ({model}, {processor}): {type(err).__name__}: "
                            f"{str(err).splitlines()[0]}") from None

    @torch.no_grad()
    def __call__(self, images, prompts, batch_size=32):
        scores = []
        for start in range(0, len(images), batch_size):
            inputs = self.processor(images=list(images[start : start + batch_size]),
                                    text=list(prompts[start : start + batch_size]),
                                    padding="max_length", truncation=True, max_length=77, return_tensors="pt")
            inputs = {key: value.to(self.device) for key, value in inputs.items()}
            image_embeds = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.model.dtype))
            text_embeds = self.model.get_text_features(input_ids=inputs["input_ids"],
                                                       attention_mask=inputs.get("attention_mask"))
            image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
            text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
            cosine = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
            scores.append((self.model.logit_scale.exp().float() * cosine).cpu())
        return torch.cat(scores).numpy() if scores else np.zeros(0, dtype=np.float32)


# =============================================================================
# 7. The training skeleton shared by train_dro.py and train_dpo.py
# =============================================================================
# Both stages are "compute per-sample errors of the learner and the reference
# on a concatenated batch, take a loss, accumulate to an effective batch of
# 256". What differs (the loss, and where the second half of the batch comes
# from) lives in the two scripts; the rest is here, once.

# The paper's defaults (SPEC §3 and §4); a flag the user gives wins. What a
# backbone keeps in both stages, then what each stage sets.
BACKBONE_DEFAULTS = {
    "sd15": dict(lora_rank=4, lora_alpha=4, weight_decay=0.01, train_batch_size=4, ema_decay=0.9999, ema_every=1,
                 ema_warmup=True, guidance_scale=7.5),
    "sd3": dict(lora_rank=32, lora_alpha=64, weight_decay=1e-4, train_batch_size=1, ema_decay=0.9, ema_every=8,
                ema_warmup=False, guidance_scale=4.5),
}
STAGE_DEFAULTS = {
    "dro": {"sd15": dict(learning_rate=1e-4, lr_warmup_steps=0, max_train_steps=3200, use_ema=True, sampler_steps=20),
            "sd3": dict(learning_rate=2e-4, lr_warmup_steps=0, max_train_steps=3200, use_ema=True, sampler_steps=10)},
    "dpo": {"sd15": dict(learning_rate=2.56e-6, lr_warmup_steps=125, max_train_steps=1000, use_ema=False, beta=2000.0),
            "sd3": dict(learning_rate=2.56e-6, lr_warmup_steps=0, max_train_steps=1000, use_ema=False, beta=100.0)},
}


BACKBONE_NAMES = {"sd15": "SD-1.5", "sd3": "SD-3.5-M"}


def _show_default(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and 0 < abs(value) < 1e-3:  # 1e-4, 2.56e-6: as the paper writes them
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def backbone_default_help(key, stage):
    """'default: SD-1.5: 1e-4, SD-3.5-M: 2e-4' for a flag that defaults to
    None and is filled in per backbone by `apply_backbone_defaults`; read from
    BACKBONE_DEFAULTS / STAGE_DEFAULTS so --help cannot drift from the code."""
    shown = {kind: _show_default({**BACKBONE_DEFAULTS[kind], **STAGE_DEFAULTS[stage][kind]}[key])
             for kind in BACKBONE_NAMES}
    if len(set(shown.values())) == 1:
        return f"default: {shown['sd15']} for both backbones"
    return "default: " + ", ".join(f"{BACKBONE_NAMES[kind]}: {value}" for kind, value in shown.items())


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help that shows every flag's default exactly once: argparse's
    "(default: X)", unless the help text already states its default (the
    backbone-dependent ones state both values), and "(required)" for a
    required flag, whose None default means nothing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required:
            return text if "required" in text else f"{text} (required)".strip()
        if "default" in text.lower():
            return text
        return super()._get_help_string(action)


def add_training_args(parser, stage):
    """Flags both trainers share (`stage`: "dro" or "dpo", for the stated
    defaults). Those whose default depends on the backbone default to None
    and are filled in by `apply_backbone_defaults`."""
    parser.formatter_class = HelpFormatter

    def paper(key):  # the paper's per-backbone default, for the help text
        return f"({backbone_default_help(key, stage)})"

    g = parser.add_argument_group("model and data")
    g.add_argument("--pretrained_model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="hub id or local folder of an SD-1.5- or SD-3-style diffusers pipeline "
                        "(stabilityai/stable-diffusion-3.5-medium for the SD-3.5-M runs)")
    g.add_argument("--pairs", default=None,
                   help="pairs CSV written by curate.py (win/lose column names accepted); needed unless "
                        "--benchmark_steps (default: none)")
    g.add_argument("--output_dir", required=True, help="checkpoints, state/, metrics.jsonl and args.json go here")
    g.add_argument("--init_lora", default=None,
                   help="start from this LoRA (folder or hub id, load_lora_weights format); it is also the reference "
                        "(default: none, a fresh LoRA on the base model)")
    g.add_argument("--init_unet", "--init_transformer", dest="init_network", default=None,
                   help="replace the pipeline's UNet/transformer by this one first (complementarity runs, "
                        "e.g. mhdang/dpo-sd1.5-text2image-v1) (default: none, the pipeline's own)")
    g.add_argument("--resolution", type=int, default=512, help="training resolution in pixels")
    g.add_argument("--cache_dir", default=None, help="input cache folder (default: OUTPUT_DIR/../cache)")
    g = parser.add_argument_group("optimisation (unset = the paper's value for the backbone)")
    g.add_argument("--train_batch_size", type=int, default=None,
                   help=f"per-device micro-batch {paper('train_batch_size')}")
    g.add_argument("--effective_batch_size", type=int, default=256,
                   help="samples per optimizer step over all processes; accumulation = this / (batch x processes)")
    g.add_argument("--max_train_steps", type=int, default=None, help=f"optimizer steps {paper('max_train_steps')}")
    g.add_argument("--learning_rate", type=float, default=None,
                   help=f"AdamW learning rate, constant after the warm-up {paper('learning_rate')}")
    g.add_argument("--lr_warmup_steps", type=int, default=None,
                   help=f"linear warm-up, then constant {paper('lr_warmup_steps')}")
    g.add_argument("--weight_decay", type=float, default=None, help=f"AdamW weight decay {paper('weight_decay')}")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--lora_rank", type=int, default=None,
                   help=f"LoRA rank; ignored with --init_lora {paper('lora_rank')}")
    g.add_argument("--lora_alpha", type=int, default=None, help=f"LoRA alpha {paper('lora_alpha')}")
    g.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=None,
                   help=f"checkpoints hold an EMA of the LoRA weights {paper('use_ema')}")
    g.add_argument("--ema_decay", type=float, default=None,
                   help=f"EMA decay; SD-1.5 warms it up {paper('ema_decay')}")
    g.add_argument("--ema_every", type=int, default=None,
                   help=f"EMA update interval in optimizer steps {paper('ema_every')}")
    g.add_argument("--no_flip", action="store_true", help="disable the random horizontal flip")
    g.add_argument("--seed", type=int, default=0, help="seeds the LoRA init and every random draw of training")
    g = parser.add_argument_group("run")
    g.add_argument("--checkpoint_every", type=int, default=100, help="save a checkpoint and the state every N steps")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/state")
    g.add_argument("--sample_grid_steps", type=int, default=25,
                   help="sampling steps of the image grid saved with each checkpoint; 0 disables the grid")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help=f"CFG of the checkpoint grids {paper('guidance_scale')}")
    g.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for activation memory")
    g.add_argument("--benchmark_steps", type=int, default=0,
                   help="time N optimizer steps with random inputs (no CSV needed; see README 'Throughput')")
    return parser


def apply_backbone_defaults(args, stage, kind):
    for key, value in {**BACKBONE_DEFAULTS[kind], **STAGE_DEFAULTS[stage][kind]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def check_run_dir(args):
    """Refuse what would start training on bad ground, before loading models."""
    state = Path(args.output_dir) / "state"
    if args.resume and not (state / "training_state.pt").exists():
        raise UserError(f"--resume: no saved state in {state}")
    if not args.resume and state.exists():
        raise UserError(f"{args.output_dir} already holds a run (state/); pass --resume or use another --output_dir")
    for flag in ("train_batch_size", "effective_batch_size", "checkpoint_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be >= 1 (got {value})")


def gradient_accumulation(args, num_processes):
    """Effective batch = per-device batch x processes x accumulation (SPEC §3)."""
    per_step = args.train_batch_size * num_processes
    if args.effective_batch_size % per_step:
        raise UserError(f"--effective_batch_size {args.effective_batch_size} is not a multiple of "
                        f"--train_batch_size {args.train_batch_size} x {num_processes} processes")
    return args.effective_batch_size // per_step


def prepare_training(args, stage, need_fake):
    """Everything before the first step: checks, accelerator, models, defaults,
    LoRA start point and the input cache. Returns (accelerator, backbone,
    pairs, cache, grad_accum)."""
    from accelerate import Accelerator

    check_run_dir(args)
    if not args.pairs and not args.benchmark_steps:
        raise UserError("--pairs is required (the pairs CSV written by curate.py)")
    pairs = read_pairs_csv(args.pairs, need_fake=need_fake) if not args.benchmark_steps else None
    use_cuda = torch.cuda.is_available()
    # cpu=True without GPUs: only then does accelerate join the gloo group that
    # torchrun sets up (otherwise every process would train on its own)
    accelerator = Accelerator(mixed_precision="bf16" if use_cuda else "no", cpu=not use_cuda)
    if use_cuda:  # TF32 matmuls for whatever autocast leaves in fp32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    weight_dtype = torch.bfloat16 if use_cuda else torch.float32
    pipe = load_pipeline(args.pretrained_model, dtype=weight_dtype)
    pipe.vae.to(torch.float32)
    backbone = Backbone(pipe, accelerator.device, weight_dtype)
    apply_backbone_defaults(args, stage, backbone.kind)
    grad_accum = gradient_accumulation(args, accelerator.num_processes)
    if args.init_network:
        load_network_override(backbone, args.init_network)
    # the VAE stays in fp32: latents are encoded once and decoded for grids only
    pipe.vae.to(accelerator.device)
    backbone.net.to(accelerator.device)
    if args.gradient_checkpointing:
        backbone.net.enable_gradient_checkpointing()
    cache = None
    if pairs is not None:
        cache_dir = args.cache_dir or str(Path(args.output_dir).resolve().parent / "cache")
        model_name = f"{args.pretrained_model}|{args.init_network}|{backbone.kind}"
        cache = load_or_build_cache(backbone, model_name, args.pairs, pairs, args.resolution, cache_dir,
                                    need_fake, accelerator)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    args.num_processes, args.gradient_accumulation_steps = accelerator.num_processes, grad_accum
    if accelerator.is_main_process:
        atomic_write_text(Path(args.output_dir) / "args.json", json.dumps(vars(args), indent=2, default=str))
        logger.info("%s on %s: %d processes x batch %d x accumulation %d = %d samples per step",
                    backbone.kind, accelerator.device, accelerator.num_processes, args.train_batch_size,
                    grad_accum, args.effective_batch_size)
    return accelerator, backbone, pairs, cache, grad_accum


def micro_batch_rows(step, micro, grad_accum, rank, world, batch_size, num_rows, seed):
    """Rows of the cache for one micro-batch: a seeded permutation per epoch,
    read in order. A function of the step alone, so resuming needs no
    data-loader state and every process reads different rows."""
    start = (((step - 1) * grad_accum + micro) * world + rank) * batch_size
    rows = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, num_rows)
        rows.append(int(_epoch_permutation(num_rows, seed, epoch)[offset]))
    return torch.tensor(rows)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_rows, seed, epoch):
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def sample_inputs(backbone, cache, rows, generator, sides, caption_dropout=0.0, flip=True):
    """Clean latents x0 for each side ("real", "fake") of the given rows and
    their prompt embeddings. The two sides of a pair share one flip (SPEC
    §4, §6.2: the fake is pixel-aligned with the real image). A dropped
    caption (probability `caption_dropout`) becomes the empty prompt."""
    n = len(rows)
    flip_index = torch.randint(0, 2, (n,), generator=generator) if flip else torch.zeros(n, dtype=torch.long)
    x0 = {}
    for side in sides:
        mean, std = cache[f"{side}_mean"][rows, flip_index], cache[f"{side}_std"][rows, flip_index]
        x0[side] = backbone.latents_from_posterior(mean, std, generator).to(backbone.device)
    prompt_ids = cache["prompt_index"][rows].clone()
    if caption_dropout > 0:
        prompt_ids[torch.rand(n, generator=generator) < caption_dropout] = 0  # index 0 = ""
    return x0, cond_from_cache(cache, prompt_ids, backbone.device)


def random_inputs(backbone, n, resolution, generator, sides):
    """Random latents and embeddings of the right shapes (--benchmark_steps)."""
    shape = (n, *backbone.latent_shape(resolution))
    x0 = {side: torch.randn(shape, generator=generator).to(backbone.device) for side in sides}
    net_config = backbone.net.config
    if backbone.is_flow:
        cond = {"prompt_embeds": torch.randn(n, 77 + 128, net_config.joint_attention_dim, generator=generator),
                "pooled_prompt_embeds": torch.randn(n, net_config.pooled_projection_dim, generator=generator)}
    else:
        cond = {"prompt_embeds": torch.randn(n, 77, net_config.cross_attention_dim, generator=generator)}
    return x0, {key: value.to(backbone.device) for key, value in cond.items()}


def learner_and_ref_errors(backbone, x_t, t, cond, target):
    """Per-sample errors of the learner (with grad) and of the frozen reference
    (no grad) on one concatenated batch: one forward each (SPEC §6.5)."""
    net = backbone.net
    use_role(net, REF)
    with torch.no_grad():
        ref_err = per_sample_mse(backbone.predict(net, x_t, t, cond), target)
    use_role(net, LEARNER)
    model_err = per_sample_mse(backbone.predict(net, x_t, t, cond), target)
    return model_err, ref_err


def make_optimizer(args, params):
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay, eps=args.adam_epsilon,
                                  fused=torch.cuda.is_available())
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.lr_warmup_steps)
    return optimizer, lr_scheduler


def all_reduce_gradients(params, accelerator):
    """Average the LoRA gradients over processes: one flat all-reduce of a few
    MB, instead of wrapping the whole network in DDP."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def save_training_state(args, accelerator, step, backbone, roles, optimizer, lr_scheduler, ema, generator):
    """OUTPUT_DIR/state: everything `--resume` needs, written atomically."""
    state_dir = Path(args.output_dir) / "state"
    tmp = state_dir.with_name("state.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save({"generator": generator.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(), "python": random.getstate()},
               tmp / f"rng_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "ema": ema.state_dict() if ema else None, "num_processes": accelerator.num_processes,
                    "roles": {role: [p.detach().cpu() for p in role_parameters(backbone.net, role)]
                              for role in roles}},
                   tmp / "training_state.pt")
        replace_dir(tmp, state_dir)
    accelerator.wait_for_everyone()


def load_training_state(args, accelerator, backbone, roles, optimizer, lr_scheduler, ema, generator):
    """Restore OUTPUT_DIR/state; returns the step it was saved at."""
    state_dir = Path(args.output_dir) / "state"
    state = torch.load(state_dir / "training_state.pt", map_location="cpu", weights_only=False)
    if state["num_processes"] != accelerator.num_processes:
        raise UserError(f"the state was saved with {state['num_processes']} processes, this run has "
                        f"{accelerator.num_processes}: resume with the same number")
    with torch.no_grad():
        for role in roles:
            for p, value in zip(role_parameters(backbone.net, role), state["roles"][role], strict=True):
                p.copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    rng = torch.load(state_dir / f"rng_rank{accelerator.process_index}.pt", weights_only=False)
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return int(state["step"])


class MetricsLog:
    """OUTPUT_DIR/metrics.jsonl, one line per optimizer step (main process).
    On resume, lines past the resumed step are dropped, so the file always
    matches the weights."""

    def __init__(self, path, resume_step, enabled):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            kept = []
            if resume_step and self.path.exists():
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# Figures are drawn with matplotlib's object API on the Agg canvas: no display
# needed, and no pyplot global state shared between runs in one process.
def new_figure(width, height, dpi=100):
    """An empty matplotlib Figure of width x height inches on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path):
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def wrap_text(text, width, max_lines=None):
    """`text` wrapped to lines of `width` characters, cut to `max_lines` with an ellipsis."""
    import textwrap

    lines = textwrap.wrap(" ".join(str(text).split()), width) or [""]
    if max_lines and len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 1] + "…"
    return "\n".join(lines)


# What each quantity of metrics.jsonl is: the panel titles of curves.png, in
# panel order. Keys a run does not log (Stage 2 has no D) get no panel.
CURVE_TITLES = {
    "loss": "training loss (mean over the effective batch)",
    "D": "DRO margin term D: learner − ref gap, real vs policy (below 0: real favoured)",
    "active_frac": "DRO: share of samples with D + margin > 0 (hinge active)",
    "implicit_acc": "DPO implicit accuracy: share of pairs where the learner prefers the real photo",
    "reward_margin": "DPO reward margin: −[(learner − ref) on real − (learner − ref) on fake]",
    "model_err_real": "learner error on real images",
    "ref_err_real": "reference error on real images",
    "model_err_policy": "learner error on policy samples (target: the snapshot's prediction)",
    "ref_err_policy": "reference error on policy samples",
    "model_err_w": "learner error on the real photo (winner)",
    "ref_err_w": "reference error on the real photo (winner)",
    "model_err_l": "learner error on the inpainted fake (loser)",
    "ref_err_l": "reference error on the inpainted fake (loser)",
    "grad_norm": "gradient norm before clipping (clipped to --max_grad_norm)",
    "lr": "learning rate",
    "samples_per_s": "throughput: samples per second",
}
CURVE_KEYS = tuple(CURVE_TITLES)
CURVE_SMOOTHING = 0.9


def smooth_curve(values, weight=CURVE_SMOOTHING):
    """Exponential moving average with bias correction (TensorBoard's
    smoothing): s_t = weight * s_(t-1) + (1 - weight) * x_t, s_0 = 0, shown as
    s_t / (1 - weight^t), so the first points are not pulled toward 0.
    Written out because numpy has no EMA and pandas is not a dependency."""
    smoothed, running = [], 0.0
    for t, value in enumerate(values, start=1):
        running = weight * running + (1 - weight) * value
        smoothed.append(running / (1 - weight**t))
    return smoothed


def curve_panels(records, keys=CURVE_KEYS):
    """(key, title) of each panel curves.png draws for these metrics.jsonl records."""
    return [(key, CURVE_TITLES.get(key, key)) for key in keys
            if records and all(isinstance(r.get(key), (int, float)) for r in records)]


def plot_training_curves(metrics_path, path, keys=CURVE_KEYS):
    """OUTPUT_DIR/curves.png: one panel per logged quantity against the
    optimizer step, the per-step value (thin) under its smoothed curve (thick,
    `smooth_curve`). Returns the panels drawn, as `curve_panels`."""
    from matplotlib.ticker import MaxNLocator

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    panels = curve_panels(records, keys)
    if not panels:
        return panels
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = new_figure(5.2 * columns, 3.3 * rows + 0.6)
    figure.suptitle(f"{Path(path).parent.name}: training curves over {len(records)} optimizer steps "
                    f"(thin: each step; thick: EMA, weight {CURVE_SMOOTHING}, bias-corrected)", fontsize=12)
    steps = [r["step"] for r in records]
    for i, (key, title) in enumerate(panels):
        ax = figure.add_subplot(rows, columns, i + 1)
        values = [r[key] for r in records]
        ax.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=1, marker="o" if len(steps) < 30 else None,
                markersize=3, label="per step")
        ax.plot(steps, smooth_curve(values), color="tab:blue", linewidth=2, label="EMA")
        low, high = min(values), max(values)
        scale = max(abs(low), abs(high))
        if high - low <= 1e-9 * scale or high == low:  # a constant series: pad the range, or ticks repeat
            pad = 0.1 * scale if scale > 0 else 1.0
            ax.set_ylim(low - pad, high + pad)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))  # 1e-4, not 0.0001000
        ax.set_title(wrap_text(title, 52), fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    save_figure(figure, path)
    return panels


def checkpoint_grid_prompts(args, prompt_ids):
    """The captions behind cached prompt indices: the cache holds only
    embeddings, of "" followed by the pairs' unique captions, sorted
    (`build_input_cache`)."""
    prompts = [""] + sorted({pair["prompt"] for pair in read_pairs_csv(args.pairs, need_fake=False)})
    return [prompts[i] for i in prompt_ids]


def save_sample_grid(images, prompts, seeds, path, title=None):
    """A grid.png of sampled images: one column per prompt, its text above,
    and one row per seed, named at the left. `images` are row-major (all
    prompts of the first seed, then the next seed), as `generate_grid_images`
    returns them. Small images are shown enlarged to about 260 px."""
    cell = 2.6  # inches per image: the prompt text stays legible at 8 pt
    width_px = images[0].size[0]
    # height: the images, the prompts above the first row (up to 4 lines), the title
    figure = new_figure(cell * len(prompts) + 0.5, (cell + 0.1) * len(seeds) + 0.7 + (0.3 if title else 0),
                        dpi=max(100, round(width_px / cell)))  # never below the images' own resolution
    if title:
        figure.suptitle(title, fontsize=10)
    for row, seed in enumerate(seeds):
        for column, prompt in enumerate(prompts):
            ax = figure.add_subplot(len(seeds), len(prompts), row * len(prompts) + column + 1)
            image = images[row * len(prompts) + column]
            ax.imshow(image, interpolation="nearest" if width_px < 128 else "antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(wrap_text(prompt or "(empty prompt)", 34, max_lines=4), fontsize=8)
            if column == 0:
                ax.set_ylabel(f"seed {seed}", fontsize=9)
    save_figure(figure, path)


@torch.no_grad()
def save_checkpoint(args, accelerator, step, backbone, lora_config, params, ema, cache, sample_prompt_ids):
    """OUTPUT_DIR/checkpoint-STEP: the (EMA) LoRA in load_lora_weights format
    and, unless disabled, a grid of fixed prompts x seeds made with it."""
    if not accelerator.is_main_process:
        return
    final = Path(args.output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = ema.shadow if ema is not None else None
    save_lora_checkpoint(backbone, lora_state_dict(backbone.net, LEARNER, weights), lora_config, tmp)
    if args.sample_grid_steps > 0 and cache is not None:
        use_role(backbone.net, LEARNER)
        seeds = (0, 1)
        with weights_swapped(params, weights):  # the grid shows the checkpoint's (EMA) weights
            images = generate_grid_images(backbone, cache, sample_prompt_ids, args, seeds=seeds)
        save_sample_grid(images, checkpoint_grid_prompts(args, sample_prompt_ids), seeds, tmp / "grid.png",
                         title=f"{final.name}{' (EMA weights)' if ema is not None else ''}: "
                               f"{args.sample_grid_steps} steps, guidance {args.guidance_scale}")
    replace_dir(tmp, final)
    metrics_path = Path(args.output_dir) / "metrics.jsonl"
    if metrics_path.exists():
        plot_training_curves(metrics_path, Path(args.output_dir) / "curves.png")
    logger.info("saved %s", final)


def generate_grid_images(backbone, cache, prompt_ids, args, seeds):
    """Images of the given cached prompts, one row per seed, with CFG."""
    n = len(prompt_ids)
    cond = cond_from_cache(cache, torch.tensor(prompt_ids), backbone.device)
    uncond = cond_from_cache(cache, torch.zeros(n, dtype=torch.long), backbone.device)
    kwargs = {"prompt_embeds": cond["prompt_embeds"], "negative_prompt_embeds": uncond["prompt_embeds"]}
    if backbone.is_flow:
        kwargs.update(pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                      negative_pooled_prompt_embeds=uncond["pooled_prompt_embeds"])
    kwargs = {key: value.to(backbone.dtype) for key, value in kwargs.items()}
    images = []
    autocast = torch.autocast("cuda", torch.bfloat16) if backbone.device.type == "cuda" else contextlib.nullcontext()
    for seed in seeds:
        generator = [torch.Generator().manual_seed(seed) for _ in range(n)]
        with autocast:
            images += backbone.pipe(**kwargs, num_inference_steps=args.sample_grid_steps, guidance_scale=args.guidance_scale,
                                    height=args.resolution, width=args.resolution, generator=generator).images
    return images


def optimize(args, accelerator, backbone, roles, lora_config, cache, grad_accum, micro_batch_loss,
             after_optimizer_step=None):
    """The training loop both stages share.

    `micro_batch_loss(rows, generator)` returns (loss, stats dict of floats)
    for one micro-batch; this function accumulates it to the effective batch,
    averages gradients over processes, clips, steps AdamW, updates the EMA,
    logs, checkpoints, and resumes. `after_optimizer_step(step)` runs after
    each optimizer step (Stage 1 refreshes its sampling snapshot there).
    """
    from tqdm.auto import tqdm

    net = backbone.net
    params = role_parameters(net, LEARNER)
    optimizer, lr_scheduler = make_optimizer(args, params)
    ema = LoraEMA(params, args.ema_decay, args.ema_every, args.ema_warmup) if args.use_ema else None
    # One generator per process drives every random choice of the step (rows'
    # flips, noise, timesteps, caption dropout, policy samples), so a resumed
    # run draws exactly what an uninterrupted one would (SPEC §6.4, §6.6).
    generator = torch.Generator().manual_seed(args.seed * 1000 + accelerator.process_index)
    seed_everything(args.seed + accelerator.process_index)
    start_step = 0
    if args.resume:
        start_step = load_training_state(args, accelerator, backbone, roles, optimizer, lr_scheduler, ema, generator)
        logger.info("resumed from step %d", start_step)
    if accelerator.num_processes > 1:  # every process must hold the same LoRA weights
        checksum = torch.stack([p.detach().double().sum() for p in params]).sum().view(1).to(backbone.device)
        if not torch.allclose(accelerator.gather(checksum), checksum):
            raise RuntimeError("the processes start from different LoRA weights")
    metrics = MetricsLog(Path(args.output_dir) / "metrics.jsonl", start_step,
                         accelerator.is_main_process and not args.benchmark_steps)
    num_rows = len(cache["prompt_index"]) if cache is not None else 0
    sample_prompt_ids = sorted(set(cache["prompt_index"][:4].tolist())) if cache is not None else []
    max_steps = args.benchmark_steps or args.max_train_steps
    if start_step >= max_steps:
        logger.info("already finished (%d steps)", start_step)
    # the bar moves per micro-batch: with a large effective batch on few
    # devices one optimizer step is many micro-batches (the step is in the postfix)
    progress = tqdm(total=max_steps * grad_accum, initial=start_step * grad_accum, unit="micro-batch",
                    desc="training", disable=not accelerator.is_main_process)
    if backbone.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backbone.device)
    records = []
    for step in range(start_step + 1, max_steps + 1):
        step_start = time.perf_counter()
        totals = {}
        for micro in range(grad_accum):
            rows = None
            if cache is not None:
                rows = micro_batch_rows(step, micro, grad_accum, accelerator.process_index,
                                        accelerator.num_processes, args.train_batch_size, num_rows, args.seed)
            with accelerator.autocast():  # bf16 on GPU, a no-op on CPU
                loss, stats = micro_batch_loss(rows, generator)
            (loss / grad_accum).backward()
            stats["loss"] = loss.detach()
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value / grad_accum
            progress.update(1)
            if step == start_step + 1 and micro == 0 and grad_accum > 1 and not args.benchmark_steps:
                announce_run_time(args, accelerator, backbone, grad_accum, max_steps - start_step, step_start)
        all_reduce_gradients(params, accelerator)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params, step)
        extra = after_optimizer_step(step) if after_optimizer_step else {}
        # one host sync per optimizer step, for the log: stats averaged over processes
        keys = sorted(totals)
        means = torch.stack([torch.as_tensor(totals[k], dtype=torch.float32, device=backbone.device) for k in keys])
        means = accelerator.reduce(means, reduction="mean") if accelerator.num_processes > 1 else means
        if backbone.device.type == "cuda":
            torch.cuda.synchronize(backbone.device)
        seconds = time.perf_counter() - step_start
        record = {"step": step, **{k: float(v) for k, v in zip(keys, means.tolist())},
                  "grad_norm": float(grad_norm), "lr": lr_scheduler.get_last_lr()[0],
                  "samples_per_s": args.effective_batch_size / seconds, "step_seconds": seconds,
                  "peak_memory_gb": peak_memory_gb(backbone.device), **(extra or {})}
        metrics.write(record)
        records.append(record)
        progress.set_postfix(step=f"{step}/{max_steps}", loss=f"{record['loss']:.4g}")
        if not args.benchmark_steps and (step % args.checkpoint_every == 0 or step == max_steps):
            save_checkpoint(args, accelerator, step, backbone, lora_config, params, ema, cache, sample_prompt_ids)
            save_training_state(args, accelerator, step, backbone, roles, optimizer, lr_scheduler, ema, generator)
    progress.close()
    return records


def format_duration(seconds):
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def announce_run_time(args, accelerator, backbone, grad_accum, steps_left, step_start):
    """After the first micro-batch: how many micro-batches one optimizer step
    takes and a rough estimate of the run's time, so that a CPU run with the
    paper's batch of 256 says at once that it would take days. The first
    micro-batch includes warm-up, so the estimate errs high."""
    if backbone.device.type == "cuda":
        torch.cuda.synchronize(backbone.device)
    seconds = time.perf_counter() - step_start
    if accelerator.is_main_process:
        logger.info("one optimizer step = %d micro-batches of %d per process; the first took %.1f s: about %s per "
                    "step, %s for the %d steps left (a smaller --effective_batch_size means fewer micro-batches)",
                    grad_accum, args.train_batch_size, seconds, format_duration(seconds * grad_accum),
                    format_duration(seconds * grad_accum * steps_left), steps_left)


def benchmark_clock(args):
    """Wall time for --benchmark_steps, synchronising the GPU first; 0 (and no
    host sync) in normal training."""
    if not args.benchmark_steps:
        return 0.0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def report_benchmark(label, args, backbone, records):
    """Print the --benchmark_steps figures as one JSON line (the first step is
    a warm-up and is left out of the means)."""
    steady = records[1:] or records
    seconds = sum(r["step_seconds"] for r in steady) / len(steady)
    result = {"label": label, "backbone": backbone.kind, "resolution": args.resolution,
              "batch": args.effective_batch_size, "steps": len(steady), "seconds_per_step": seconds,
              "samples_per_s": args.effective_batch_size / seconds, "peak_memory_gb": peak_memory_gb(backbone.device),
              "device": torch.cuda.get_device_name() if backbone.device.type == "cuda" else "cpu"}
    if "sampling_seconds" in steady[0]:  # Stage 1: the share of the step spent drawing policy samples
        result["sampling_share"] = sum(r["sampling_seconds"] * args.gradient_accumulation_steps
                                       for r in steady) / (seconds * len(steady))
    print("BENCHMARK " + json.dumps(result), flush=True)
    return result


# =============================================================================
# 8. Tiny random-weight models (tests and the offline smoke run)
# =============================================================================
# They are built from configs, saved with save_pretrained and loaded back with
# the same from_pretrained calls the real models go through, so the tests
# exercise the users' loading path without network access.

TINY_MODELS = ("sd15", "sd15-inpaint", "sd3", "clip")


def _tiny_clip_tokenizer(directory):
    """A byte-level CLIP tokenizer with no merges: every byte is one token."""
    from transformers import CLIPTokenizer

    byte_chars = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(byte_chars), 0
    for b in range(256):  # GPT-2's bytes_to_unicode: every byte gets a printable char
        if b not in byte_chars:
            chars.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in chars]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)
    return tokenizer


def _tiny_text_encoder(with_projection, hidden=32, projection=32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=projection,
                            bos_token_id=512, eos_token_id=513, pad_token_id=513)
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _tiny_vae(**extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=32, **extra)


def build_tiny_model(kind, directory):
    """Build one tiny model with random weights (seeded) and save it.

    kind: "sd15" (StableDiffusionPipeline), "sd15-inpaint"
    (StableDiffusionInpaintPipeline), "sd3" (StableDiffusion3Pipeline with two
    CLIP encoders and no T5), "clip" (CLIPModel + processor, a PickScore
    stand-in). The VAE downsamples by 2, so 32 px images give 16x16 latents."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, PNDMScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                           UNet2DConditionModel)

    torch.manual_seed(0)
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = _tiny_clip_tokenizer(tmp / "_tokenizer_src")
    if kind in ("sd15", "sd15-inpaint"):
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=9 if kind == "sd15-inpaint" else 4, out_channels=4,
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        # SD-1.5's own sampler and noise schedule
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                                  set_alpha_to_one=False)
        cls = StableDiffusionInpaintPipeline if kind == "sd15-inpaint" else StableDiffusionPipeline
        pipe = cls(vae=_tiny_vae(scaling_factor=0.18215), text_encoder=_tiny_text_encoder(False),
                   tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    elif kind == "sd3":
        # MMDiT-X like SD-3.5-M: QK RMS-norm and one dual-attention layer
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,))
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_tiny_vae(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                          use_post_quant_conv=False),
            text_encoder=_tiny_text_encoder(True), tokenizer=tokenizer,
            text_encoder_2=_tiny_text_encoder(True), tokenizer_2=tokenizer,
            text_encoder_3=None, tokenizer_3=None)
    elif kind == "clip":
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

        config = CLIPConfig(
            text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, bos_token_id=512,
                             eos_token_id=513, pad_token_id=513),
            vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8),
            projection_dim=16)
        pipe = CLIPModel(config)
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp)
    else:
        raise ValueError(f"unknown tiny model {kind!r}; choose from {TINY_MODELS}")
    pipe.save_pretrained(tmp)
    shutil.rmtree(tmp / "_tokenizer_src")
    replace_dir(tmp, directory)
    return directory


def build_tiny_models(root, kinds=TINY_MODELS):
    """Build (once) every tiny model under `root`; returns {kind: path}."""
    paths = {}
    for kind in kinds:
        path = Path(root) / f"tiny-{kind}"
        if not path.exists():
            build_tiny_model(kind, path)
        paths[kind] = str(path)
    return paths


COLOUR_NAMES = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
                "magenta": (210, 40, 200), "orange": (250, 140, 20)}


def draw_disc_image(rng, size, colour):
    """A saturated disc on a smooth two-colour gradient: a procedural "photo"
    with one salient object, for tests and the smoke run. Returns (uint8
    array, boolean disc mask)."""
    yy, xx = np.mgrid[0:size, 0:size]
    background = np.stack([xx * 255 / size, yy * 255 / size, np.full_like(xx, 128)], -1).astype(np.float64)
    cx, cy = rng.integers(size // 4, 3 * size // 4, 2).tolist()
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 < (size // 5) ** 2
    background[disc] = colour
    return background.clip(0, 255).astype(np.uint8), disc


def make_smoke_images(directory, n=8, size=64, seed=0):
    """n captioned images (PNG + .txt caption, a Hugging Face image-folder
    layout that curate.py reads) and prompts.txt for the evaluation."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOUR_NAMES)
    for i in range(n):
        name = names[i % len(names)]
        array, _ = draw_disc_image(rng, size, COLOUR_NAMES[name])
        Image.fromarray(array).save(directory / f"photo{i:03d}.png")
        (directory / f"photo{i:03d}.txt").write_text(f"a photo of a {name} ball on a gradient background")
    (directory.parent / "prompts.txt").write_text("".join(f"a {name} ball in a field\n" for name in names[:3]))
    return directory


if __name__ == "__main__":
    # offline helpers of the smoke run (run_all.sh):
    #   python common.py tiny-models DIR    build the tiny random-weight models
    #   python common.py smoke-images DIR   draw captioned procedural images
    parser = argparse.ArgumentParser(description="RealAlign shared helpers")
    parser.add_argument("command", choices=["tiny-models", "smoke-images"])
    parser.add_argument("directory")
    cli_args = parser.parse_args()
    if cli_args.command == "tiny-models":
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars of sub-second saves
        for name, location in build_tiny_models(cli_args.directory).items():
            print(f"{name}: {location}")
    else:
        print(make_smoke_images(cli_args.directory))
