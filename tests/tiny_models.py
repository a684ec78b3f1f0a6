"""Tiny random-weight models and procedural photos for the tests and the
offline smoke run (`SMOKE=1 bash run_all.sh`). Nothing here is part of the
method: common.py holds that, and this file only feeds it small inputs.

  - the tiny models: SD-1.5-, SD-1.5-inpainting- and SD-3.5-M-style pipelines
    and a CLIP model (a PickScore stand-in), with random weights (seeded),
    saved with save_pretrained so that the scripts load them exactly as they
    load the real ones (`build_tiny_models`, the tests' `tiny_models` fixture);
  - stand-ins for the released weights of paper Table 1's rows
    (`build_tiny_released`);
  - procedural "photos": a coloured disc on a gradient, with a caption
    (`draw_disc_image`, `make_smoke_images`).

From the command line (what run_all.sh's smoke branch calls):

    python tests/tiny_models.py tiny-models DIR    # build the tiny random-weight models
    python tests/tiny_models.py smoke-images DIR   # draw captioned procedural images
    python tests/tiny_models.py tiny-released DIR  # stand-ins for the released weights (after tiny-models DIR)

The tests import it as `tiny_models` (pytest puts tests/ on sys.path); it
puts the repository root on sys.path itself, for common.py.
"""

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: common.py
from common import LEARNER, LORA_TARGETS, replace_dir  # noqa: E402

# -----------------------------------------------------------------------------
# Tiny random-weight models
# -----------------------------------------------------------------------------
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


def _tiny_t5(d_model=64):
    """A tiny T5 encoder and its tokenizer (SD-3's third text encoder), built
    offline: T5TokenizerFast over a Unigram vocabulary of single characters
    (each also with the word-start marker), plus T5's special tokens."""
    import string

    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=16, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5EncoderModel(config), tokenizer


def _tiny_vae(**extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=32, **extra)


def build_tiny_model(kind, directory):
    """Build one tiny model with random weights (seeded) and save it.

    kind: "sd15" (StableDiffusionPipeline), "sd15-inpaint"
    (StableDiffusionInpaintPipeline), "sd3" (StableDiffusion3Pipeline with
    CLIP-L, CLIP-G and T5 stand-ins, as SD-3.5-M), "clip" (CLIPModel +
    processor, a PickScore stand-in). The VAE downsamples by 2, so 32 px images give 16x16 latents."""
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
            # cross-attention at the 8x8 level only (SD-1.5 has it at every level but the lowest): the CPU
            # attention kernel at 16x16 made every forward pass 2.7x slower, and the tests run thousands
            attention_head_dim=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        # SD-1.5's own sampler and noise schedule
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                                  set_alpha_to_one=False)
        cls = StableDiffusionInpaintPipeline if kind == "sd15-inpaint" else StableDiffusionPipeline
        pipe = cls(vae=_tiny_vae(scaling_factor=0.18215), text_encoder=_tiny_text_encoder(False),
                   tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    elif kind == "sd3":
        # MMDiT-X like SD-3.5-M: QK RMS-norm and one dual-attention layer. As in
        # the real model, the joint attention width is T5's, and the two CLIP
        # encoders' concatenated states (16 + 16 here, 768 + 1280 there) are
        # zero-padded to it by the pipeline; pooled = both CLIP projections. Two heads of 16: the CPU
        # attention kernel ran four heads of 8 1.6x slower, over the same width.
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,))
        text_encoder_3, tokenizer_3 = _tiny_t5(d_model=64)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_tiny_vae(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                          use_post_quant_conv=False),
            text_encoder=_tiny_text_encoder(True, hidden=16), tokenizer=tokenizer,
            text_encoder_2=_tiny_text_encoder(True, hidden=16), tokenizer_2=tokenizer,
            text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
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


