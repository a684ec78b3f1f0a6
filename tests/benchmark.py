"""Throughput and memory of our trainers against a baseline of the public code's
step structure, side by side on one machine (README "Throughput and memory").

    python tests/benchmark.py --arch tiny  --resolution 64  --batch 2   # CPU, seconds
    python tests/benchmark.py --arch sd15  --resolution 512 --batch 4   # GPU, full SD-1.5 UNet
    python tests/benchmark.py --arch sd35m --resolution 512 --batch 2   # GPU, full SD-3.5-M MMDiT

The models are the real architectures (configs written below, from the
published model configs) with random weights, so nothing is downloaded. Each
measurement runs in its own process, so peak memory (GPU: max allocated; CPU:
peak RSS) belongs to that measurement alone:

  ours      train_dro.py / train_dpo.py --benchmark_steps N (random latents and
            embeddings; one network with LoRA roles; batched, truncated policy
            sampling; one forward per role over the concatenated batch; bf16 base)
  baseline  THE PUBLIC CODE'S STEP STRUCTURE, re-implemented here for
            comparison only (SPEC §6.5): separate full copies of the network
            for the trainable model, the reference and (Stage 1) the sampling
            snapshot, all in fp32 under bf16 autocast; images VAE-encoded and
            captions text-encoded on every step (SD-1.5; the SD-3.5-M public
            code precomputes text embeddings, so its baseline does too); the
            policy sampler run per sample through all its steps; separate
            forwards for the real/winner and policy/loser halves.
Both use the same loss functions from common.py and the same LoRA config.
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

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
        return common.build_tiny_model("sd15", directory)
    if arch == "tiny-sd3":
        return common.build_tiny_model("sd3", directory)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = common._tiny_clip_tokenizer(Path(directory).with_name("tokenizer-src"))
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
                text_encoder=common._tiny_text_encoder(True), tokenizer=tokenizer,
                text_encoder_2=common._tiny_text_encoder(True), tokenizer_2=tokenizer,
                text_encoder_3=None, tokenizer_3=None)
    pipe.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(directory)
    return directory


# ------------------------------------------------------------------ baseline
def baseline(args):
    """One process: time the public code's step structure (see module doc)."""
    from peft import LoraConfig

    device = common.default_device()
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                  enabled=False)
    pipe = common.load_pipeline(args.model, dtype=torch.float32)  # fp32 master weights
    pipe.to(device)
    bb = common.Backbone(pipe, device, torch.float32)
    trainable = bb.net
    reference = copy.deepcopy(trainable).requires_grad_(False)  # full copy 2
    snapshot = copy.deepcopy(trainable).requires_grad_(False) if args.stage == "dro" else None  # full copy 3
    trainable.requires_grad_(False)
    rank, alpha = (4, 4) if bb.kind == "sd15" else (32, 64)
    trainable.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                     target_modules=common.LORA_TARGETS[bb.kind]))
    if snapshot is not None:
        snapshot.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                        target_modules=common.LORA_TARGETS[bb.kind]))
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    g = torch.Generator().manual_seed(0)
    n, res = args.batch, args.resolution
    prompts = [f"a photo of object {i}" for i in range(n)]
    if bb.is_flow:  # the SD-3.5-M public code precomputes the text embeddings
        _, fixed_cond = common.random_inputs(bb, n, res, g, [])

    def encode(images):  # VAE encoding on every step
        mean, std = bb.encode_images(images)
        return bb.latents_from_posterior(mean, std, g).to(device)

    def condition():  # text encoding on every step (SD-1.5)
        return fixed_cond if bb.is_flow else {k: v.to(device) for k, v in bb.encode_prompts(prompts).items()}

    def sample_one(cond_one):  # the sampler run per sample, through every step
        from diffusers import DPMSolverMultistepScheduler

        steps = 10 if bb.is_flow else 20
        k = int(torch.randint(0, steps, (1,), generator=g))
        x = torch.randn((1, *bb.latent_shape(res)), generator=g).to(device)
        if bb.is_flow:
            bb.scheduler.set_timesteps(steps, device=device)
            sigmas = bb.scheduler.sigmas
            for i in range(steps):
                t = (sigmas[i] * 1000).expand(1)
                pred = bb.predict(snapshot, x, t, cond_one).float()
                if i == k:
                    keep = (x, t, pred)
                x = x + (sigmas[i + 1] - sigmas[i]) * pred
            return keep
        scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
        scheduler.set_timesteps(steps, device=device)
        for i, t in enumerate(scheduler.timesteps):
            pred = bb.predict(snapshot, x, t.expand(1), cond_one).float()
            if i == k:
                keep = (x, t.expand(1), pred)
            x = scheduler.step(pred, t, x).prev_sample
        return keep

    def error(net, x, t, cond, target):
        return common.per_sample_mse(bb.predict(net, x, t, cond), target)

    timings, sampling = [], []
    for step in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        pixels = torch.rand((n, 3, res, res), generator=g) * 2 - 1
        with autocast:
            cond = condition()
            x0_w = encode(pixels)
            noise = torch.randn(x0_w.shape, generator=g).to(device)
            if args.stage == "dpo":
                x0_l = encode(pixels.flip(-1))
                t = bb.sample_timesteps(n, g)
                x_w, x_l = bb.add_noise(x0_w, noise, t), bb.add_noise(x0_l, noise, t)
                tw, tl = bb.target(x0_w, noise), bb.target(x0_l, noise)
                with torch.no_grad():
                    ref_w, ref_l = error(reference, x_w, t, cond, tw), error(reference, x_l, t, cond, tl)
                loss, _ = common.diffusion_dpo_loss(error(trainable, x_w, t, cond, tw),
                                                    error(trainable, x_l, t, cond, tl), ref_w, ref_l, beta=2000.0)
            else:
                sample_start = time.perf_counter()
                with torch.no_grad():
                    points = [sample_one({k: v[i : i + 1] for k, v in cond.items()}) for i in range(n)]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                sampling.append(time.perf_counter() - sample_start)
                x_p = torch.cat([p[0] for p in points])
                t = torch.cat([p[1] for p in points]).to(device)
                target_p = torch.cat([p[2] for p in points])
                x_r = bb.add_noise(x0_w, noise, t)
                target_r = bb.target(x0_w, noise)
                with torch.no_grad():
                    ref_r, ref_p = error(reference, x_r, t, cond, target_r), error(reference, x_p, t, cond, target_p)
                loss, _ = common.diffusion_dro_loss(error(trainable, x_r, t, cond, target_r),
                                                    error(trainable, x_p, t, cond, target_p), ref_r, ref_p)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    seconds = sum(timings[1:]) / args.steps
    result = {"label": f"stage{1 if args.stage == 'dro' else 2} (baseline)", "backbone": bb.kind,
              "resolution": res, "batch": n, "steps": args.steps, "seconds_per_step": seconds,
              "samples_per_s": n / seconds, "peak_memory_gb": common.peak_memory_gb(device),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    if sampling:
        result["sampling_share"] = sum(sampling[1:]) / sum(timings[1:])
    print("BENCHMARK " + json.dumps(result), flush=True)


# -------------------------------------------------------------------- driver
def measure(command, env):
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCHMARK ")]
    if result.returncode or not lines:
        print(f"benchmark failed: {' '.join(command)}\n{result.stderr[-3000:]}", flush=True)
        return None
    return json.loads(lines[-1][len("BENCHMARK "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["tiny", "tiny-sd3", "sd15", "sd35m"], default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="samples per optimizer step (one micro-batch)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    parser.add_argument("--stages", default="dro,dpo")
    parser.add_argument("--points_per_trajectory", type=int, default=4,
                        help="also time Stage 1 with train_dro.py --points_per_trajectory K (0: skip)")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("--workdir", default=None, help="where the random-weight model is saved (default: temp)")
    # internal: one baseline measurement in this process
    parser.add_argument("--baseline_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        return baseline(args)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="realalign-bench-"))
    model = workdir / f"model-{args.arch}"
    if not model.exists():
        t0 = time.perf_counter()
        build_pipeline(args.arch, model)
        print(f"built {args.arch} in {time.perf_counter() - t0:.0f} s", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    results = []
    for stage in args.stages.split(","):
        script = ROOT / ("train_dro.py" if stage == "dro" else "train_dpo.py")
        ours = [sys.executable, str(script), "--pretrained_model", str(model), "--output_dir",
                str(workdir / f"run-{stage}"), "--benchmark_steps", str(args.steps + 1), "--train_batch_size",
                str(args.batch), "--effective_batch_size", str(args.batch), "--resolution", str(args.resolution)]
        base = [sys.executable, __file__, "--baseline_worker", "--model", str(model), "--stage", stage,
                "--batch", str(args.batch), "--steps", str(args.steps), "--resolution", str(args.resolution)]
        commands = [ours, base]
        if stage == "dro" and args.points_per_trajectory > 1 and args.batch % args.points_per_trajectory == 0:
            commands.append(ours + ["--points_per_trajectory", str(args.points_per_trajectory)])
        for command in commands:
            result = measure(command, env)
            if result:
                results.append(result)
                print(json.dumps(result), flush=True)
    print(markdown_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


def markdown_table(results):
    rows = ["| stage | implementation | device | backbone | px | batch | s/step | samples/s | peak memory (GB) "
            "| sampling share |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        stage, impl = r["label"].split(" ")
        share = f"{r['sampling_share']:.0%}" if "sampling_share" in r else ""
        rows.append(f"| {stage} | {impl.strip('()')} | {r['device']} | {r['backbone']} | {r['resolution']} | "
                    f"{r['batch']} | {r['seconds_per_step']:.3f} | {r['samples_per_s']:.2f} | "
                    f"{r['peak_memory_gb']:.2f} | {share} |")
    for stage in ("stage1", "stage2"):
        runs = {r["label"].split(" ")[1].strip("()"): r for r in results if r["label"].startswith(stage)}
        base = runs.pop("baseline", None)
        for name, ours in runs.items() if base else ():
            rows.append(f"\n{stage}: {name} / baseline = {ours['samples_per_s'] / base['samples_per_s']:.2f}x "
                        f"samples/s, {ours['peak_memory_gb'] / base['peak_memory_gb']:.2f}x peak memory")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
