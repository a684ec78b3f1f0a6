"""The method and training loop of RealAlign ("When Preference Labels Fall Short:
Aligning Diffusion Models from Real Data", ICML 2026): Stage 1, Diffusion-DRO
(train_dro.py, `diffusion_dro_loss`): toward real photos, away from the model's
own samples; Stage 2, Diffusion-DPO (train_dpo.py, `diffusion_dpo_loss`): each
real photo preferred over its copy with the salient region inpainted.

Read in order: 1. losses, 2. forward processes and policy sampling, 3. LoRA
roles and EMA, 4. data and cache, 5. the step, 6. the loop; then the plumbing.
Section 0 comes first only because `python common.py fingerprint` (run_all.sh)
runs it alone, without torch. Comments cite the paper and the README's "Method".
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import csv
import errno
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
import typing
import uuid
import weakref
from pathlib import Path

# =============================================================================
# 0. Same input, same result: content fingerprints (standard library only)
# =============================================================================
# Whether an earlier output still holds is decided by the CONTENT of what it
# read, never by a path: run_all.sh's step markers, the input cache's key,
# --resume and the reuse of curated and evaluated images all ask `fingerprint`.
# A moved folder keeps its fingerprint; an edited photo, row or weight does not.

HASH_CACHE_FILE = "file-hashes.json"
# a folder holding one of these is a model: only its config and weight files count
MODEL_MARKERS = ("model_index.json", "config.json", "adapter_config.json", "pytorch_lora_weights.safetensors")
MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".txt", ".model", ".onnx")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# curate.py's score columns: shown, never read back; their last digits vary with the GPU count
SCORE_COLUMNS = ("pickscore_real", "pickscore_fake", "color_real", "color_fake")


class FileHashes:
    """sha256 of files, cached in CACHE_DIR/file-hashes.json by (name, size, mtime) unless modified < 2 s ago."""

    def __init__(self, path=None):
        self.path, self.known, self.new = Path(path) if path else None, {}, False
        with contextlib.suppress(OSError, ValueError):  # a damaged cache only costs hashing again
            self.known = json.loads(self.path.read_text()) if self.path and self.path.is_file() else {}

    @classmethod
    def beside(cls, output):
        """The cache a run's steps share: OUTPUT_DIR/cache/file-hashes.json, for a step writing OUTPUT_DIR/output."""
        return cls(Path(output).resolve().parent / "cache" / HASH_CACHE_FILE)

    def digest(self, path, name):
        stat = os.stat(path)
        key = f"{name}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in self.known:
            with open(path, "rb") as f:
                value = hashlib.file_digest(f, "sha256").hexdigest()
            if time.time_ns() - stat.st_mtime_ns < 2e9:
                return value
            self.known[key], self.new = value, True
        return self.known[key]

    def save(self):
        if self.path and self.new:
            with contextlib.suppress(OSError):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomically(self.path, self.known)


def write_json_atomically(path, value):
    """Standard library only (section 0 runs without the plumbing's `atomic_write`)."""
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def fingerprint(spec, hashes, exclude=None):
    """What the input `spec` holds, as {relative name: sha256 or revision}; None for
    a setting. A file: its bytes; a CSV: its rows (SCORE_COLUMNS aside) and every
    file its cells name; a folder: every file (hidden ones and `exclude` aside; a
    model folder only its config and weights; an HPDv3 root its all.json); a hub
    id: the revision of its local copy."""
    path = Path(spec).expanduser() if spec else None
    if path is None or not os.path.exists(path):  # os.path: False, not an error, for an impossible name
        if spec and HUB_ID.fullmatch(spec):
            from huggingface_hub.constants import HF_HUB_CACHE

            refs = Path(HF_HUB_CACHE, "models--" + spec.replace("/", "--"), "refs", "main")
            return {f"hub:{spec}": refs.read_text().strip() if refs.is_file() else "not downloaded"}
        return None
    if path.is_file() and path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            rows = list(csv.reader(f))
        kept = [i for i, column in enumerate(rows[0] if rows else []) if column not in SCORE_COLUMNS]
        found = {path.name: digest_of([[row[i] for i in kept if i < len(row)] for row in rows])}
        for cell in {cell for row in rows for cell in row}:
            if cell.strip() and Path(cell).suffix and os.path.isfile(path.parent / cell.strip()):
                found[cell] = hashes.digest(path.parent / cell.strip(), f"{path.parent.name}/{cell}")
        return found
    if path.is_file():
        return {path.name: hashes.digest(path, f"{path.parent.name}/{path.name}")}
    if (path / "all.json").is_file():
        return {"all.json": hashes.digest(path / "all.json", f"{path.name}/all.json")}
    is_model = any((path / marker).is_file() for marker in MODEL_MARKERS)
    exclude = Path(exclude).resolve() if exclude else None
    found = {}
    for directory, subdirs, files in os.walk(path):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and Path(directory, d).resolve() != exclude)
        for name in sorted(files):
            relative = os.path.relpath(os.path.join(directory, name), path)
            if not (name.startswith(".") or is_model and not name.endswith(MODEL_SUFFIXES)):
                found[relative] = hashes.digest(os.path.join(directory, name), f"{path.name}/{relative}")
    return found


def digest_of(value):
    """A short sha256 of any JSON-able value (a fingerprint, settings)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_changes(old, new):
    """'pairs.csv, real/a.png changed; real/b.png new; fake/c.png gone' (at most 3 names per kind)."""
    old, new = old or {}, new or {}
    kinds = {"changed": [n for n in new if n in old and old[n] != new[n]],
             "new": [n for n in new if n not in old], "gone": [n for n in old if n not in new]}
    return "; ".join(", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "") + " " + kind
                     for kind, names in kinds.items() if names)


def step_fingerprint(command, output, hashes):
    """run_all.sh's record of a step: its settings (the command line, inputs and
    output replaced by placeholders; *.py files are settings, --resume is left out)
    and the digest of each input, labelled by its flag ("--pairs", "argument 3")."""
    output = Path(output).resolve() if output else None
    settings, inputs = [], {}
    for i, arg in enumerate(command):
        flag = command[i - 1] if i and command[i - 1].startswith("--") else f"argument {i}"
        if arg == "--resume":
            continue
        if arg.startswith("-") or arg.endswith(".py") or output and Path(arg).resolve() == output:
            settings.append("<output>" if output and Path(arg).resolve() == output else arg)
            continue
        # NAME=MODEL and NET+LORA (evaluate.py's --method) name inputs too
        name, value = arg.split("=", 1) if "=" in arg and not os.path.exists(arg) else ("", arg)
        parts = [value] if os.path.exists(value) or "+" not in value else value.split("+")
        found = [fingerprint(part, hashes, exclude=output) for part in parts]
        if not value or any(f is None for f in found):
            settings.append(arg)
            continue
        inputs[f"{flag} {name}" if name else flag] = digest_of(found)
        settings.append(f"{name}=<input>" if name else "<input>")
    return {"settings": digest_of(settings), "inputs": inputs}


def fingerprint_main(argv):
    """`python common.py fingerprint MARKER OUTPUT [--write started|done] -- COMMAND...`
    (run_all.sh's `step`): --write records the step; else exit 0 if it is done with
    the same settings and inputs, 10 if it must run, 11 if an input changed."""
    marker, output, rest = Path(argv[0]), argv[1], argv[2:]
    write = rest[1] if rest[:1] == ["--write"] else None
    hashes = FileHashes.beside(marker)  # beside the trainers' input cache
    current = step_fingerprint(rest[rest.index("--") + 1:], output, hashes)
    if marker.parent.is_dir():
        hashes.save()
    if write:
        write_json_atomically(marker, {**current, "done": write == "done"})
        return 0
    try:
        previous = json.loads(marker.read_text())
        previous["inputs"], previous["settings"]  # a marker of this version
    except (OSError, ValueError, KeyError, TypeError):
        return 10  # not run yet, or marked by an older version (then its trainers resume)
    inputs, since = current["inputs"], "was done" if previous.get("done") else "started"
    changed = [label for label in dict.fromkeys([*inputs, *previous["inputs"]])
               if inputs.get(label) != previous["inputs"].get(label)]
    if changed:
        print(f"its input{'s' * (len(changed) > 1)} {', '.join(changed)} changed since it {since}: running it on "
              "the new content")
        return 11
    if previous["settings"] != current["settings"]:
        print(f"its settings changed since it {since}: running it again")
        return 10
    if not previous.get("done"):
        print("it was interrupted: continuing it")
        return 10
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["fingerprint"]:
        sys.exit("usage: python common.py fingerprint MARKER OUTPUT [--write started|done] -- COMMAND...")
    sys.exit(fingerprint_main(sys.argv[2:]))

import numpy as np  # noqa: E402  (after section 0, which runs without them)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

logger = logging.getLogger("realalign")


# =============================================================================
# 1. Losses: pure functions of per-sample errors (epsilon- or velocity-
#    prediction alike); copy them anywhere
# =============================================================================


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||pred - target||^2 / numel per sample, [B], in float32 (bf16 is too coarse for the gaps below)."""
    diff = pred.float() - target.float()
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def diffusion_dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta):
    """Diffusion-DPO loss (Wallace et al. 2024, eq. 14; RealAlign Sec. 3.3, README 'Method: Stage 2').

        inner = (model_err_w - ref_err_w) - (model_err_l - ref_err_l)
        loss  = -mean log sigmoid( -beta/2 * inner )

    Per-sample errors [B] of the model and the frozen reference on the winner w (the
    real photo) and loser l (its inpainted copy), same noise and timestep. Stats:
    implicit_acc = share with inner < 0 (w preferred), reward_margin = mean(-inner)."""
    inner = (model_err_w - ref_err_w) - (model_err_l - ref_err_l)
    loss = -F.logsigmoid(-0.5 * beta * inner).mean()
    with torch.no_grad():
        stats = {"implicit_acc": (inner < 0).float().mean(), "reward_margin": (-inner).mean(), "inner": inner.mean()}
    return loss, stats


def diffusion_dro_loss(model_err_real, model_err_policy, ref_err_real, ref_err_policy, margin=0.001):
    """Diffusion-DRO hinge loss (Diffusion-DRO, Eq. 9; RealAlign Sec. 3.2, README 'Method: Stage 1').

        D    = (model_err_real - ref_err_real) - (model_err_policy - ref_err_policy)
        loss = mean( max(D + margin, 0) )

    `*_real`: errors on a noised real image; `*_policy`: errors against the sampling
    snapshot's own prediction on its trajectory. Lower D: real images more likely,
    own samples less likely than under the reference. Stats: mean D, active_frac."""
    D = (model_err_real - ref_err_real) - (model_err_policy - ref_err_policy)
    loss = torch.clamp(D + margin, min=0).mean()
    with torch.no_grad():
        stats = {"D": D.mean(), "active_frac": (D + margin > 0).float().mean()}
    return loss, stats


# =============================================================================
# 2. The forward processes: one Backbone over SD-1.5 and SD-3.5-M, and
#    Stage 1's policy sampling
# =============================================================================