def build_tiny_released(root):
    """Offline stand-ins for the released weights of paper Table 1's rows,
    made from the tiny models under `root` (build_tiny_models first), each
    written by the library and in the layout its publisher uses:

    - dpo-unet-sd15: Diffusion-DPO's SD-1.5 UNet, a perturbed tiny UNet saved
      with diffusers' save_pretrained in unet/, as mhdang/dpo-sd1.5-text2image-v1
      publishes it (its model card loads
      `UNet2DConditionModel.from_pretrained(id, subfolder="unet")`);
    - flowgrpo-lora-sd3: Flow-GRPO's SD-3.5-M LoRA, a PEFT adapter folder
      written by PeftModel.save_pretrained with flow_grpo's LoraConfig (r 32,
      alpha 64, the 8 attn. targets), as jieliu/SD3.5M-FlowGRPO-PickScore is
      (yifan123/flow_grpo, scripts/train_sd3.py, commit
      ac4c86e8cae021841f1fde853d340e0db67690dd);
    - realalign-lora-sd3: the authors' SD-3.5-M LoRA as their trainer saves a
      checkpoint, a PeftModel with adapters learner and ref saved with
      selected_adapters=["learner"] into lora/, hence lora/learner/
      (Cwyxx/RealAlign, training_sd35m/scripts/train-sd-3-5-medium-irl.py,
      commit 158ce2826b51566f58131235911e313a9313c91c);
    - realalign-lora-sd15: the authors' SD-1.5 LoRA as their trainer saves it,
      StableDiffusionPipeline.save_lora_weights of get_peft_model_state_dict
      (pytorch_lora_weights.safetensors, rank = alpha, no adapter metadata;
      training_sd15/stage2_dpo/train-lora_init.py, same commit). Where the
      released Xixixixihahahaha/RealAlign-SD-1.5 keeps that file is not
      documented: the loaders accept it at the root or in a subfolder.

    LoRA weights are random (A and B), so each changes the network's output.
    Seeded; built once. Returns {name: path}."""
    from diffusers import SD3Transformer2DModel, StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    root = Path(root)
    out = root / "released"
    names = ("dpo-unet-sd15", "realalign-lora-sd15", "flowgrpo-lora-sd3", "realalign-lora-sd3")
    paths = {name: out / name for name in names}
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(0)  # peft draws the LoRA A matrices from the global RNG

    def perturb(params, scale):
        with torch.no_grad():
            for param in params:
                param.add_(torch.randn(param.shape, generator=generator) * scale)

    def lora_params(model):
        return [param for name, param in model.named_parameters() if "lora_" in name]

    # flow_grpo's and the authors' SD-3.5-M LoraConfig
    sd3_config = LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian", target_modules=LORA_TARGETS["sd3"])
    for name in names:
        if paths[name].exists():
            continue
        tmp = paths[name].with_name(name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if name.endswith("sd3"):
            transformer = SD3Transformer2DModel.from_pretrained(root / "tiny-sd3", subfolder="transformer")
        else:
            unet = UNet2DConditionModel.from_pretrained(root / "tiny-sd15", subfolder="unet")
        if name == "dpo-unet-sd15":
            perturb(unet.parameters(), 0.02)
            unet.save_pretrained(tmp / "unet")
        elif name == "realalign-lora-sd15":
            unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                        target_modules=LORA_TARGETS["sd15"]))
            perturb(lora_params(unet), 0.1)
            StableDiffusionPipeline.save_lora_weights(save_directory=tmp,
                                                      unet_lora_layers=get_peft_model_state_dict(unet))
        elif name == "flowgrpo-lora-sd3":
            model = get_peft_model(transformer, copy.deepcopy(sd3_config))
            perturb(lora_params(model), 0.1)
            model.save_pretrained(tmp)
        else:
            model = get_peft_model(transformer, copy.deepcopy(sd3_config), adapter_name=LEARNER)
            model.add_adapter("ref", copy.deepcopy(sd3_config))
            perturb(lora_params(model), 0.1)
            model.save_pretrained(tmp / "lora", selected_adapters=[LEARNER])
        replace_dir(tmp, paths[name])
    return {name: str(path) for name, path in paths.items()}


# -----------------------------------------------------------------------------
# Procedural photos: one salient object each, for the curation and the smoke run
# -----------------------------------------------------------------------------

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
    parser = argparse.ArgumentParser(description="Offline inputs of the smoke run (run_all.sh) and the tests: "
                                                 "tiny random-weight models, their released-weight stand-ins, "
                                                 "procedural captioned images")
    parser.add_argument("command", choices=["tiny-models", "smoke-images", "tiny-released"],
                        help="tiny-models: build the tiny models into DIR; smoke-images: draw captioned images "
                             "into DIR; tiny-released: stand-ins for the released weights, from the tiny models "
                             "in DIR (run tiny-models DIR first)")
    parser.add_argument("directory", metavar="DIR")
    cli_args = parser.parse_args()
    if cli_args.command == "tiny-models":
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars of sub-second saves
        for name, location in build_tiny_models(cli_args.directory).items():
            print(f"{name}: {location}")
    elif cli_args.command == "tiny-released":
        for name, location in build_tiny_released(cli_args.directory).items():
            print(f"{name}: {location}")
    else:
        print(make_smoke_images(cli_args.directory))