def load_pipeline(model, dtype=torch.float32, inpainting=False):
    """A diffusers pipeline from a hub id or a folder; any failure is one UserError naming it."""
    from diffusers import DiffusionPipeline, StableDiffusionInpaintPipeline

    quiet_libraries()
    if Path(model).exists() and not (Path(model) / "model_index.json").exists():
        raise UserError(f"{model} is a folder but not a diffusers pipeline (no model_index.json)")
    try:
        pipe = (StableDiffusionInpaintPipeline if inpainting else DiffusionPipeline).from_pretrained(model, dtype=dtype)
    except Exception as err:  # OSError, HF hub errors, ...
        raise UserError(f"could not load the diffusers pipeline '{model}': {first_line(err)} (check the hub id or "
                        "path; offline, use a local folder or SMOKE=1)") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Backbone:
    """The model-specific half of training, so the trainers have one code path for
    SD-1.5 (UNet, epsilon, DDPM) and SD-3(.5) (MMDiT, flow matching): the cache's
    encoders, the forward process (sample_timesteps, add_noise, target, predict)
    and Stage 1's policy points (policy_request + PolicySampler, policy_endpoint_point)."""

    def __init__(self, pipe, device=None, dtype=torch.float32):
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        self.pipe, self.vae, self.dtype = pipe, pipe.vae, dtype
        self.device = torch.device(device) if device is not None else default_device()
        self.is_flow = getattr(pipe, "transformer", None) is not None  # SD-3 carries a "transformer"
        self.kind, self.net_name = ("sd3", "transformer") if self.is_flow else ("sd15", "unet")
        self.net = getattr(pipe, self.net_name)
        if self.is_flow:
            self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
            # the 1000 shifted training timesteps, kept apart: the policy sampler's set_timesteps overwrites them
            self.train_timesteps = self.scheduler.timesteps.clone().float().cpu()
        else:
            # training noise follows DDPM whatever sampler the pipeline ships
            self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
            # (alpha_t, sigma_t) per timestep, on the host: the policy sampler's step coefficients
            self.alpha_sigma = [(math.sqrt(a), math.sqrt(1 - a))
                                for a in self.scheduler.alphas_cumprod.double().tolist()]
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.vae_scale = float(self.vae.config.scaling_factor)
        self.vae_shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    # ---- text and images (to build the cache, and for sampling) ----
    @torch.no_grad()
    def encode_prompts(self, prompts, batch_size=32, max_sequence_length=128):
        """Prompt embeddings, batched; SD-3 adds pooled ones (T5 length 128, README 'Method: Stage 1')."""
        out = {}
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            if self.is_flow:
                embeds, _, pooled, _ = self.pipe.encode_prompt(chunk, chunk, chunk, device=self.device,
                                                               do_classifier_free_guidance=False,
                                                               max_sequence_length=max_sequence_length)
                parts = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
            else:
                embeds, _ = self.pipe.encode_prompt(chunk, self.device, 1, False)
                parts = {"prompt_embeds": embeds}
            for key, value in parts.items():
                out.setdefault(key, []).append(value.float().cpu())
        return {key: torch.cat(values) for key, values in out.items()}

    def encode_prompts_once(self, prompts):
        """`encode_prompts` with the text encoders on the device for this pass only (T5-XXL is ~9.5 GB)."""
        encoders = [getattr(self.pipe, f"text_encoder{suffix}", None) for suffix in ("", "_2", "_3")]
        encoders = [encoder for encoder in encoders if encoder is not None]
        for encoder in encoders:
            encoder.to(self.device)
        try:
            return self.encode_prompts(prompts)
        finally:
            for encoder in encoders:
                encoder.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor):
        """VAE posterior (mean, std) of images in [-1, 1]: every step draws a fresh latent for free."""
        posterior = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return posterior.mean.float().cpu(), posterior.std.float().cpu()

    def latents_from_posterior(self, mean, std, generator=None):
        """A fresh latent, shifted and scaled for the network ((z - shift) * scale)."""
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return (mean + std * noise - self.vae_shift) * self.vae_scale

    # ---- the forward process ----
    def sample_timesteps(self, n, generator=None, device=None):
        """SD-1.5: uniform over the 1000 DDPM steps. SD-3 (paper Sec. 3, as the public
        SD-3.5-M trainers): u logit-normal (0, 1), t = scheduler.timesteps[floor(u *
        1000)] = 1000 sigma, sigma = s*v / (1 + (s-1)*v), v = 1 - j/1000. On the host."""
        device = device or self.device
        if self.is_flow:
            from diffusers.training_utils import compute_density_for_timestep_sampling

            u = compute_density_for_timestep_sampling("logit_normal", n, logit_mean=0.0, logit_std=1.0,
                                                      generator=generator)
            # sigmoid rounds to 1.0 for z > ~17 in float32: stay inside the table
            index = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
            return to_device(self.train_timesteps[index], device)
        return to_device(torch.randint(0, self.num_train_timesteps, (n,), generator=generator), device)

    def _broadcast(self, values, like):
        return values.to(like.device, torch.float32).view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0, noise, t):
        """SD-1.5: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (DDPM).
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
        """One network call (`net`: the wrapped or the bare network)."""
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

    # ---- Stage-1 policy sampling (paper Sec. 3, Diffusion-DRO's policy term) ----
    # Hand-written rather than diffusers' DPMSolverMultistepScheduler, which
    # steps one timestep shared by the batch: here each trajectory has its own
    # grid and its own last point. tests/reference_sampler.py runs diffusers'
    # scheduler per sample, and the tests compare the two point by point.
    def policy_request(self, cond, resolution, num_steps, generator, points_per_trajectory=1, key=None):
        """One micro-batch's policy trajectories for a PolicySampler: per entry of
        `cond` its initial noise and the K timesteps of its points (CPU draws).
        SD-1.5: DPM-Solver++(2M) on t_i = offset + step_ratio * (num_steps - 1 - i),
                a per-sample offset in [0, step_ratio) (Diffusion-DRO's "timestep
                offset"); points at K distinct random steps.
        SD-3:   K timesteps from the training law; flow-match Euler on the shifted
                grid lands exactly on each (README "Differences from the public code").
        A trajectory stops at its last point."""
        n, K = cond["prompt_embeds"].shape[0], points_per_trajectory
        x = torch.randn((n, *self.latent_shape(resolution)), generator=generator)
        if self.is_flow:
            points = self.sample_timesteps(n * K, generator, device="cpu").view(n, K).tolist()
            self.scheduler.set_timesteps(num_steps, device="cpu")
            grid = (self.scheduler.sigmas[:-1] * self.num_train_timesteps).tolist()  # 1000 ... > 0, in t units
            # a grid point within 1e-3 of a drawn t is the same stop (no zero-length step)
            stops = [sorted(set(row) | {g for g in grid if g > min(row) and all(abs(g - p) > 1e-3 for p in row)},
                            reverse=True) for row in points]
        else:
            if K == 1:
                steps = torch.randint(0, num_steps, (n, 1), generator=generator).tolist()
            else:  # K distinct steps per trajectory
                steps = [torch.randperm(num_steps, generator=generator)[:K].tolist() for _ in range(n)]
            step_ratio = self.num_train_timesteps // num_steps
            offsets = torch.randint(0, step_ratio, (n,), generator=generator).tolist()
            stops = [[o + step_ratio * (num_steps - 1 - i) for i in range(max(row) + 1)]
                     for o, row in zip(offsets, steps)]
            points = [[stop[i] for i in row] for stop, row in zip(stops, steps)]
        return PolicyRequest(key, to_device(x, self.device), cond, stops, points, self.device)

    @torch.no_grad()
    def policy_endpoint_point(self, net, cond, resolution, num_steps, generator, points_per_trajectory=1,
                              with_prediction=True):
        """SD-3, the public SD-3.5-M trainer's policy point (--sd3_policy_point endpoint):
        `net` samples each caption to x0 (Euler, guidance 1), noised at K drawn t with
        fresh eps. Returns (x_t, t, prediction or None, eps), trajectory-major; the
        caller noises the real latent with the SAME eps and t, as the public trainer."""
        n, K = cond["prompt_embeds"].shape[0], points_per_trajectory
        latents = torch.randn((n, *self.latent_shape(resolution)), generator=generator)
        embeds = {key: value.to(self.device, self.dtype) for key, value in cond.items()}
        x0 = self.pipe(prompt_embeds=embeds["prompt_embeds"], pooled_prompt_embeds=embeds["pooled_prompt_embeds"],
                       latents=latents.to(self.device, self.dtype), num_inference_steps=num_steps,
                       guidance_scale=1.0, height=resolution, width=resolution, output_type="latent").images
        x0 = x0.float().repeat_interleave(K, dim=0)
        t = self.sample_timesteps(n * K, generator)
        noise = to_device(torch.randn(x0.shape, generator=generator), self.device)
        x_t = self.add_noise(x0, noise, t)
        if not with_prediction:
            return x_t, t, None, noise
        cond = {key: value.repeat_interleave(K, dim=0) for key, value in cond.items()}
        return x_t, t, self.predict(net, x_t, t, cond).float(), noise

    def solver_step(self, t, t_next, h_prev):
        """Host-side coefficients of one step t -> t_next (= t: none), and its h.
        SD-1.5, DPM-Solver++(2M), lambda = log(alpha / sigma), h = lambda(t_next) -
        lambda(t), r = h_prev / h (first order at first):
            x0 = (x - sigma_t eps) / alpha_t,  d = x0 + (1 / 2r) (x0 - x0_prev)
            x' = (sigma_n / sigma_t) x - alpha_n expm1(-h) d
        SD-3, flow-match Euler: x' = x + (t_next - t) / 1000 * v."""
        if self.is_flow:
            return [(t_next - t) / self.num_train_timesteps, 0.0, 0.0, 0.0, 0.0], None
        (a, s), (a_n, s_n) = (self.alpha_sigma[int(v)] for v in (t, t_next))
        h = math.log(a_n / s_n) - math.log(a / s)
        c = h / (2 * h_prev) if h_prev else 0.0  # 1 / 2r
        return [s, 1 / a, c, s_n / s, a_n * math.expm1(-h)], h

    def solver_update(self, x, prediction, coef, x0_prev):
        """Apply `solver_step`'s coefficients (one row per slot) on the device."""
        column = lambda i: coef[:, i].view(-1, *([1] * (x.ndim - 1)))  # noqa: E731
        if self.is_flow:
            return x + column(0) * prediction, x0_prev
        x0 = (x - column(0) * prediction) * column(1)
        return column(3) * x - column(4) * (x0 + column(2) * (x0 - x0_prev)), x0


class PolicyRequest:
    """One micro-batch's trajectories (noise, cond, stops, K points each), then its points' x_t and predictions."""

    def __init__(self, key, x, cond, stops, points, device):
        self.key, self.x, self.cond, self.stops = key, x, cond, stops
        self.K = len(points[0])
        # stop index -> the point slots recorded there, per trajectory
        self.hits = [{j: [k for k, p in enumerate(row) if p == s] for j, s in enumerate(stop) if s in row}
                     for stop, row in zip(stops, points)]
        self.t = to_device(torch.tensor(points).flatten(), device)
        self.out_x, self.out_prediction = (torch.zeros((len(stops) * self.K, *x.shape[1:]), device=device)
                                           for _ in range(2))
        self.unfinished = len(stops)

    def points(self):
        return self.out_x, self.t, self.out_prediction


class PolicySampler:
    """Makes the Stage-1 policy points in a fixed number of slots (README
    "Throughput"): every network call evaluates exactly `slots` rows (static
    shapes); a finished trajectory's slot takes the next in line, of this or a
    later micro-batch of the snapshot window (theta is frozen for --snapshot_every
    steps), so no row idles but at the window's end. A micro-batch's points come
    from its own generator: they do not depend on the process count. Plans are
    made on the host; the loop never waits for the device."""

    def __init__(self, backbone, net, slots):
        self.bb, self.net, self.slots = backbone, net, slots
        self.pending, self.make_request = collections.deque(), None  # micro-batches whose requests are not drawn yet
        self.waiting = collections.deque()  # requests drawn, points not yet handed out
        self.queue = collections.deque()  # (request, row) trajectories not yet started
        self.running = [None] * slots  # per slot: [request, row, stop index, h of the last step]
        self.state = None  # x, x0_prev and cond of the slots, on the device

    def idle(self):
        return not self.waiting and not self.pending  # every request of the window handed out

    def start(self, micro_batches, make_request):
        """A window: this process's micro-batches to its end; `make_request(mb)` draws one's request."""
        assert self.idle(), "a window starts when the last one is done"
        self.pending, self.make_request = collections.deque(micro_batches), make_request

    def _submit_next(self):
        if self.pending:
            request = self.make_request(self.pending.popleft())
            self.waiting.append(request)
            self.queue.extend((request, row) for row in range(len(request.stops)))

    def next(self):
        """The next micro-batch's request, with every one of its points made."""
        if not self.waiting:
            self._submit_next()
        request = self.waiting[0]
        while request.unfinished:
            self._call()
        return self.waiting.popleft()

    def _plan_call(self):
        """Host side of one call: fill free slots; per slot its t and step coefficients; which slots start or record."""
        starts, records, t_now, coef = {}, {}, [], []
        for slot in range(self.slots):
            if self.running[slot] is None:
                if not self.queue:
                    self._submit_next()
                if self.queue:
                    request, row = self.queue.popleft()
                    self.running[slot] = [request, row, 0, None]
                    entry = starts.setdefault(request, ([], []))
                    entry[0].append(slot)
                    entry[1].append(row)
            if self.running[slot] is None:  # the window's end: the slot idles (no step)
                t_now.append(t_now[-1] if t_now else self.bb.num_train_timesteps - 1)
                coef.append(self.bb.solver_step(t_now[-1], t_now[-1], None)[0])
                continue
            request, row, j, h_prev = self.running[slot]
            stops = request.stops[row]
            for k in request.hits[row].get(j, []):
                entry = records.setdefault(request, ([], []))
                entry[0].append(slot)
                entry[1].append(row * request.K + k)
            last = j + 1 == len(stops)
            step, h = self.bb.solver_step(stops[j], stops[j] if last else stops[j + 1], h_prev)
            t_now.append(stops[j])
            coef.append(step)
            if last:
                self.running[slot] = None
                request.unfinished -= 1
            else:
                self.running[slot] = [request, row, j + 1, h]
        return starts, records, t_now, coef

    @torch.no_grad()
    def _call(self):
        """One network call over all the slots, and the solver step."""
        bb, device = self.bb, self.bb.device
        if self.state is None:
            request = self.queue[0][0]
            x = torch.zeros((self.slots, *request.x.shape[1:]), device=device)
            self.state = [x, torch.zeros_like(x), {key: value.new_zeros((self.slots, *value.shape[1:]), dtype=bb.dtype)
                                                   for key, value in request.cond.items()}]
        x, x0_prev, cond = self.state
        starts, records, t_now, coef = self._plan_call()
        # the call's index lists, t and coefficients reach the device in pinned, non-blocking copies
        index = [i for entries in (starts, records) for pair in entries.values() for i in pair]
        index = iter(torch.split(to_device(torch.tensor([i for lst in index for i in lst], dtype=torch.long), device),
                                 [len(lst) for lst in index]))
        t = to_device(torch.tensor(t_now, dtype=torch.float32 if bb.is_flow else torch.long), device)
        coef = to_device(torch.tensor(coef, dtype=torch.float32), device)
        for request in starts:  # the new trajectories enter their slots
            slots, rows = next(index), next(index)
            x.index_copy_(0, slots, request.x.index_select(0, rows).float())
            for key, value in cond.items():
                value.index_copy_(0, slots, request.cond[key].index_select(0, rows).to(value.dtype))
        prediction = bb.predict(self.net, x, t, cond).float()
        for request in records:  # the points reached at this call
            slots, rows = next(index), next(index)
            request.out_x.index_copy_(0, rows, x.index_select(0, slots))
            request.out_prediction.index_copy_(0, rows, prediction.index_select(0, slots))
        self.state[0], self.state[1] = bb.solver_update(x, prediction, coef, x0_prev)


# =============================================================================
# 3. LoRA roles on one base network, their EMA, and the published LoRA formats
# =============================================================================
# Three LoRA adapters on one frozen base network (README 'Method: Stage 1'): the
# trainable `learner`, the frozen reference `ref` and, in Stage 1, the frozen
# sampling snapshot `policy`; switching role only changes the active adapter.

LEARNER, REF, POLICY = "learner", "ref", "policy"

LORA_TARGETS = {
    # SD-1.5: UNet attention projections (README 'Method: Stage 1')
    "sd15": ["to_q", "to_k", "to_v", "to_out.0"],
    # SD-3.5-M: the joint attention of each MMDiT block only; "attn." keeps the
    # image-only `attn2` of the dual-attention blocks un-adapted, as the public code
    "sd3": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
            "attn.add_v_proj", "attn.to_add_out"],
}


def _tuner_layers(net):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in net.modules() if isinstance(module, BaseTunerLayer)]


def role_parameters(net, role):
    """The LoRA parameters of one role, in a fixed order."""
    return [param for name, param in net.named_parameters() if f".{role}." in name]


_ROLE_LOOKUP = weakref.WeakKeyDictionary()  # net -> (its adapters, its LoRA layers): found once, not per call


def use_role(net, role):
    """Make `role` the active adapter of every LoRA layer. Only that flag changes
    (peft's set_adapter also resets requires_grad on every adapter, milliseconds on
    the big networks); requires_grad is set once, by setup_lora_roles."""
    adapters = tuple(getattr(net, "peft_config", {}))
    cached = _ROLE_LOOKUP.get(net)
    if cached is None or cached[0] != adapters:
        cached = _ROLE_LOOKUP[net] = (adapters, _tuner_layers(net))
    for layer in cached[1]:
        # the attribute set_adapter sets, into the instance dict: nn.Module.__setattr__'s checks cost 95%
        vars(layer)["_active_adapter"] = role


def copy_role(net, source, dest):
    """dest <- source, weights only (e.g. learner -> policy snapshot)."""
    with torch.no_grad():
        for p_src, p_dst in zip(role_parameters(net, source), role_parameters(net, dest), strict=True):
            p_dst.copy_(p_src)


def setup_lora_roles(backbone, roles, rank, alpha, init_lora=None, seed=0):
    """Add the LoRA roles: the learner a fresh LoRA (B = 0: the base network) or
    `init_lora` (its own rank and alpha); every other role starts as its copy, so
    `ref` is "the model at the start of the stage"."""
    from peft import LoraConfig

    net = backbone.net
    net.requires_grad_(False)
    torch.manual_seed(seed)  # peft draws the A matrices from the global RNG: the same on every process
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
    # The learner's weights are fp32 masters (autocast computes with bf16 casts);
    # the frozen roles are kept in that compute dtype, with no cast per call, and
    # no layer casts its input to the LoRA's dtype (autocast does).
    for role in roles:
        for param in role_parameters(net, role):
            param.data = param.data.to(torch.float32 if role == LEARNER else backbone.dtype)
            param.requires_grad_(role == LEARNER)
        if role != LEARNER:
            copy_role(net, LEARNER, role)
    for layer in _tuner_layers(net):
        layer.cast_input_dtype_enabled = False
    use_role(net, LEARNER)
    return config


# Not diffusers' EMAModel: that has the SD-1.5 schedule, not flow_grpo's, and
# averages a whole module, not one LoRA role among several adapters.
class LoraEMA:
    """EMA of the learner's LoRA weights (paper Sec. 3) from the stage's start;
    checkpoints hold it. shadow <- decay * shadow + (1 - decay) * weights, with
      "diffusers" (SD-1.5, EMAModel's defaults): every `update_every` steps; at
          the n-th update decay = 0 for n = 0, else min(max_decay, (1+n)/(10+n));
      "flow_grpo" (SD-3.5-M, decay 0.9, interval 8): after optimizer step s
          when (s + 1) % update_every == 0, decay = min(max_decay, (1+s)/(10+s))."""

    SCHEDULES = ("diffusers", "flow_grpo")

    def __init__(self, params, max_decay=0.9999, update_every=1, schedule="diffusers"):
        if schedule not in self.SCHEDULES:
            raise ValueError(f"unknown EMA schedule {schedule!r}; choose from {self.SCHEDULES}")
        self.shadow = [p.detach().clone().float() for p in params]
        self.max_decay, self.update_every, self.schedule = max_decay, update_every, schedule
        self.num_updates = 0

    def decay(self, optimizer_step):
        if self.schedule == "flow_grpo":
            return min(self.max_decay, (1 + optimizer_step) / (10 + optimizer_step))
        n = self.num_updates
        return 0.0 if n == 0 else min(self.max_decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def step(self, params, optimizer_step):
        """After optimizer step `optimizer_step` (1-based); one multi-tensor lerp."""
        if (optimizer_step + (self.schedule == "flow_grpo")) % self.update_every == 0:
            torch._foreach_lerp_(self.shadow, [p.float() for p in params], 1 - self.decay(optimizer_step))
            self.num_updates += 1

    def state_dict(self):
        return {"shadow": self.shadow, "num_updates": self.num_updates}

    def load_state_dict(self, state):
        self.shadow = [s.clone() for s in state["shadow"]]
        self.num_updates = int(state["num_updates"])


# The published LoRA formats, recognised by their files (README 'What the real run needs'):
#  - diffusers' `save_lora_weights` file, pytorch_lora_weights.safetensors: ours and the
#    authors' SD-1.5 ones (Cwyxx/RealAlign, training_sd15/stage2_dpo/train-lora_init.py);
#  - a PEFT adapter folder (`PeftModel.save_pretrained`: adapter_config.json +
#    adapter_model.safetensors, keys base_model.model.<module>.lora_A/B.weight): Flow-GRPO's
#    (yifan123/flow_grpo, scripts/train_sd3.py save_ckpt) and the authors' SD-3.5-M ones in
#    <checkpoint>/lora/learner/ (training_sd35m/scripts/train-sd-3-5-medium-irl.py save_ckpt).
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's own prefix of every key


def lora_files(folder):
    """The LoRA files under a folder, as '/'-separated paths relative to it."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix() for pattern in (PEFT_CONFIG, PEFT_WEIGHTS, "*.safetensors")
            for path in folder.rglob(pattern) if path.is_file()}


def find_lora(files, where):
    """Which LoRA a file list holds: ("peft", folder), ("diffusers", file) or None.
    One at the root wins (PEFT over diffusers: it carries its config), else the
    only one, else the one in a folder named `learner`."""
    found = {}
    for name in files:
        folder, _, base = name.rpartition("/")
        if base == PEFT_CONFIG and (f"{folder}/{PEFT_WEIGHTS}" if folder else PEFT_WEIGHTS) in files:
            found[folder] = ("peft", folder)
        elif base == DIFFUSERS_LORA or (not folder and base.endswith(".safetensors") and "lora" in base.lower()):
            found.setdefault(folder, ("diffusers", name))
    if "" in found or len(found) == 1:
        return found.get("", next(iter(found.values())))
    learner = [folder for folder in found if folder.rsplit("/", 1)[-1] == LEARNER]
    if len(learner) == 1:
        return found[learner[0]]
    if found:
        raise UserError(f"'{where}' holds {len(found)} LoRAs (in {', '.join(sorted(found))}): name the folder of the "
                        "one to load")
    return None


def first_line(err):
    """'TypeName: first line of the message', for one-line errors."""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def load_lora_into(backbone, lora, adapter_name):
    """Load a LoRA (file, folder or hub id; either format) as `adapter_name`; every weight must find its module."""
    net, path = backbone.net, Path(lora).expanduser()
    if not path.exists():  # a hub id: only its LoRA files are downloaded
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(lora), allow_patterns=[f"*{PEFT_CONFIG}", f"*{PEFT_WEIGHTS}",
                                                                      "*lora*.safetensors"]))
        except Exception as err:  # most often a mistyped local path: say so, not only the hub's complaint
            raise UserError(f"the LoRA '{lora}' was not found: no such local file or folder (and as a hub id: "
                            f"{first_line(err)})") from None
    found = ("diffusers", "") if path.is_file() else find_lora(lora_files(path), lora)
    if found is None:
        raise UserError(f"'{lora}' holds no LoRA: neither {DIFFUSERS_LORA} nor a PEFT adapter folder ({PEFT_CONFIG} "
                        f"+ {PEFT_WEIGHTS}), at its root or in a subfolder such as lora/learner/")
    kind, path = found[0], path / found[1]
    mismatch = (f"the LoRA '{lora}' does not fit this {backbone.kind} {backbone.net_name} (is it a LoRA of the "
                "other backbone?)")
    try:
        if kind == "diffusers":
            backbone.pipe.load_lora_weights(str(path), adapter_name=adapter_name)
        else:
            _load_peft_adapter(net, path, adapter_name, mismatch)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"could not load the LoRA '{lora}' ({kind} format, {path}): {first_line(err)}") from None
    if adapter_name not in getattr(net, "peft_config", {}) or not role_parameters(net, adapter_name):
        raise UserError(f"{mismatch}: none of its weights loaded")


def _load_peft_adapter(net, folder, adapter_name, mismatch):
    """A PEFT adapter folder into a diffusers network, as PeftModel.from_pretrained would."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    config = PeftConfig.from_pretrained(str(folder))
    if config.peft_type != "LORA":
        raise UserError(f"{folder} is a PEFT {config.peft_type} adapter, not a LoRA")
    state = {key.removeprefix(PEFT_PREFIX): value
             for key, value in load_peft_weights(str(folder), device="cpu").items()}
    try:
        net.add_adapter(config, adapter_name=adapter_name)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise UserError(f"{mismatch}: {str(err).splitlines()[0]}") from None
    result = set_peft_model_state_dict(net, state, adapter_name=adapter_name)
    unused = [key for key in result.unexpected_keys if "lora_" in key]
    unset = [key for key in result.missing_keys if f".{adapter_name}." in key]
    if unused or unset:
        raise UserError(f"{mismatch}: {len(unused)} of its weights match no module, {len(unset)} of its modules get "
                        f"no weight (e.g. {(unused or unset)[0]})")


@contextlib.contextmanager
def weights_swapped(params, values):
    """Temporarily give `params` the `values` (e.g. the EMA weights); None: unchanged."""
    if values is None:
        yield
        return
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_copy_(params, list(values))
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, backup)


def lora_state_dict(net, role, params=None):
    """The role's LoRA weights in PEFT key format (what diffusers' loaders read); `params`: other values (EMA)."""
    from peft.utils import get_peft_model_state_dict

    with weights_swapped(role_parameters(net, role), params):
        state = get_peft_model_state_dict(net, adapter_name=role)
        return {key: value.detach().to("cpu", torch.float32).clone() for key, value in state.items()}


def save_lora_checkpoint(backbone, state_dict, config, directory):
    """LoRA weights in both formats: diffusers' `load_lora_weights(dir)` with the
    adapter config as metadata (SD-3.5-M's alpha != rank), and a PEFT adapter
    (flow_grpo's `PeftModel.from_pretrained`), hard-linked into lora/learner/ where
    the authors' SD-3.5-M evaluation looks (Cwyxx/RealAlign,
    training_sd35m/evaluation/sd-3-5-medium/generate_image.py)."""
    from safetensors.torch import save_file

    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"]) if metadata.get("target_modules") else None
    type(backbone.pipe).save_lora_weights(str(directory), **{f"{backbone.net_name}_lora_layers": state_dict,
                                                             f"{backbone.net_name}_lora_adapter_metadata": metadata})
    directory = Path(directory)
    peft_config = copy.deepcopy(config)
    peft_config.inference_mode = True  # as PeftModel.save_pretrained records it
    peft_config.save_pretrained(str(directory))
    save_file({PEFT_PREFIX + key: value.contiguous() for key, value in state_dict.items()},
              str(directory / PEFT_WEIGHTS), metadata={"format": "pt"})
    learner = directory / "lora" / LEARNER
    learner.mkdir(parents=True, exist_ok=True)
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        try:
            os.link(directory / name, learner / name)
        except OSError:  # a filesystem without hard links: a copy
            shutil.copy2(directory / name, learner / name)


def load_network_override(backbone, path):
    """Another UNet/transformer (folder or hub id) for the complementarity runs (README 'Method: Stage 2')."""
    cls, errors = type(backbone.net), []
    for subfolder in (None, backbone.net_name):
        try:
            net = cls.from_pretrained(path, subfolder=subfolder, dtype=backbone.net.dtype)
            break
        except Exception as err:
            errors.append(first_line(err))
    else:
        raise UserError(f"could not load a {cls.__name__} from '{path}' ({'; '.join(errors)})")
    if net.config.get("in_channels") != backbone.net.config.get("in_channels"):
        raise UserError(f"'{path}' does not fit this pipeline's {backbone.net_name}")
    setattr(backbone.pipe, backbone.net_name, net)
    backbone.net = net
    return net


# =============================================================================
# 4. Data and cache: the pairs CSV, the photos, the cache of VAE latents and
#    prompt embeddings (keyed on content: section 0)
# =============================================================================

PAIR_COLUMNS = ["uid", "prompt", "real_image_path", "fake_image_path"]
# the public trainers' names for the same columns (README 'Differences from the public code')
PAIR_ALIASES = {"win_image_path": "real_image_path", "lose_image_path": "fake_image_path", "caption": "prompt"}


def read_pairs_csv(path, need_fake=True):
    """A pairs CSV's rows (README 'Method: data'; win/lose names accepted), paths absolute; problems: UserError."""
    import io

    path = Path(path)
    if not path.is_file():
        raise UserError(f"pairs CSV not found: {path}")
    try:
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        header = [PAIR_ALIASES.get(col, col) for col in (reader.fieldnames or [])]
        rows = [{PAIR_ALIASES.get(k, k): v for k, v in row.items()} for row in reader]
    except csv.Error as err:
        raise UserError(f"{path} is not a readable CSV ({err})") from None
    required = ["prompt", "real_image_path"] + (["fake_image_path"] if need_fake else [])
    missing = [col for col in required if col not in header]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)} (has: {', '.join(header) or 'nothing'})")
    if not rows:
        raise UserError(f"{path} has no rows")
    pairs, seen = [], {}
    for i, row in enumerate(rows):
        pair = {"uid": row.get("uid") or str(i), "prompt": row["prompt"] or ""}
        if pair["uid"] in seen:
            raise UserError(f"{path}: uid '{pair['uid']}' appears twice (rows {seen[pair['uid']]} and {i + 2})")
        seen[pair["uid"]] = i + 2
        for col in required[1:]:
            image_path = Path(row[col] or "")
            image_path = image_path if image_path.is_absolute() else path.parent / image_path
            if not row[col] or not image_path.is_file():
                raise UserError(f"{path}, row {i + 2}: {col} '{row[col]}' is not a file")
            pair[col] = str(image_path)
        if need_fake:  # the fake is pixel-aligned with the real image: the same size, or the pair is broken
            sizes = []
            for col in ("real_image_path", "fake_image_path"):
                try:
                    with Image.open(pair[col]) as image:  # reads the header only
                        sizes.append(image.size)
                except Exception as err:
                    raise UserError(f"{path}, uid '{pair['uid']}': cannot read {pair[col]}: {err}") from None
            if sizes[0] != sizes[1]:
                raise UserError(f"{path}, uid '{pair['uid']}': the real image is {sizes[0][0]}x{sizes[0][1]} but "
                                f"the fake is {sizes[1][0]}x{sizes[1][1]}; a pair must be pixel-aligned")
        pairs.append(pair)
    return pairs


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit greyscale scaled (PIL's convert clips it to
    white); transparency on WHITE, as a browser shows it, not on the hidden pixels."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.round(array.clip(0, 65535) / 257.0).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """The paper's preprocessing: shorter side to `resolution` (Lanczos), then a centre crop."""
    image = to_rgb(image)
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


def cache_key(model_name, resolution, pairs_csv, need_fake, hashes=None):
    """The cache's name: the model's fingerprint, the resolution, and the CONTENT of the CSV and its images."""
    return digest_of([str(model_name), resolution, need_fake, fingerprint(pairs_csv, hashes or FileHashes())])


# Stored in bf16, half the size (README "Throughput and memory"): a 2^-9 relative
# rounding at most, as the network's bf16 inputs take on the GPU anyway.
CACHE_DTYPE = torch.bfloat16


def build_input_cache(backbone, pairs, resolution, cache_file, need_fake=True, batch_size=8, progress=True,
                      part=(0, 1)):
    """Encode every image and prompt once (README 'Differences from the public code')
    into a safetensors file; N pairs, U unique prompts (0 = ""):
      real_mean, real_std  [N, 2, C, h, w] posterior of the image and of its mirror
                           (a flipped latent is not the flipped image's); fake_* alike
      prompt_embeds        [U, L, D] (+ pooled [U, D], SD-3; T5's padding kept: the MMDiT attends
                           to it), prompt_index [N]
    `part` = (i, k): the i-th of k slices of rows and prompts (one shard)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    all_prompts = [""] + sorted({pair["prompt"] for pair in pairs})
    prompt_id = {prompt: i for i, prompt in enumerate(all_prompts)}
    shard = lambda count: (count * part[0] // part[1], count * (part[0] + 1) // part[1])  # noqa: E731
    prompts = all_prompts[slice(*shard(len(all_prompts)))]
    row_start, row_end = shard(len(pairs))
    tensors = dict(backbone.encode_prompts_once(prompts)) if prompts else {}
    tensors["prompt_index"] = torch.tensor([prompt_id[p["prompt"]] for p in pairs[row_start:row_end]], dtype=torch.long)
    for side in ["real"] + (["fake"] if need_fake else []):
        means, stds = [], []
        for start in tqdm(range(row_start, row_end, batch_size), desc=f"encoding {side} images", disable=not progress):
            batch = []
            for pair in pairs[start : min(start + batch_size, row_end)]:
                try:
                    image = center_crop_resize(Image.open(pair[f"{side}_image_path"]), resolution)
                except Exception as err:
                    raise UserError(f"cannot read {pair[f'{side}_image_path']}: {err}") from None
                pixels = pil_to_tensor(image)
                batch += [pixels, pixels.flip(-1)]
            mean, std = backbone.encode_images(torch.stack(batch))
            means.append(mean.view(-1, 2, *mean.shape[1:]))
            stds.append(std.view(-1, 2, *std.shape[1:]))
        if means:
            tensors[f"{side}_mean"], tensors[f"{side}_std"] = torch.cat(means), torch.cat(stds)
    tensors = {key: value.to(CACHE_DTYPE if value.is_floating_point() else value.dtype).contiguous()
               for key, value in tensors.items()}
    atomic_write(cache_file, lambda tmp: save_file(tensors, tmp), suffix=".safetensors")
    return tensors


def load_or_build_cache(backbone, model_name, pairs_csv, pairs, resolution, cache_dir, need_fake, accelerator):
    """CACHE_DIR/inputs-KEY, built sharded: each of k processes encodes its 1/k
    (shard-i-of-k.safetensors, kept if a build is interrupted), then the main
    process writes manifest.json, which marks it complete."""
    hashes = FileHashes(Path(cache_dir) / HASH_CACHE_FILE)  # what the trainer just hashed (it saves them)
    folder = Path(cache_dir) / f"inputs-{cache_key(model_name, resolution, pairs_csv, need_fake, hashes)}"
    manifest = folder / "manifest.json"
    if not manifest.exists():
        rank, world = getattr(accelerator, "process_index", 0), getattr(accelerator, "num_processes", 1)
        shards = [f"shard-{i:03d}-of-{world:03d}.safetensors" for i in range(world)]
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / shards[rank]).exists():
            logger.info("building shard %d of %d of the input cache %s", rank + 1, world, folder)
            build_input_cache(backbone, pairs, resolution, folder / shards[rank], need_fake,
                              progress=accelerator.is_main_process, part=(rank, world))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_text(manifest, json.dumps({"shards": shards, "rows": len(pairs)}, indent=2))
        accelerator.wait_for_everyone()
    return read_input_cache(folder)


class ShardedRows:
    """A cache tensor whose rows lie in memory-mapped shards, read as if concatenated
    (x[rows], x[rows, per_row_index]). Never concatenated: all of HPDv3 on SD-3.5-M
    would be ~120-150 GiB per process; mapped, a node's processes share the page cache."""

    def __init__(self, parts):
        self.parts = parts  # views of the mapped files, in shard order
        lengths = torch.tensor([len(part) for part in parts])
        self.ends = lengths.cumsum(0)
        self.starts = self.ends - lengths
        self.shape, self.dtype = torch.Size([int(self.ends[-1]), *parts[0].shape[1:]]), parts[0].dtype

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        rows, *per_row = index if isinstance(index, tuple) else (index,)
        rows = torch.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows)
        flat = rows.reshape(-1)
        if len(flat) and not 0 <= int(flat.min()) <= int(flat.max()) < len(self):
            raise IndexError(f"row index out of range for {len(self)} rows")
        shard = torch.bucketize(flat, self.ends, right=True)  # global row -> (shard, row in the shard)
        local = flat - self.starts[shard]
        # row by row into one tensor (torch.stack of bf16 rows fails under CPU fp16 autocast)
        out = torch.empty(len(flat), *self.shape[1:], dtype=self.dtype)
        for i, (s, r) in enumerate(zip(shard.tolist(), local.tolist())):
            out[i] = self.parts[s][r]
        out = out.view(*rows.shape, *self.shape[1:])
        return out[(torch.arange(len(out)), *per_row)] if per_row else out


def read_input_cache(folder):
    """The cache of the folder's manifest: ShardedRows, and prompt_index in memory."""
    from safetensors.torch import load_file

    names = json.loads((Path(folder) / "manifest.json").read_text())["shards"]
    shards = [load_file(str(Path(folder) / name)) for name in names]
    keys = dict.fromkeys(key for shard in shards for key in shard)  # a shard of no prompts/rows lacks some
    parts = {key: [shard[key] for shard in shards if key in shard] for key in keys}
    return {key: torch.cat(parts[key]) if key == "prompt_index" else ShardedRows(parts[key]) for key in keys}


def cond_from_cache(cache, prompt_ids, device):
    """Prompt embeddings of the given prompt indices, as a cond dict."""
    return {key: to_device(cache[key][prompt_ids].float(), device)
            for key in ("prompt_embeds", "pooled_prompt_embeds") if key in cache}


def cat_cond(*conds):
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


# =============================================================================
# 5. The step: micro-batches keyed on their position, their inputs, and the
#    learner's and reference's errors (the loss and the second half of the batch
#    are the scripts')
# =============================================================================


def global_micro_batch_index(step, micro, grad_accum, rank, world):
    """A micro-batch's position over all processes: step s (1-based) holds (s-1)*A*W ...
    s*A*W - 1, so 1 process x accumulation 4 and 2 x 2 cover the same indices."""
    return ((step - 1) * grad_accum + micro) * world + rank


def micro_batch_generator(seed, index, stream=""):
    """The generator of every draw of one micro-batch ("policy" `stream`: Stage 1's
    trajectories, drawn ahead of its turn), keyed on (seed, global index) alone: the
    same run on any number of processes, and a resume needs no generator state."""
    digest = hashlib.sha256(f"realalign/{seed}/{index}{'/' + stream if stream else ''}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") % 2**63)


class MicroBatch(typing.NamedTuple):
    """Its step (1-based), place in it, global index, cache rows (None: --benchmark_steps), generator."""
    step: int
    micro: int
    index: int
    rows: torch.Tensor | None
    generator: torch.Generator


def micro_batches(args, accelerator, grad_accum, num_rows, first_step, last_step):
    """This process's micro-batches of optimizer steps first_step ... last_step, in order."""
    rank, world = accelerator.process_index, accelerator.num_processes
    for step in range(first_step, last_step + 1):
        for micro in range(grad_accum):
            index = global_micro_batch_index(step, micro, grad_accum, rank, world)
            rows = micro_batch_rows(step, micro, grad_accum, rank, world, args.train_batch_size, num_rows,
                                    args.seed) if num_rows else None
            yield MicroBatch(step, micro, index, rows, micro_batch_generator(args.seed, index))


def micro_batch_rows(step, micro, grad_accum, rank, world, batch_size, num_rows, seed):
    """Cache rows of one micro-batch: a seeded permutation per epoch at its global position (nothing to resume)."""
    start = global_micro_batch_index(step, micro, grad_accum, rank, world) * batch_size
    return torch.tensor([int(_epoch_permutation(num_rows, seed, position // num_rows)[position % num_rows])
                         for position in range(start, start + batch_size)])


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_rows, seed, epoch):
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def sample_inputs(backbone, cache, rows, generator, sides, caption_dropout=0.0, flip=True):
    """Clean latents x0 per side ("real", "fake") and prompt embeddings of the rows. A
    pair's sides share one flip (README 'Method: Stage 2': the fake is pixel-aligned;
    the public code flips them independently); a dropped caption becomes ""."""
    n = len(rows)
    flip_index = torch.randint(0, 2, (n,), generator=generator) if flip else torch.zeros(n, dtype=torch.long)
    x0 = {}
    for side in sides:
        mean, std = cache[f"{side}_mean"][rows, flip_index].float(), cache[f"{side}_std"][rows, flip_index].float()
        x0[side] = to_device(backbone.latents_from_posterior(mean, std, generator), backbone.device)
    prompt_ids = cache["prompt_index"][rows].clone()
    if caption_dropout > 0:
        prompt_ids[torch.rand(n, generator=generator) < caption_dropout] = 0  # index 0 = ""
    return x0, cond_from_cache(cache, prompt_ids, backbone.device)


def random_inputs(backbone, n, resolution, generator, sides):
    """Random latents and embeddings of the right shapes (--benchmark_steps)."""
    shape = (n, *backbone.latent_shape(resolution))
    x0 = {side: to_device(torch.randn(shape, generator=generator), backbone.device) for side in sides}
    net_config = backbone.net.config
    if backbone.is_flow:  # CLIP 77 + T5 128 tokens
        cond = {"prompt_embeds": torch.randn(n, 77 + 128, net_config.joint_attention_dim, generator=generator),
                "pooled_prompt_embeds": torch.randn(n, net_config.pooled_projection_dim, generator=generator)}
    else:
        cond = {"prompt_embeds": torch.randn(n, 77, net_config.cross_attention_dim, generator=generator)}
    return x0, {key: to_device(value, backbone.device) for key, value in cond.items()}


def learner_and_ref_errors(backbone, x_t, t, cond, target, own_target_from=None):
    """Per-sample errors of the learner (grad) and the reference (no grad), one forward
    each over the batch. `own_target_from` = m (--policy_target learner, a diagnostic):
    rows m: the learner's own detached prediction is the target, as in the public
    SD-3.5-M trainer (error and gradient exactly 0 there)."""
    net = backbone.net
    use_role(net, REF)
    with torch.no_grad():
        ref_pred = backbone.predict(net, x_t, t, cond)
    use_role(net, LEARNER)
    pred = backbone.predict(net, x_t, t, cond)
    if own_target_from is not None:
        target = torch.cat([target, pred[own_target_from:].detach().to(target.dtype)])
    return per_sample_mse(pred, target), per_sample_mse(ref_pred, target)


# =============================================================================
# 6. The loop: set-up, the optimizer step, and what a run leaves behind
# =============================================================================


def prepare_training(args, stage, need_fake):
    """Checks, accelerator, models, defaults, input cache -> (accelerator, backbone, pairs, cache, grad_accum)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    check_training_args(args)  # before any model loads or folder is made
    pairs = read_pairs_csv(args.pairs, need_fake=need_fake) if not args.benchmark_steps else None
    use_cuda = torch.cuda.is_available()
    if args.mixed_precision is None:  # CPU bf16 kernels are slow: fp32 there
        args.mixed_precision = "bf16" if use_cuda else "no"
    # cpu=True without GPUs: only then does accelerate join torchrun's gloo group
    logging_dir = str(Path(args.output_dir) / args.logging_dir)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not use_cuda,
                              log_with=None if args.report_to == "none" else args.report_to,
                              project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir))
    if use_cuda:  # TF32 matmuls for whatever autocast leaves in fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.allow_tf32
    weight_dtype = MIXED_PRECISION_DTYPES[args.mixed_precision]
    pipe = load_pipeline(args.pretrained_model, dtype=weight_dtype)
    pipe.vae.to(torch.float32)  # latents are encoded once and decoded for grids only
    backbone = Backbone(pipe, accelerator.device, weight_dtype)
    apply_defaults(args, stage, backbone, pairs)
    per_step = args.train_batch_size * accelerator.num_processes  # effective = batch x processes x accumulation
    if args.effective_batch_size % per_step:
        raise UserError(f"--effective_batch_size {args.effective_batch_size} is not a multiple of "
                        f"--train_batch_size {args.train_batch_size} x {accelerator.num_processes} processes")
    grad_accum = args.effective_batch_size // per_step
    # what the run reads, by content (after loading: a hub model is now in the local cache)
    cache_dir = args.cache_dir or str(Path(args.output_dir).resolve().parent / "cache")
    hashes = FileHashes(Path(cache_dir) / HASH_CACHE_FILE)
    inputs = {flag: fingerprint(getattr(args, key), hashes) for key, flag in INPUT_FLAGS.items() if getattr(args, key)}
    if args.resume:
        check_resume(args, inputs)
    if args.init_network:
        load_network_override(backbone, args.init_network)
    pipe.vae.to(accelerator.device)
    backbone.net.to(accelerator.device)
    if args.gradient_checkpointing:
        backbone.net.enable_gradient_checkpointing()
    if use_cuda and backbone.kind == "sd15":  # cuDNN's fastest convolutions want NHWC
        backbone.net.to(memory_format=torch.channels_last)
    args.compile = use_cuda if args.compile is None else args.compile
    if args.compile:
        compile_network(backbone.net)
    cache = None
    if pairs is not None:  # the latents and embeddings depend on the model's content, not its path
        model_name = digest_of([inputs.get("--pretrained_model"), inputs.get("--init_unet"), backbone.kind])
        hashes.save()
        cache = load_or_build_cache(backbone, model_name, args.pairs, pairs, args.resolution, cache_dir,
                                    need_fake, accelerator)
    with writing(args.output_dir):
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    args.num_processes, args.gradient_accumulation_steps = accelerator.num_processes, grad_accum
    log_world_size(accelerator.num_processes, f"stage {1 if stage == 'dro' else 2}", accelerator.is_main_process)
    if accelerator.is_main_process:
        atomic_write_text(Path(args.output_dir) / "args.json", json.dumps(public_args(args), indent=2, default=str))
        atomic_write_text(Path(args.output_dir) / "inputs.json", json.dumps(inputs, indent=1))
        logger.info("%s on %s: %d processes x batch %d x accumulation %d = %d samples per step", backbone.kind,
                    accelerator.device, accelerator.num_processes, args.train_batch_size, grad_accum,
                    args.effective_batch_size)
    return accelerator, backbone, pairs, cache, grad_accum


def compile_network(net, backend="inductor"):
    """torch.compile the repeated blocks one by one (diffusers' regional compilation):
    seconds instead of minutes. Each role (`use_role` sets an attribute dynamo guards
    on), shape and grad mode compiles once: static shapes, a cache limit that fits."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    net._repeated_blocks = getattr(net, "_repeated_blocks", None) or ["JointTransformerBlock"]  # none for SD-3
    net.compile_repeated_blocks(backend=backend, dynamic=False)
    return net


def make_optimizer(args, params):
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay, eps=args.adam_epsilon,
                                  fused=torch.cuda.is_available())
    return optimizer, get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.lr_warmup_steps)


def all_reduce_gradients(params, accelerator):
    """Average the LoRA gradients over processes in one flat all-reduce (not DDP: one LoRA role trains)."""
    if accelerator.num_processes == 1:
        return
    flat = accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in params]), reduction="mean")
    for p, value in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(value.view_as(p))


def mixed_precision_autocast(args, backbone):
    """Ours, not accelerator.autocast(): accelerate does not autocast fp16 on CPU, where the fp16 path is tested."""
    if args.mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(backbone.device.type, dtype=MIXED_PRECISION_DTYPES[args.mixed_precision])


def optimize(args, accelerator, backbone, roles, lora_config, cache, grad_accum, micro_batch_loss,
             after_optimizer_step=None):
    """The training loop of both stages (paper Sec. 3): per optimizer step,
    accumulate `micro_batch_loss(micro_batch)` -> (loss, stats) over the effective
    batch, average the gradients over processes, clip, step AdamW and the EMA;
    then `after_optimizer_step(step)` (Stage 1 refreshes its sampling snapshot).
    What the run leaves behind (metrics, checkpoints, state, hub) is `RunRecord`'s."""
    from tqdm.auto import tqdm

    params = role_parameters(backbone.net, LEARNER)
    optimizer, lr_scheduler = make_optimizer(args, params)
    ema = LoraEMA(params, args.ema_decay, args.ema_every, args.ema_schedule) if args.use_ema else None
    seed_everything(args.seed)  # alike on every process; training itself draws from `micro_batch_generator`
    # fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not
    scaler = torch.amp.GradScaler(backbone.device.type, enabled=args.mixed_precision == "fp16")
    start_step = (load_training_state(args, accelerator, backbone, roles, optimizer, lr_scheduler, ema, scaler)
                  if args.resume else 0)
    if accelerator.num_processes > 1:  # every process must hold the same LoRA weights
        checksum = torch.stack([p.detach().double().sum() for p in params]).sum().view(1).to(backbone.device)
        if not torch.allclose(accelerator.gather(checksum), checksum):
            raise RuntimeError("the processes start from different LoRA weights")
    record = RunRecord(args, accelerator, backbone, roles, lora_config, cache, optimizer, lr_scheduler, ema, scaler,
                       start_step)
    num_rows = len(cache["prompt_index"]) if cache is not None else 0
    max_steps = args.benchmark_steps or args.max_train_steps
    progress = tqdm(total=max_steps * grad_accum, initial=start_step * grad_accum, unit="micro-batch",
                    desc="training", disable=not accelerator.is_main_process)  # one step may be many micro-batches
    if backbone.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backbone.device)
    records = []
    for step in range(start_step + 1, max_steps + 1):
        step_start, totals = time.perf_counter(), {}
        for micro_batch in micro_batches(args, accelerator, grad_accum, num_rows, step, step):
            with mixed_precision_autocast(args, backbone):
                loss, stats = micro_batch_loss(micro_batch)
            scaler.scale(loss / grad_accum).backward()
            for key, value in {**stats, "loss": loss.detach()}.items():
                totals[key] = totals.get(key, 0.0) + value / grad_accum
            progress.update(1)
            if step == start_step + 1 and micro_batch.micro == 0 and grad_accum > 1:
                record.announce_run_time(grad_accum, max_steps - start_step, step_start)
        all_reduce_gradients(params, accelerator)
        # unscaled after the all-reduce: every process finds the same inf/NaN and skips the same fp16 steps
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        scaler.step(optimizer)  # optimizer.step(), unless fp16 gradients overflowed
        scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params, step)
        extra = after_optimizer_step(step) if after_optimizer_step else {}
        records.append(record.log_step(step, totals, grad_norm, scaler, lr_scheduler, step_start, extra))
        progress.set_postfix(step=f"{step}/{max_steps}", loss=f"{records[-1]['loss']:.4g}")
        if step % args.checkpoint_every == 0 or step == max_steps:
            record.checkpoint(step, params)
        check_interrupted()  # a Ctrl-C that a finalizer swallowed stops the run here
    if record.enabled and args.push_to_hub:
        push_final_checkpoint(args, accelerator, backbone, cache)
    progress.close()
    return records


class RunRecord:
    """What a run leaves behind: OUTPUT_DIR/metrics.jsonl and the trackers each
    step, checkpoint-STEP and state/ every --checkpoint_every steps. With
    --benchmark_steps nothing (the loop returns its records)."""

    def __init__(self, args, accelerator, backbone, roles, lora_config, cache, optimizer, lr_scheduler, ema, scaler,
                 start_step):
        self.args, self.accelerator, self.backbone, self.roles, self.lora_config = (args, accelerator, backbone,
                                                                                   roles, lora_config)
        self.cache, self.optimizer, self.lr_scheduler, self.ema = cache, optimizer, lr_scheduler, ema
        self.scaler = scaler
        self.enabled, self.last_saved = not args.benchmark_steps, start_step
        main = accelerator.is_main_process and self.enabled
        if start_step:
            logger.info("resumed from step %d", start_step)
        if start_step >= (args.benchmark_steps or args.max_train_steps):
            logger.info("already finished (%d steps)", start_step)
        init_trackers(args, accelerator, start_step)  # not with --benchmark_steps
        self.metrics = MetricsLog(Path(args.output_dir) / "metrics.jsonl", start_step, main)
        self.validation = None
        if cache is not None and args.sample_grid_steps > 0 and main and args.validation_prompts:
            # embeddings of ["", *prompts], encoded once
            self.validation = backbone.encode_prompts_once(["", *args.validation_prompts])

    def announce_run_time(self, grad_accum, steps_left, step_start):
        """After the first micro-batch, a rough (high) estimate of the run's time: a
        CPU run at the paper's batch of 256 says at once that it would take days."""
        if not self.enabled:
            return
        if self.backbone.device.type == "cuda":
            torch.cuda.synchronize(self.backbone.device)
        seconds = time.perf_counter() - step_start
        if self.accelerator.is_main_process:
            logger.info("one optimizer step = %d micro-batches of %d per process; the first took %.1f s: about %s "
                        "per step, %s for the %d steps left (a smaller --effective_batch_size means fewer "
                        "micro-batches)", grad_accum, self.args.train_batch_size, seconds,
                        format_duration(seconds * grad_accum), format_duration(seconds * grad_accum * steps_left),
                        steps_left)

    def log_step(self, step, totals, grad_norm, scaler, lr_scheduler, step_start, extra):
        """One host sync per step: stats averaged over processes, grad norm; a non-finite one stops the run unsaved."""
        args, accelerator, device = self.args, self.accelerator, self.backbone.device
        keys = sorted(totals)
        means = torch.stack([torch.as_tensor(totals[k], dtype=torch.float32, device=device) for k in keys])
        means = accelerator.reduce(means, reduction="mean") if accelerator.num_processes > 1 else means
        values = torch.cat([means, grad_norm.detach().float().view(1).to(means.device)]).tolist()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - step_start
        checked = dict(zip(keys, values))
        if not scaler.is_enabled():  # fp16: an overflowing gradient is expected now and then, the scaler skips it
            checked["grad_norm"] = values[-1]
        self.check_finite(step, checked)
        record = {"step": step, **{k: float(v) for k, v in zip(keys, values)}, "grad_norm": values[-1],
                  "lr": lr_scheduler.get_last_lr()[0], "samples_per_s": args.effective_batch_size / seconds,
                  "step_seconds": seconds, "peak_memory_gb": peak_memory_gb(device), **(extra or {})}
        if scaler.is_enabled():
            record["grad_scale"] = scaler.get_scale()
        self.metrics.write(record)
        accelerator.log({key: value for key, value in record.items() if key != "step"}, step=step)
        return record

    def check_finite(self, step, values):
        """A diverged run stops with a UserError naming the step and every non-finite quantity."""
        bad = [name for name, value in values.items() if not math.isfinite(value)]
        if bad:
            kept = (f"the last good state is {Path(self.args.output_dir) / 'state'} (step {self.last_saved})"
                    if self.last_saved else "nothing was saved")
            raise UserError(f"step {step}: non-finite {', '.join(bad)} (the run diverged); training stopped and "
                            f"this step was not saved; {kept}. A lower --learning_rate (in a new --output_dir) "
                            "may help")

    def checkpoint(self, step, params):
        """checkpoint-STEP and state/ (weights can overflow while the loss that moved them was finite: checked)."""
        if not self.enabled:
            return
        saved = params + (self.ema.shadow if self.ema is not None else [])
        finite = bool(torch.stack([p.detach().isfinite().all() for p in saved]).all())
        self.check_finite(step, {"LoRA weights": 0.0 if finite else math.nan})
        save_checkpoint(self.args, self.accelerator, step, self.backbone, self.lora_config, params, self.ema,
                        self.cache, self.validation)
        save_training_state(self.args, self.accelerator, step, self.backbone, self.roles, self.optimizer,
                            self.lr_scheduler, self.ema, self.scaler)
        self.last_saved = step


def format_duration(seconds):
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


class MetricsLog:
    """OUTPUT_DIR/metrics.jsonl, a line per step (main process); on resume, cut to match the resumed weights."""

    def __init__(self, path, resume_step, enabled):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            kept = []
            for line in self.path.read_text().splitlines() if resume_step and self.path.exists() else []:
                with contextlib.suppress(ValueError):  # a line cut short by a kill or a full disk: dropped
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record):
        if self.enabled:
            with writing(self.path), open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


@torch.no_grad()
def save_checkpoint(args, accelerator, step, backbone, lora_config, params, ema, cache, validation):
    """OUTPUT_DIR/checkpoint-STEP: the (EMA) LoRA in both formats, model card, grid; curves.png beside it."""
    if not accelerator.is_main_process:
        return
    final = Path(args.output_dir) / f"checkpoint-{step}"
    tmp = make_temp_dir(final)
    weights = ema.shadow if ema is not None else None
    with writing(final):
        save_lora_checkpoint(backbone, lora_state_dict(backbone.net, LEARNER, weights), lora_config, tmp)
        (tmp / ".mode").touch()  # diffusers writes its weights 0600: give them the mode a plain open() gets
        mode = (tmp / ".mode").stat().st_mode & 0o777
        (tmp / ".mode").unlink()
        for file in tmp.iterdir():
            if file.is_file():
                file.chmod(mode)
        if args.sample_grid_steps > 0 and validation is not None:
            use_role(backbone.net, LEARNER)
            with weights_swapped(params, weights):  # the grid shows the checkpoint's (EMA) weights
                images = generate_grid_images(backbone, validation, args, seeds=(0, 1))
            save_sample_grid(images, args.validation_prompts, (0, 1), tmp / "grid.png",
                             title=f"{final.name}{' (EMA weights)' if ema is not None else ''}: "
                                   f"{args.sample_grid_steps} steps, guidance {args.guidance_scale}")
            with Image.open(tmp / "grid.png") as grid:
                log_grid(accelerator, grid.convert("RGB"), step)
        write_model_card(args, backbone.kind, tmp, step, num_pairs=len(cache["prompt_index"]) if cache else None)
        replace_dir(tmp, final)
        prune_checkpoints(args)
        if (Path(args.output_dir) / "metrics.jsonl").exists():
            plot_training_curves(Path(args.output_dir) / "metrics.jsonl", Path(args.output_dir) / "curves.png")
    logger.info("saved %s", final)


def generate_grid_images(backbone, validation, args, seeds):
    """The validation prompts (embeddings of ["", *prompts]) with CFG, one row per seed."""
    n = len(validation["prompt_embeds"]) - 1
    cond = cond_from_cache(validation, torch.arange(1, n + 1), backbone.device)
    uncond = cond_from_cache(validation, torch.zeros(n, dtype=torch.long), backbone.device)
    kwargs = {"prompt_embeds": cond["prompt_embeds"], "negative_prompt_embeds": uncond["prompt_embeds"]}
    if backbone.is_flow:
        kwargs.update(pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                      negative_pooled_prompt_embeds=uncond["pooled_prompt_embeds"])
    kwargs = {key: value.to(backbone.dtype) for key, value in kwargs.items()}
    images = []
    for seed in seeds:
        with mixed_precision_autocast(args, backbone):
            images += backbone.pipe(**kwargs, num_inference_steps=args.sample_grid_steps,
                                    guidance_scale=args.guidance_scale, height=args.resolution, width=args.resolution,
                                    generator=[torch.Generator().manual_seed(seed) for _ in range(n)]).images
    return images


def save_training_state(args, accelerator, step, backbone, roles, optimizer, lr_scheduler, ema, scaler):
    """OUTPUT_DIR/state: what --resume needs, atomically, in tensors, numbers and
    strings only (loaded with weights_only=True: a state file cannot run code);
    each rank adds its global RNG states, for a library drawing from them."""
    from accelerate.utils import broadcast_object_list

    state_dir = Path(args.output_dir) / "state"
    tmp = make_temp_dir(state_dir) if accelerator.is_main_process else None
    tmp = broadcast_object_list([tmp])[0] if accelerator.num_processes > 1 else tmp
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
           "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                     "gauss": float(gauss)},
           "python": [version, list(internal), py_gauss]}
    atomic_save_torch(rng, tmp / f"rng_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        roles = {role: [p.detach().cpu() for p in role_parameters(backbone.net, role)] for role in roles}
        atomic_save_torch({"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                           "ema": ema.state_dict() if ema else None, "num_processes": accelerator.num_processes,
                           "grad_scaler": scaler.state_dict(),  # fp16's loss scale ({} otherwise)
                           "roles": roles}, tmp / "training_state.pt")
        replace_dir(tmp, state_dir)
    accelerator.wait_for_everyone()


def load_training_state(args, accelerator, backbone, roles, optimizer, lr_scheduler, ema, scaler):
    """Restore OUTPUT_DIR/state; returns its step (extra processes take rank 0's RNG states)."""
    state_dir = Path(args.output_dir) / "state"
    try:
        state = torch.load(state_dir / "training_state.pt", map_location="cpu", weights_only=True)
        rank_file = state_dir / f"rng_rank{accelerator.process_index}.pt"
        rng = torch.load(rank_file if rank_file.exists() else state_dir / "rng_rank0.pt", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read the saved state in {state_dir} ({first_line(err)}); it was written by an "
                        "older version or is damaged") from None
    if state["num_processes"] != accelerator.num_processes:
        logger.info("the state was saved by %d processes, this run has %d: the same run continues (every random "
                    "draw is keyed on the global sample position)", state["num_processes"], accelerator.num_processes)
    with torch.no_grad():
        for role in roles:
            for p, value in zip(role_parameters(backbone.net, role), state["roles"][role], strict=True):
                p.copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    if state.get("grad_scaler"):  # fp16: the loss scale goes on where it was, not from 65536 again
        scaler.load_state_dict(state["grad_scaler"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, py_gauss = rng["python"]
    random.setstate((version, tuple(internal), py_gauss))
    return int(state["step"])


# =============================================================================
# Plumbing: flags, errors, devices, safe writes, PickScore, --help, figures,
# trackers, model card, hub
# =============================================================================

# ---- the trainers' flags ----
# The paper's defaults (README 'Method: Stage 1' and 'Stage 2'); a flag the user
# gives wins. What a backbone keeps in both stages, then what each stage sets.
BACKBONE_DEFAULTS = {
    "sd15": dict(lora_rank=4, lora_alpha=4, weight_decay=0.01, train_batch_size=4, ema_decay=0.9999, ema_every=1,
                 ema_schedule="diffusers", guidance_scale=7.5),
    "sd3": dict(lora_rank=32, lora_alpha=64, weight_decay=1e-4, train_batch_size=1, ema_decay=0.9, ema_every=8,
                ema_schedule="flow_grpo", guidance_scale=4.5),
}
STAGE_DEFAULTS = {
    "dro": {"sd15": dict(learning_rate=1e-4, lr_warmup_steps=0, max_train_steps=3200, use_ema=True, sampler_steps=20),
            "sd3": dict(learning_rate=2e-4, lr_warmup_steps=0, max_train_steps=3200, use_ema=True, sampler_steps=10)},
    "dpo": {"sd15": dict(learning_rate=2.56e-6, lr_warmup_steps=125, max_train_steps=1000, use_ema=False, beta=2000.0),
            # SD-3.5-M Stage 2 keeps an EMA: the public config trains with it, so
            # Table 1's step-450 checkpoint holds EMA weights
            "sd3": dict(learning_rate=2.56e-6, lr_warmup_steps=0, max_train_steps=1000, use_ema=True, beta=100.0)},
}
STAGE_NAMES = {"dro": "stage1", "dpo": "stage2"}
STAGE_TITLES = {"stage1": "Stage 1, Diffusion-DRO on real images",
                "stage2": "Stage 2, Diffusion-DPO on real vs inpainted pairs"}
MIXED_PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SECRET_ARGS = ("hub_token",)  # never written to args.json, the trackers or a model card


def add_training_args(parser, stage):
    """Flags both trainers share (`stage`: "dro" or "dpo"); a per-backbone default is None, set by `apply_defaults`."""
    parser.formatter_class = HelpFormatter
    paper = lambda key: f"({backbone_default_help(key, stage)})"  # noqa: E731
    g = parser.add_argument_group("model and data")
    g.add_argument("--pretrained_model", "--pretrained_model_name_or_path",
                   default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="hub id or folder of an SD-1.5- or SD-3-style diffusers pipeline")
    g.add_argument("--pairs", help="pairs CSV of curate.py; needed unless --benchmark_steps (default: none)")
    g.add_argument("--output_dir", required=True, help="checkpoints, state/, metrics.jsonl and args.json")
    g.add_argument("--init_lora", help="start from this LoRA (file, folder or hub id, diffusers or PEFT format); "
                                       "it is also the reference (default: none, a fresh LoRA)")
    g.add_argument("--init_unet", "--init_transformer", dest="init_network",
                   help="replace the pipeline's UNet/transformer first, e.g. mhdang/dpo-sd1.5-text2image-v1 "
                        "(default: none)")
    g.add_argument("--resolution", type=resolution_int, default=512, help="training resolution in pixels")
    g.add_argument("--cache_dir", help="input cache folder (default: OUTPUT_DIR/../cache)")
    g = parser.add_argument_group("optimisation (unset = the paper's value for the backbone)")
    g.add_argument("--train_batch_size", type=positive_int, help=f"per-device micro-batch {paper('train_batch_size')}")
    g.add_argument("--effective_batch_size", type=positive_int, default=256,
                   help="samples per optimizer step over all processes (accumulation = this / batch / processes)")
    g.add_argument("--max_train_steps", type=positive_int, help=f"optimizer steps {paper('max_train_steps')}")
    g.add_argument("--learning_rate", type=positive_float, help=f"AdamW learning rate {paper('learning_rate')}")
    g.add_argument("--lr_warmup_steps", type=non_negative_int,
                   help=f"linear warm-up, then constant {paper('lr_warmup_steps')}")
    g.add_argument("--weight_decay", type=non_negative_float, help=f"AdamW weight decay {paper('weight_decay')}")
    g.add_argument("--adam_beta1", type=decay, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=decay, default=0.999, help="AdamW beta2")
    g.add_argument("--adam_epsilon", type=positive_float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--max_grad_norm", type=positive_float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--lora_rank", type=positive_int, help=f"LoRA rank; ignored with --init_lora {paper('lora_rank')}")
    g.add_argument("--lora_alpha", type=positive_int, help=f"LoRA alpha {paper('lora_alpha')}")
    g.add_argument("--use_ema", action=argparse.BooleanOptionalAction,
                   help=f"checkpoints hold an EMA of the LoRA weights {paper('use_ema')}")
    g.add_argument("--ema_decay", type=decay, help=f"largest EMA decay {paper('ema_decay')}")
    g.add_argument("--ema_every", type=positive_int, help=f"EMA update interval in steps {paper('ema_every')}")
    g.add_argument("--no_flip", action="store_true", help="disable the random horizontal flip")
    g.add_argument("--seed", type=seed_int, default=0, help="seeds the LoRA init and every random draw")
    g = parser.add_argument_group("run")
    g.add_argument("--checkpoint_every", "--checkpointing_steps", type=positive_int, default=100,
                   help="save a checkpoint and the state every N steps")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/state")
    g.add_argument("--allow_unusual", action="store_true", help="accept a --train_batch_size larger than the pairs "
                   "CSV and --caption_dropout 1 (legal, almost surely a mistake)")
    g.add_argument("--sample_grid_steps", type=non_negative_int, default=25,
                   help="sampling steps of each checkpoint's image grid; 0: no grid")
    g.add_argument("--guidance_scale", type=non_negative_float, help=f"CFG of the grids {paper('guidance_scale')}")
    g.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for activation memory")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the UNet/transformer (default: on with CUDA, off on CPU)")
    g.add_argument("--benchmark_steps", type=non_negative_int, default=0,
                   help="time N optimizer steps on random inputs (no CSV, nothing saved)")
    # diffusers' training examples' handles; no --dataloader_num_workers: there is no data loader
    g = parser.add_argument_group("precision, logging and hub")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="compute precision of the frozen "
                   "network; LoRA weights stay fp32, fp16 uses a gradient scaler (default: bf16 on GPU, no on CPU)")
    g.add_argument("--allow_tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on Ampere or newer GPUs")
    g.add_argument("--report_to", choices=["tensorboard", "wandb", "all", "none"], default="tensorboard",
                   help="tracker of every metric and grid, through accelerate")
    g.add_argument("--logging_dir", default="logs", help="tracker folder, relative to OUTPUT_DIR")
    g.add_argument("--tracker_project_name", help="tracker run name (default: realalign-stage1/-stage2)")
    g.add_argument("--validation_prompts", nargs="+",
                   help="prompts of the grids (default: the first four distinct prompts of the pairs)")
    g.add_argument("--checkpoints_total_limit", type=positive_int,
                   help="keep the newest N checkpoints and --final_checkpoint (default: keep all)")
    g.add_argument("--final_checkpoint", type=positive_int, help="the step this run delivers: kept by "
                   "--checkpoints_total_limit, uploaded by --push_to_hub (default: the last)")
    g.add_argument("--resume_from_checkpoint", choices=["latest"], action=_ResumeLatest, dest="resume",
                   default=argparse.SUPPRESS, help="diffusers' name of --resume (default: off)")
    g.add_argument("--push_to_hub", action="store_true", help="upload the final checkpoint to the hub")
    g.add_argument("--hub_model_id", help="hub repository (default: the name of OUTPUT_DIR)")
    g.add_argument("--hub_token", help="hub token (default: the one of `hf auth login`, safer than a flag)")
    return parser


class _ResumeLatest(argparse.Action):
    """`--resume_from_checkpoint latest` sets --resume: OUTPUT_DIR/state is always the latest."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)


# What may differ on --resume (README "Resuming"): how long a run goes, what it
# saves, how it computes; never what a step computes. LAUNCH_FLAGS are set by the
# launch (any process count trains the same run); INPUT_FLAGS are compared by content.
RESUME_SAFE_FLAGS = ("max_train_steps", "checkpoint_every", "sample_grid_steps", "guidance_scale", "resume",
                     "gradient_checkpointing", "cache_dir", "output_dir", "benchmark_steps", "compile", "allow_tf32",
                     "checkpoints_total_limit", "final_checkpoint", "validation_prompts", "report_to", "logging_dir",
                     "tracker_project_name", "push_to_hub", "hub_model_id", "sampler_slots", "allow_unusual")
LAUNCH_FLAGS = ("num_processes", "gradient_accumulation_steps")
NOT_FLAGS = ("resume", "output_dir", "benchmark_steps", "allow_unusual")  # safe, not worth naming in a message
INPUT_FLAGS = {"pairs": "--pairs", "pretrained_model": "--pretrained_model", "init_lora": "--init_lora",
               "init_network": "--init_unet"}


def public_args(args):
    return {key: value for key, value in vars(args).items() if key not in SECRET_ARGS}


def check_training_args(args):
    """Before any model loads: refuse a missing tracker, stray hub flags, an output folder in use or taken."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    installed = {"tensorboard": is_tensorboard_available(), "wandb": bool(is_wandb_available())}
    if args.report_to in installed and not installed[args.report_to]:
        raise UserError(f"--report_to {args.report_to}: {args.report_to} is not installed "
                        f"(pip install {args.report_to}), or pass --report_to none")
    if (args.hub_model_id or args.hub_token) and not args.push_to_hub:
        raise UserError("--hub_model_id and --hub_token only make sense with --push_to_hub")
    output_dir, state = Path(args.output_dir), Path(args.output_dir) / "state"
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file, not a folder")
    if int(os.environ.get("RANK", "0")) == 0:  # one lock per run, held by its main process
        lock_output_dir(output_dir, "training run")
        for leftover in output_dir.glob(".*.tmp-*"):  # temporaries of a run that was stopped (we hold the lock)
            shutil.rmtree(leftover, ignore_errors=True)
    recover_dir(state)
    if args.resume and not (state / "training_state.pt").exists():
        raise UserError(f"--resume: no saved state in {state}")
    if not args.resume and state.exists():
        raise UserError(f"{args.output_dir} already holds a run (state/); pass --resume or use another --output_dir")
    if not args.pairs and not args.benchmark_steps:
        raise UserError("--pairs is required (the pairs CSV written by curate.py)")


def apply_defaults(args, stage, backbone, pairs):
    """The paper's per-backbone values of unset flags; the checks that need the model or the pairs."""
    for key, value in {**BACKBONE_DEFAULTS[backbone.kind], **STAGE_DEFAULTS[stage][backbone.kind]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    check_resolution(backbone, args.resolution)
    if pairs is not None and args.train_batch_size > len(pairs) and not args.allow_unusual:
        raise UserError(f"--train_batch_size {args.train_batch_size} is larger than the {len(pairs)} pairs of "
                        f"{args.pairs}: every micro-batch would repeat pairs. Pass --allow_unusual if you mean it")
    args.stage = STAGE_NAMES[stage]
    if args.tracker_project_name is None:
        args.tracker_project_name = f"realalign-{args.stage}"
    if args.validation_prompts is None:  # the first four distinct prompts of the pairs
        args.validation_prompts = list(dict.fromkeys(pair["prompt"] for pair in pairs or []))[:4]
    final, last = args.final_checkpoint, args.max_train_steps
    if final is not None and not args.benchmark_steps and (
            final > last or final % args.checkpoint_every and final != last):
        raise UserError(f"--final_checkpoint {final} is not a step that gets a checkpoint "
                        f"(multiples of --checkpoint_every {args.checkpoint_every}, or --max_train_steps {last})")


def check_resume(args, inputs):
    """--resume: refuse a flag outside RESUME_SAFE_FLAGS that differs from args.json,
    or an input whose content changed (inputs.json): one run on two datasets or models."""
    try:
        previous = json.loads((Path(args.output_dir) / "args.json").read_text())
    except (OSError, ValueError):
        previous = None  # no record to compare with (a run stopped before its first write)
    current = json.loads(json.dumps(public_args(args), default=str))
    changed = [f"--{key} {previous.get(key)!r} -> {value!r}" for key, value in current.items()
               if key not in RESUME_SAFE_FLAGS + LAUNCH_FLAGS + tuple(INPUT_FLAGS) and previous.get(key) != value
               ] if previous is not None else []
    if changed:
        safe = ", ".join("--" + flag for flag in RESUME_SAFE_FLAGS if flag not in NOT_FLAGS)
        raise UserError(f"--resume with other settings than the run in {args.output_dir} ({'; '.join(changed)}). "
                        f"Only these may change on resume: {safe}; start a new run in another --output_dir for "
                        "the rest")
    try:
        previous = json.loads((Path(args.output_dir) / "inputs.json").read_text())
    except (OSError, ValueError):
        return
    changed = [f"{flag} ({fingerprint_changes(previous.get(flag), inputs.get(flag)) or 'given or dropped'})"
               for flag in dict.fromkeys([*previous, *inputs]) if previous.get(flag) != inputs.get(flag)]
    if changed:
        raise UserError(f"--resume: what the run in {args.output_dir} reads changed since it started: "
                        f"{'; '.join(changed)}. Start afresh in another --output_dir (or delete this one)")


# ---- errors: one line and exit 2, never a traceback ----
class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def flag_type(convert, allowed, test):
    """An argparse type: "argument --beta: must be a finite number > 0 (got 0)" before anything loads."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed} (got {text!r})") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {allowed} (got {text})")
        return value
    parse.__name__ = allowed  # argparse names the type in some messages
    return parse


positive_int = flag_type(int, "an integer >= 1", lambda v: v >= 1)
non_negative_int = flag_type(int, "an integer >= 0", lambda v: v >= 0)
seed_int = flag_type(int, "an integer in [0, 2^32)", lambda v: 0 <= v < 2**32)  # numpy's seed range
positive_float = flag_type(float, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)
non_negative_float = flag_type(float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
finite_float = flag_type(float, "a finite number", math.isfinite)
probability = flag_type(float, "a probability in [0, 1]", lambda v: 0 <= v <= 1)
decay = flag_type(float, "a number in [0, 1)", lambda v: 0 <= v < 1)  # AdamW betas, EMA decay
# every VAE of these pipelines downsamples by 8 (the model's own factor is checked once it is loaded)
resolution_int = flag_type(int, "a multiple of 8, at least 8", lambda v: v >= 8 and v % 8 == 0)


def check_resolution(backbone, resolution):
    """Whole latent patches: a multiple of the VAE factor (8; tiny test models 2) times the patch (SD-3: 2)."""
    vae, patch = backbone.pipe.vae_scale_factor, backbone.net.config.get("patch_size", 1)
    if resolution % (vae * patch):
        raise UserError(f"--resolution {resolution} must be a multiple of {vae * patch} for this model (its VAE "
                        f"factor {vae} x patch size {patch})")


def read_text(path):
    """A user's text file: UTF-8, with or without a byte-order mark; anything else is one UserError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start} is {data[err.start:err.start + 1]!r}); "
                        "save it as UTF-8 (with or without a byte-order mark)") from None


# The authors' repository (Cwyxx/RealAlign) at the commit this reproduction was checked against: their
# instruments (the question asked to a VLM, the prompt files) are read from it at run time, never copied here.
AUTHORS_COMMIT = "158ce2826b51566f58131235911e313a9313c91c"
AUTHORS_REPO = f"https://raw.githubusercontent.com/Cwyxx/RealAlign/{AUTHORS_COMMIT}"


def download_url(url, path):  # the tests replace it to serve local files
    torch.hub.download_url_to_file(url, str(path), progress=False)


def fetch_authors_file(relpath, cache_dir, what, offline_alternative=""):
    """RELPATH of the authors' repository, fetched once into CACHE_DIR/authors/COMMIT/RELPATH;
    offline, one UserError naming the URL and where to place the file."""
    url, cached = f"{AUTHORS_REPO}/{relpath}", Path(cache_dir) / "authors" / AUTHORS_COMMIT / relpath
    if not cached.is_file():
        tmp = cached.with_name(cached.name + ".download")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            download_url(url, tmp)
        except Exception as err:
            cause = (str(err).strip().splitlines() or [""])[0]
            raise UserError(f"could not fetch {what} from {url} ({type(err).__name__}: {cause}); offline, download "
                            f"that file and place it at {cached}{offline_alternative}") from None
        os.replace(tmp, cached)
    return cached

# Ctrl-C is recorded before it is raised: Python runs a signal handler between any
# two bytecodes, also inside a finalizer, where an exception is printed as "Exception
# ignored in ..." and dropped (seen while a model card was written).
# `check_interrupted` re-raises it at the next safe point, run_main at the latest.
INTERRUPTS = []


def _on_interrupt(signum, frame):
    INTERRUPTS.append(signum)
    raise KeyboardInterrupt


def _on_unraisable(unraisable):
    """Python's report of an exception a finalizer dropped, silent for a Ctrl-C (kept in INTERRUPTS)."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def check_interrupted():
    if INTERRUPTS:  # a Ctrl-C arrived, even one a finalizer swallowed
        raise KeyboardInterrupt


def quiet_libraries():
    """Only our own messages: no loading chatter or progress bars (called where the libraries are first used)."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


# Known-harmless notices, silenced at their loggers only: without torchvision,
# CLIPImageProcessor uses its PIL version (the one PickScore was trained with);
# saving a pipeline with an absent optional component (safety_checker=None).
for _logger, _notice in (("transformers.utils.import_utils", "requires torchvision (not installed)"),
                         ("diffusers.pipelines.pipeline_utils", "=None of type <class 'NoneType'> cannot be saved")):
    logging.getLogger(_logger).addFilter(lambda record, notice=_notice: notice not in record.getMessage())


def run_main(main):
    """`main()` with a UserError or file error as one line and exit 2, Ctrl-C as "interrupted" and exit 130."""
    import signal
    import threading
    import warnings

    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO, datefmt="%H:%M:%S")
    for library in ("DIFFUSERS", "TRANSFORMERS"):  # read when the library is imported (after the flags)
        os.environ.setdefault(f"{library}_VERBOSITY", "error")
    if "diffusers" in sys.modules or "transformers" in sys.modules:
        quiet_libraries()
    warnings.filterwarnings("ignore", message=".*peft_config.*")  # peft's "several adapters": one per role, meant
    warnings.filterwarnings("ignore", category=FutureWarning)
    main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, _on_interrupt) if main_thread else None
    previous_hook, sys.unraisablehook = sys.unraisablehook, _on_unraisable
    try:
        main()
        check_interrupted()
    except (UserError, OSError) as err:  # an OSError no writer caught: still one line, naming the file
        print(f"error: {err if isinstance(err, UserError) else io_error_message(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        INTERRUPTS.clear()
        sys.unraisablehook = previous_hook
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)


# ---- devices and processes ----
def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (CPU bf16 kernels are slow and imprecise)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """Host -> device; on CUDA through pinned memory without blocking: the host queues the next kernels meanwhile."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def peak_memory_gb(device) -> float:
    """Peak GPU memory allocated, or the process's peak RSS on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def requested_num_processes(environ=None, launcher_cmdline=None):
    """How many processes the launcher was asked for: WORLD_SIZE, else the
    `--num_processes N` of an `accelerate launch` parent (which with --cpu starts
    ONE process and says nothing); None when unknown."""
    environ = os.environ if environ is None else environ
    if environ.get("WORLD_SIZE"):
        return int(environ["WORLD_SIZE"])
    if launcher_cmdline is None:
        try:
            launcher_cmdline = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
        except OSError:  # not Linux
            return None
    if "launch" not in launcher_cmdline:
        return None
    for i, arg in enumerate(launcher_cmdline):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(launcher_cmdline):
                return int(launcher_cmdline[i + 1])
            if arg.startswith(flag + "="):
                return int(arg.split("=", 1)[1])
    return None


def log_world_size(num_processes, what, is_main_process=True):
    """Log a stage's process count; warn when the launcher was asked for another (README "Several processes")."""
    requested = requested_num_processes()
    if is_main_process:
        logger.info("%s: %d process(es)", what, num_processes)
    if is_main_process and requested is not None and requested != num_processes:
        logger.warning("%s: %d processes were asked for, but this run has %d. `accelerate launch --num_processes N "
                       "--cpu` starts ONE process; on CPUs use `torchrun --nproc_per_node N`", what, requested,
                       num_processes)


# ---- safe writes: one message per failed write, whole files, one run per folder ----
IO_HINTS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
            errno.EACCES: "no permission", errno.EPERM: "no permission", errno.EROFS: "the file system is read-only",
            errno.EEXIST: "a file is in the way", errno.ENOTDIR: "a file is in the way of a folder",
            errno.EISDIR: "it is a folder"}


def io_error_message(err, path=None):
    """'cannot write PATH: cause (hint)' for an OSError or a library's wrapper of one."""
    path = path or getattr(err, "filename", None)
    cause = getattr(err, "strerror", None) or str(err).splitlines()[0]
    hint = IO_HINTS.get(getattr(err, "errno", None))
    return f"cannot write {path or 'a file'}: {cause}" + (f" ({hint})" if hint and hint not in cause else "")


@contextlib.contextmanager
def writing(path):
    """A failed write under `path` (also safetensors' and torch.save's) becomes one UserError naming it."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if not (isinstance(err, OSError) or "(os error" in str(err) or "file write failed" in str(err)):
            raise
        raise UserError(io_error_message(err, path)) from None


def atomic_write(path, write_fn, suffix=None):
    """`write_fn(tmp)` writes a unique temporary beside `path` (its own open(): the
    umask's mode), then os.replace: a killed run never leaves half a file."""
    path = Path(path)
    with writing(path):
        if path.parent.exists() and not path.parent.is_dir():
            raise UserError(f"cannot write {path}: {path.parent} is a file, not a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix or path.suffix}")
        try:
            write_fn(str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def atomic_save_image(image: Image.Image, path):
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def atomic_write_text(path, text: str):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_save_torch(obj, path):
    """Serialised in memory first: torch.save to a full disk fails with an opaque C++ error."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getbuffer()))


def make_temp_dir(final_dir):
    """A fresh folder beside `final_dir`, to fill and then `replace_dir` into place."""
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(f".{final_dir.name}.tmp-{uuid.uuid4().hex[:12]}")
    with writing(final_dir):
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    return tmp


def replace_dir(tmp_dir, final_dir):
    """os.replace a written folder into place via FINAL.old (a run killed in between: `recover_dir`)."""
    final_dir = Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    with writing(final_dir):
        if final_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(final_dir):
    """FINAL.old without FINAL (a `replace_dir` cut short) becomes FINAL again."""
    final_dir = Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if old.is_dir() and not final_dir.exists():
        with writing(final_dir):
            os.replace(old, final_dir)
        logger.warning("recovered %s from %s (an earlier run was stopped while replacing it)", final_dir, old)


LOCK_FILE = ".lock"
_HELD_LOCKS = {}  # folder -> its FileLock, held until the process ends


def lock_output_dir(directory, what):
    """Hold DIRECTORY until the process ends, so that two runs never write one
    folder: filelock's lock on .lock.flock (the OS drops it when its holder dies),
    and in .lock the holder (pid, host, what, since), which a refused run names; a
    holder named there that is alive on this host holds it too."""
    import atexit
    import socket

    from filelock import FileLock, Timeout

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file, not a folder")
    with writing(directory):
        directory.mkdir(parents=True, exist_ok=True)
    path, host = directory / LOCK_FILE, socket.gethostname()
    if directory.resolve() in _HELD_LOCKS:  # held by this process already (several stages in one process)
        return path
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        holder = {}
    pid = holder.get("pid") if holder.get("host") == host else None
    lock = FileLock(directory / f"{LOCK_FILE}.flock")
    try:
        if isinstance(pid, int) and pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 0)  # alive (PermissionError: alive, someone else's)
                raise Timeout(str(path))
        lock.acquire(timeout=0)
    except (Timeout, PermissionError):
        raise UserError(f"{directory} is in use by another run (pid {holder.get('pid', '?')} on host "
                        f"{holder.get('host', '?')}, {holder.get('what', 'a run')} since {holder.get('since', '?')}); "
                        f"wait for it to end or use another folder. If that run is gone, delete {path}") from None
    _HELD_LOCKS[directory.resolve()] = lock
    with writing(path):
        path.write_text(json.dumps({"pid": os.getpid(), "host": host, "what": what,
                                    "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    atexit.register(lambda: [p.unlink(missing_ok=True) for p in (path, Path(lock.lock_file))])
    return path


def check_same_settings(path, settings, what):
    """Refuse to mix settings in one folder: an earlier run's JSON at `path` that differs
    from `settings` stops with every changed key named (absent or unreadable: passes)."""
    try:
        previous = json.loads(Path(path).read_text()) if Path(path).is_file() else None
    except ValueError:
        previous = None
    changed = [f"{key}: {previous.get(key)!r} -> {value!r}" for key, value in settings.items()
               if previous.get(key) != value] if previous is not None else []
    if changed:
        raise UserError(f"{what} was made with other settings ({'; '.join(changed)}); use another output folder, "
                        "the same settings to resume, or delete it")


# ---- PickScore (README 'Method: data'): curation filter and evaluation metric ----
class PickScorer:
    """Raw PickScore: exp(logit_scale) * cos(image, text embedding), text cut to 77
    tokens (about 20-23 for SD images; never divided by 26). fp32 on GPU too, as the
    public scorers: bf16 moves a score by ~0.1, as much as some gaps of Table 1."""

    def __init__(self, model="yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                 device=None, dtype=torch.float32):
        from transformers import AutoProcessor, CLIPModel

        quiet_libraries()
        self.device = torch.device(device) if device else default_device()
        try:
            self.processor = AutoProcessor.from_pretrained(processor)
            self.model = CLIPModel.from_pretrained(model, dtype=dtype).to(self.device).eval()
        except Exception as err:
            raise UserError(f"could not load PickScore ({model}, {processor}): {first_line(err)}") from None

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


# ---- --help: every flag's default once, per backbone where they differ ----
BACKBONE_NAMES = {"sd15": "SD-1.5", "sd3": "SD-3.5-M"}


def _show_default(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and 0 < abs(value) < 1e-3:  # 1e-4, 2.56e-6: as the paper writes them
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def backbone_default_help(key, stage):
    """'default: SD-1.5: 1e-4, SD-3.5-M: 2e-4', read from the tables: --help cannot drift from the code."""
    shown = {kind: _show_default({**BACKBONE_DEFAULTS[kind], **STAGE_DEFAULTS[stage][kind]}[key])
             for kind in BACKBONE_NAMES}
    if len(set(shown.values())) == 1:
        return f"default: {shown['sd15']} for both backbones"
    return "default: " + ", ".join(f"{BACKBONE_NAMES[kind]}: {value}" for kind, value in shown.items())


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" unless the help states its default; "(required)" for a required flag."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required:
            return text if "required" in text else f"{text} (required)".strip()
        return text if "default" in text.lower() else super()._get_help_string(action)


# ---- figures (matplotlib's object API on the Agg canvas: no display, no pyplot state) ----
def new_figure(width, height, dpi=100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return FigureCanvasAgg(Figure(figsize=(width, height), dpi=dpi, layout="constrained")).figure


def save_figure(figure, path):
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def wrap_text(text, width, max_lines=None):
    """`text` wrapped to lines of `width` characters, cut to `max_lines` with an ellipsis."""
    import textwrap

    return textwrap.fill(" ".join(str(text).split()), width, max_lines=max_lines, placeholder="…")


# The panel titles of curves.png, in panel order; keys a run does not log get no panel.
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
CURVE_SMOOTHING = 0.9


def smooth_curve(values, weight=CURVE_SMOOTHING):
    """TensorBoard's smoothing: s_t = weight * s_(t-1) + (1 - weight) * x_t, s_0 = 0, shown as s_t / (1 - weight^t)."""
    smoothed, running = [], 0.0
    for t, value in enumerate(values, start=1):
        running = weight * running + (1 - weight) * value
        smoothed.append(running / (1 - weight**t))
    return smoothed


def plot_training_curves(metrics_path, path, keys=tuple(CURVE_TITLES)):
    """OUTPUT_DIR/curves.png: per logged quantity, each step (thin) and its smoothed
    curve (thick) against the optimizer step; returns the panels [(key, title)]."""
    from matplotlib.ticker import MaxNLocator

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    panels = [(key, CURVE_TITLES.get(key, key)) for key in keys
              if records and all(isinstance(r.get(key), (int, float)) for r in records)]
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
        if high - low <= 1e-9 * scale:  # a constant series: pad the range, or ticks repeat
            pad = 0.1 * scale if scale > 0 else 1.0
            ax.set_ylim(low - pad, high + pad)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))  # 1e-4, not 0.0001000
        ax.set_title(wrap_text(title, 52), fontsize=10)
        ax.set(xlabel="optimizer step", ylabel=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    save_figure(figure, path)
    return panels


def save_sample_grid(images, prompts, seeds, path, title=None):
    """grid.png: one column per prompt (its text above), one row per seed; `images` row-major."""
    cell, width_px = 2.6, images[0].size[0]  # inches per image: the prompt text stays legible at 8 pt
    # height: the images, the prompts above the first row (up to 4 lines), the title; dpi: the images' own
    figure = new_figure(cell * len(prompts) + 0.5, (cell + 0.1) * len(seeds) + 0.7 + (0.3 if title else 0),
                        dpi=max(100, round(width_px / cell)))
    if title:
        figure.suptitle(title, fontsize=10)
    for row, seed in enumerate(seeds):
        for column, prompt in enumerate(prompts):
            ax = figure.add_subplot(len(seeds), len(prompts), row * len(prompts) + column + 1)
            ax.imshow(images[row * len(prompts) + column], interpolation="nearest" if width_px < 128 else "antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(wrap_text(prompt or "(empty prompt)", 34, max_lines=4), fontsize=8)
            if column == 0:
                ax.set_ylabel(f"seed {seed}", fontsize=9)
    save_figure(figure, path)


# ---- trackers, model card, checkpoint limit, hub (diffusers' training examples' handles) ----
def init_trackers(args, accelerator, start_step):
    """The --report_to trackers, with the run's arguments; purge_step hides what was logged past the state."""
    if args.report_to == "none" or args.benchmark_steps:
        return
    config = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
              for key, value in public_args(args).items()}
    accelerator.init_trackers(args.tracker_project_name, config=config,
                              init_kwargs={"tensorboard": {"purge_step": start_step + 1}})


def log_grid(accelerator, grid, step):
    """The checkpoint grid as an image in each tracker."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": np.asarray(grid)[None]}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"validation": [grid]}, step)


def write_model_card(args, kind, directory, step, num_pairs, repo_id=None):
    """README.md of a checkpoint from diffusers' training template: base, stage, data, arguments, grid, usage."""
    import huggingface_hub.constants
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

    location = repo_id or str((Path(args.output_dir) / f"checkpoint-{step}").resolve())
    net = "transformer" if kind == "sd3" else "unet"
    weights = (f"an EMA (decay {args.ema_decay}, every {args.ema_every} steps) of the LoRA weights" if args.use_ema
               else "the LoRA weights")
    data = f"`{args.pairs}`: {num_pairs} (real, inpainted) pairs" if num_pairs is not None else "random inputs"
    data += " (Stage 1 trains on their real photos only)" if args.stage == "stage1" and num_pairs is not None else ""
    summary = Path(args.pairs or "").parent / "summary.json"  # curate.py's, beside its pairs.csv
    if args.pairs and summary.is_file():
        summary = json.loads(summary.read_text())
        settings = summary.get("settings", {})
        data += (f", curated from {summary.get('listed')} listed images ({summary.get('input_kind')}); fakes: "
                 f"{settings.get('fake_mode')} with `{settings.get('model')}`, saliency {settings.get('saliency')}")
    lines = [f"# RealAlign {STAGE_TITLES[args.stage]}: LoRA for {args.pretrained_model}, step {step}", "",
             "LoRA trained with RealAlign (\"When Preference Labels Fall Short: Aligning Diffusion Models from Real "
             f"Data\", ICML 2026): {weights} at optimizer step {step} of {args.max_train_steps}.", "",
             f"- **Base model:** `{args.pretrained_model}`" + (f", its {net} replaced by `{args.init_network}`"
                                                               if args.init_network else ""),
             f"- **Stage:** {STAGE_TITLES[args.stage]}",
             "- **Warm start:** " + (f"`{args.init_lora}` (a frozen copy of it is the reference)" if args.init_lora
                                     else "none: a fresh LoRA on the base model, which is also the reference"),
             f"- **Data:** {data}",
             f"- **Load it:** `pipe.load_lora_weights(\"{location}\")`, or `PeftModel.from_pretrained(pipe.{net}, "
             f"\"{location}\")`"]
    if (Path(directory) / "grid.png").is_file():
        columns = "; ".join(f"\"{prompt}\"" for prompt in args.validation_prompts)
        lines += ["", "![checkpoint grid](./grid.png)", "", f"Columns: {columns}. Rows: seeds 0 and 1; "
                  f"{args.sample_grid_steps} steps, guidance {args.guidance_scale}."]
    usage = "\n".join([
        "import torch", "from diffusers import DiffusionPipeline", "",
        f"pipe = DiffusionPipeline.from_pretrained(\"{args.pretrained_model}\", torch_dtype=torch.bfloat16)",
        "pipe.to(\"cuda\")", f"pipe.load_lora_weights(\"{location}\")",
        f"image = pipe({(args.validation_prompts or ['a photo'])[0]!r}, "
        f"guidance_scale={args.guidance_scale}).images[0]"])
    table = "\n".join(["Every argument of the run:", "", "| argument | value |", "| --- | --- |",
                       *(f"| {key} | " + f"`{value}`".replace("|", "\\|").replace("\n", " ") + " |"
                         for key, value in public_args(args).items())])
    # offline: the helper would first look for this card on the hub (~30 s of retries)
    offline, huggingface_hub.constants.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE, True
    try:
        card = load_or_create_model_card(repo_id or f"realalign-{args.stage}", from_training=True,
                                         model_description="\n".join(lines), base_model=args.pretrained_model,
                                         inference=True,  # "other" for SD-3.5: Stability AI's community licence
                                         license="creativeml-openrail-m" if kind == "sd15" else "other")
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = offline
    card = populate_model_card(card, tags=["text-to-image", "diffusers", "lora", "diffusers-training", "realalign",
                                            "stable-diffusion" if kind == "sd15" else "sd3",
                                            "diffusion-dro" if args.stage == "stage1" else "diffusion-dpo"])
    # the template's three TODO slots
    card.text = (card.text.replace("# TODO: add an example code snippet for running this diffusion pipeline", usage)
                 .replace("[TODO: provide examples of latent issues and potential remediations]",
                          f"Trained on {num_pairs} photos (Stage 2: and their inpainted copies); the base model's "
                          "licence and limitations apply.")
                 .replace("[TODO: describe the data used to train the model]", table))
    card.save(str(Path(directory) / "README.md"))
    return card


def prune_checkpoints(args):
    """--checkpoints_total_limit N: delete the oldest checkpoints beyond N, never --final_checkpoint."""
    if not args.checkpoints_total_limit:
        return
    steps = sorted(int(path.name.split("-")[1]) for path in Path(args.output_dir).glob("checkpoint-*")
                   if path.is_dir() and path.name.split("-")[1].isdigit())
    prunable = [step for step in steps if step != args.final_checkpoint]
    for step in prunable[: max(len(prunable) - args.checkpoints_total_limit, 0)]:
        shutil.rmtree(Path(args.output_dir) / f"checkpoint-{step}")
        logger.info("deleted checkpoint-%d (--checkpoints_total_limit %d)", step, args.checkpoints_total_limit)


def push_final_checkpoint(args, accelerator, backbone, cache):
    """--push_to_hub: the final checkpoint folder to the hub (create_repo, upload_folder: diffusers' way)."""
    from huggingface_hub import create_repo, upload_folder

    if accelerator.is_main_process:
        step = args.final_checkpoint or args.max_train_steps
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        repo_id = create_repo(args.hub_model_id or Path(args.output_dir).name, exist_ok=True,
                              token=args.hub_token).repo_id
        write_model_card(args, backbone.kind, folder, step, len(cache["prompt_index"]) if cache else None,
                         repo_id=repo_id)
        upload_folder(repo_id=repo_id, folder_path=str(folder), token=args.hub_token,
                      commit_message=f"RealAlign {args.stage}, step {step}")
        logger.info("uploaded %s to https://huggingface.co/%s", folder, repo_id)
    accelerator.wait_for_everyone()
