#!/usr/bin/env python
# coding=utf-8
"""Evaluate text-to-image models as RealAlign's Table 1 and Figure 2 do (SPEC §5).

Two commands:

  python evaluate.py --method base= --method ours=outputs/dpo/checkpoint-800 --prompts pickapic_v2
      generate one image per prompt and seed for every method, score them with
      every requested metric, and write the report.

  python evaluate.py score --images OUT --metrics hpsv3
      score the images of an existing output folder with more metrics (e.g. in
      a Python environment that has a conflicting scorer package installed) and
      refresh the report; the new scores merge with the old ones.

Under `accelerate launch` (or torchrun) the prompts, and then the images to
score, are split across the processes; the main process merges the results.

Everything is resumable: existing images are not regenerated and every score
is kept in a per-image table, so a rerun only does what is missing.

Output folder (--output_dir):

  NAME/seed_S/00000.png   image of prompt 0 for method NAME and seed S
  NAME/generation.json    how NAME's images were made (checked on resume)
  prompts.txt             the prompts, line i = prompt i (checked on resume)
  manifest.jsonl          one line per image: image, method, seed, index, prompt
  scores.jsonl            one line per (image, metric): the per-image score table
  run.json                methods in order (the first is the baseline), settings
  results.json            per method and metric: mean over prompts per seed,
                          then mean and std over seeds, n and missing counts
  results.md              Table 1 (SPEC §5) with relative gains over the baseline
  figure2.png             texture detail vs realism, human preference vs realism
  grid.png                the same prompts and seed across methods

Section numbers in comments refer to ../shared/SPEC.md.
"""

import argparse
import csv
import gc
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import common
from common import UserError

logger = logging.getLogger("realalign")


# =============================================================================
# Constants
# =============================================================================

# The public protocol's five seeds (SPEC §5).
DEFAULT_SEEDS = [42, 123, 456, 789, 1000]

# Sampling defaults per backbone (SPEC §5): (steps, classifier-free guidance).
SAMPLING_DEFAULTS = {"sd15": (50, 7.5), "sd3": (40, 4.5)}

# Every metric, in the column order of the report: Table 1's six, then the
# Figure 2 ones, then plain CLIP score.
ALL_METRICS = ["pickscore", "imagereward", "unifiedreward", "hpsv3", "deqa", "aesthetic", "laplacian", "sgp", "clip"]
# The default set reproduces Table 1 and Figure 2; CLIP score is opt-in.
DEFAULT_METRICS = ",".join(m for m in ALL_METRICS if m != "clip")

METRIC_TITLES = {
    "pickscore": "PickScore", "imagereward": "ImageReward", "unifiedreward": "UnifiedReward", "hpsv3": "HPSv3",
    "deqa": "DeQA", "aesthetic": "Aesthetic", "laplacian": "Texture (Lap. var.)", "sgp": "Realism (SGP)",
    "clip": "CLIP score",
}
# Decimals shown in results.md. The realism gap is a small difference of two
# PickScores (about -0.04 in Figure 2), the Laplacian variance is in the 1000s.
METRIC_DECIMALS = {"laplacian": 0, "sgp": 3}
# Every metric here is "higher is better", Laplacian variance included (more
# texture detail, Figure 2). The table code honours this map, so a metric
# where lower is better only needs False here.
HIGHER_IS_BETTER = {metric: True for metric in ALL_METRICS}

# Public prompt sets (SPEC §7). Each is fetched once and cached as a text file.
PROMPT_SETS = {
    "pickapic_v2": "yuvalkirstain/pickapic_v2, split test_unique, column caption (500 unique prompts; needs pyarrow)",
    "partiprompts": "nateraw/parti-prompts, PartiPrompts.tsv, column Prompt (1632 prompts)",
    "drawbench": "shunk031/DrawBench, parquet conversion, column prompts (200 unique prompts; needs pyarrow)",
    "hpdv2": "zhwang/HPDv2, benchmark/{anime,concept-art,paintings,photo}.json (3200 prompts)",
}

AESTHETIC_WEIGHTS_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
)

# Our own wording of the UnifiedReward point-score question: it asks for the
# two criteria of the model's image-generation scoring task (prompt alignment
# and visual quality) and for the "Final Score: x" line that the parser reads
# (SPEC §5). To use another wording (e.g. the authors' exact one) pass a text
# file with a {prompt} placeholder as --unifiedreward_question.
UNIFIEDREWARD_QUESTION = (
    "You are shown an image that a text-to-image model generated from the caption below. Rate the image on two "
    "criteria: how faithfully it depicts the caption, and its overall visual quality (realism, detail, absence of "
    "artifacts). Explain your judgement briefly, then end with one line of the form 'Final Score: x', where x is "
    "a number from 1 to 5.\nCaption: {prompt}"
)

MANIFEST, SCORES, RUN_INFO, PROMPTS_FILE = "manifest.jsonl", "scores.jsonl", "run.json", "prompts.txt"


# =============================================================================
# Arguments
# =============================================================================


def add_scoring_args(parser):
    """Flags of the scorers, shared by both commands."""
    parser.add_argument(
        "--metrics", type=str, default=DEFAULT_METRICS,
        help=f"Comma-separated metrics, from: {', '.join(ALL_METRICS)}. Default: Table 1 and Figure 2's metrics.",
    )
    parser.add_argument("--score_batch_size", type=int, default=16, help="Images per scorer call.")
    parser.add_argument(
        "--cache_dir", type=str, default=os.path.join(os.path.expanduser("~"), ".cache", "realalign"),
        help="Where fetched prompt sets and downloaded scorer weights (the aesthetic MLP) are kept.",
    )
    # PickScore and the realism gap (SPEC §2, §5)
    parser.add_argument("--pickscore_model", type=str, default="yuvalkirstain/PickScore_v1",
                        help="PickScore CLIP model (also used by the 'sgp' realism metric).")
    parser.add_argument("--pickscore_processor", type=str, default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                        help="Processor (tokenizer + image transform) of the PickScore model.")
    parser.add_argument(
        "--sgp_real_prefix", type=str, default="Realistic photo, ",
        help="Realism = PickScore(image, real_prefix + prompt) - PickScore(image, cg_prefix + prompt) (SPEC §5).",
    )
    parser.add_argument("--sgp_cg_prefix", type=str, default="CG render, ", help="See --sgp_real_prefix.")
    # CLIP-based metrics
    parser.add_argument("--clip_model", type=str, default="openai/clip-vit-large-patch14",
                        help="CLIP model of the 'clip' metric (100 * max(cosine, 0)).")
    parser.add_argument("--aesthetic_clip_model", type=str, default="openai/clip-vit-large-patch14",
                        help="CLIP whose L2-normalised image embedding feeds the LAION aesthetic MLP.")
    parser.add_argument("--aesthetic_weights", type=str, default=AESTHETIC_WEIGHTS_URL,
                        help="The aesthetic MLP's state dict: a local .pth file or a URL (downloaded to --cache_dir).")
    # Vision-language scorers
    parser.add_argument("--unifiedreward_model", type=str, default="CodeGoat24/UnifiedReward-qwen-7b",
                        help="UnifiedReward model (a Qwen2.5-VL checkpoint).")
    parser.add_argument("--unifiedreward_question", type=str, default=None,
                        help="Text file with the question to ask UnifiedReward ({prompt} is replaced by the prompt); "
                             "default: this script's own wording. The answer must end with 'Final Score: x'.")
    parser.add_argument("--unifiedreward_max_new_tokens", type=int, default=512,
                        help="Length limit of UnifiedReward's answer (its reasoning precedes the final score).")
    parser.add_argument("--deqa_model", type=str, default="zhiyuanyou/DeQA-Score-Mix3",
                        help="DeQA-Score model (loaded with trust_remote_code).")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "score":
        parser = argparse.ArgumentParser(
            prog="evaluate.py score",
            formatter_class=common.HelpFormatter,  # each default shown once
            description="Score the images of an existing evaluation folder (or any NAME/seed_S/00000.png folder) "
                        "and refresh its report. Scores already in the table are kept.",
        )
        parser.add_argument("--images", type=str, required=True,
                            help="An evaluate.py output folder, or a folder laid out as NAME/seed_S/00000.png.")
        parser.add_argument("--prompts", type=str, default=None,
                            help="Only for a folder without manifest.jsonl: its prompts (file or set name).")
        parser.add_argument("--baseline", type=str, default=None,
                            help="Only for a folder without manifest.jsonl: the baseline method's folder name "
                                 "(default: the first name in alphabetical order).")
        parser.add_argument("--grid_prompts", type=int, default=4, help="Prompts shown in grid.png.")
        add_scoring_args(parser)
        args = parser.parse_args(argv[1:])
        args.command = "score"
        return args

    parser = argparse.ArgumentParser(
        formatter_class=common.HelpFormatter,  # each default shown once
        description="Generate images for several methods and score them (RealAlign Table 1 / Figure 2). "
                    "Use `evaluate.py score --help` to score an existing folder.",
    )
    parser.add_argument("--pretrained_model", type=str, default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="Base diffusers pipeline (hub id or folder): SD-1.5 or SD-3.5-M.")
    parser.add_argument(
        "--method", type=str, action="append", default=None, metavar="NAME=SPEC",
        help="A model to evaluate, repeatable; the first one is the baseline of the relative gains. SPEC is empty "
             "(the base model), a LoRA (a folder with pytorch_lora_weights.safetensors, a .safetensors file, or a "
             "hub id), or a UNet/transformer (a folder with config.json, or a hub id). 'NET+LORA' stacks a LoRA on "
             "another network (e.g. RealAlign trained on top of Diffusion-DPO). Default: base=.",
    )
    parser.add_argument("--prompts", type=str, default="pickapic_v2",
                        help=f"A prompt set ({', '.join(PROMPT_SETS)}) or a text file with one prompt per line.")
    parser.add_argument("--max_prompts", type=int, default=None, help="Use only the first N prompts (quick runs).")
    parser.add_argument("--output_dir", type=str, default="outputs/eval", help="Where images and reports go.")
    parser.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS,
                        help="One image per prompt per seed; every prompt is generated with the same seed (SPEC §5).")
    parser.add_argument("--resolution", type=int, default=512, help="Image height and width.")
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help="Sampling steps (default: " + ", ".join(
                            f"{common.BACKBONE_NAMES[kind]}: {steps}" for kind, (steps, _) in SAMPLING_DEFAULTS.items())
                        + ").")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="Classifier-free guidance (default: " + ", ".join(
                            f"{common.BACKBONE_NAMES[kind]}: {cfg}" for kind, (_, cfg) in SAMPLING_DEFAULTS.items())
                        + ").")
    parser.add_argument("--batch_size", type=int, default=8, help="Prompts per pipeline call (per process).")
    parser.add_argument("--grid_prompts", type=int, default=4, help="Prompts shown in grid.png.")
    add_scoring_args(parser)
    args = parser.parse_args(argv)
    args.command = "generate"
    return args


# =============================================================================
# Prompts (SPEC §5, §7)
# =============================================================================


def _require(module, package):
    """Import an optional dependency, or stop with the pip command to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this needs the package '{package}': pip install {package}") from None


def _parquet_column(repo_id, files, columns, revision=None):
    """One text column of hub parquet files, the first of `columns` present
    (read with pyarrow, imported lazily; only that column is loaded)."""
    from huggingface_hub import hf_hub_download

    pq = _require("pyarrow.parquet", "pyarrow")
    values = []
    for filename in files:
        path = hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision)
        names = pq.read_schema(path).names
        name = next((c for c in columns if c in names), None)
        if name is None:
            raise UserError(f"{repo_id}/{filename} has none of the columns {columns} (has {names})")
        values += [str(v) for v in pq.read_table(path, columns=[name]).column(name).to_pylist()]
    return values


def _hub_files(repo_id, revision=None):
    from huggingface_hub import list_repo_files

    return sorted(list_repo_files(repo_id, repo_type="dataset", revision=revision))


def _unique(items):
    """Drop repeated prompts, keeping the first occurrence (the sets the paper
    counts as 'unique', SPEC §5)."""
    return list(dict.fromkeys(items))


def fetch_prompt_set(name):
    """Download a public prompt set (SPEC §7) and return its prompts."""
    from huggingface_hub import hf_hub_download

    if name == "partiprompts":
        path = hf_hub_download("nateraw/parti-prompts", "PartiPrompts.tsv", repo_type="dataset")
        with open(path, newline="", encoding="utf-8") as f:
            return [row["Prompt"] for row in csv.DictReader(f, delimiter="\t")]
    if name == "hpdv2":
        prompts = []
        for style in ("anime", "concept-art", "paintings", "photo"):
            path = hf_hub_download("zhwang/HPDv2", f"benchmark/{style}.json", repo_type="dataset")
            entries = json.loads(Path(path).read_text())
            prompts += [e if isinstance(e, str) else e["prompt"] for e in entries]
        return prompts
    if name == "pickapic_v2":
        # The split's parquet shards also hold both images of every pair, so
        # this downloads far more than the captions (once: the prompts are cached).
        files = [f for f in _hub_files("yuvalkirstain/pickapic_v2") if "test_unique" in f and f.endswith(".parquet")]
        if not files:
            raise UserError("found no test_unique parquet files in yuvalkirstain/pickapic_v2")
        return _unique(_parquet_column("yuvalkirstain/pickapic_v2", files, ["caption"]))
    if name == "drawbench":
        revision = "refs/convert/parquet"  # the hub's automatic parquet conversion
        files = [f for f in _hub_files("shunk031/DrawBench", revision) if f.endswith(".parquet")]
        if not files:
            raise UserError("found no parquet files in shunk031/DrawBench (refs/convert/parquet)")
        return _unique(_parquet_column("shunk031/DrawBench", files, ["prompts", "prompt"], revision))
    raise ValueError(name)


def read_prompt_file(path):
    """One prompt per line; blank lines are skipped, surrounding spaces stripped."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def load_prompts(spec, cache_dir, max_prompts=None):
    """The prompts of a set name or a text file; never empty."""
    if spec in PROMPT_SETS:
        cached = Path(cache_dir) / "prompts" / f"{spec}.txt"
        if not cached.is_file():
            try:
                prompts = fetch_prompt_set(spec)
            except UserError:
                raise
            except Exception as err:
                raise UserError(f"could not fetch the prompt set '{spec}' ({PROMPT_SETS[spec]}): "
                                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
                                "(offline, pass a text file of prompts instead)") from None
            # a prompt is one line of the cache file
            common.atomic_write_text(cached, "".join(" ".join(p.split()) + "\n" for p in prompts if p.strip()))
        prompts = read_prompt_file(cached)
        source = f"{spec} (cached in {cached})"
    elif Path(spec).is_file():
        prompts, source = read_prompt_file(spec), spec
    else:
        raise UserError(f"--prompts '{spec}' is neither a prompt set ({', '.join(PROMPT_SETS)}) nor a file")
    if max_prompts is not None:
        prompts = prompts[:max_prompts]
    if not prompts:
        raise UserError(f"no prompts in {source}")
    return prompts


def check_prompts(out_dir, prompts, write=True):
    """Image i of every method belongs to prompt i: refuse to reuse a folder
    whose images were made for other prompts. Keeps the longest list seen.
    Every process checks (so all stop together); only the main one writes."""
    path = out_dir / PROMPTS_FILE
    if path.is_file():
        old = path.read_text(encoding="utf-8").split("\n")[:-1]
        for i, (a, b) in enumerate(zip(old, prompts)):
            if a != b:
                raise UserError(f"{out_dir} holds images for other prompts (prompt {i}: '{a}' there, '{b}' now); "
                                "use another --output_dir")
        prompts = prompts + old[len(prompts):]
    if write:
        common.atomic_write_text(path, "".join(p + "\n" for p in prompts))


# =============================================================================
# Methods: base model, LoRA, or another UNet/transformer (SPEC §4, §5)
# =============================================================================

METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def classify_part(part):
    """What one piece of a method spec is: ("lora" | "network" | "hub", ref).

    A local folder is a LoRA if it holds pytorch_lora_weights.safetensors (what
    our trainers and diffusers' save_lora_weights write) and a network if it
    holds config.json (at its root or in unet/ or transformer/). A hub id is
    resolved when loaded: tried as a LoRA first, then as a network."""
    path = Path(part).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"'{part}' is a file but not a .safetensors LoRA")
        return "lora", str(path)
    if path.is_dir():
        if (path / "pytorch_lora_weights.safetensors").is_file():
            return "lora", str(path)
        if any((path / sub / "config.json").is_file() for sub in (".", "unet", "transformer")):
            return "network", str(path)
        raise UserError(f"'{part}' is a folder with neither pytorch_lora_weights.safetensors (a LoRA) nor "
                        "config.json (a UNet/transformer)")
    if HUB_ID.fullmatch(part):
        return "hub", part
    raise UserError(f"'{part}' is neither an existing file or folder nor a hub id (owner/name)")


def parse_methods(texts):
    """`NAME=SPEC` strings -> [{"name", "spec", "parts"}], in order.

    SPEC may be empty (the base model), one LoRA or network, or 'NET+LORA'
    (parts joined by '+', a network first, then LoRAs stacked on it). A spec
    that exists as a path is never split on '+'."""
    methods, seen = [], set()
    for text in texts or ["base="]:
        if "=" not in text:
            raise UserError(f"--method '{text}' must be NAME=SPEC (SPEC empty for the base model)")
        name, spec = (s.strip() for s in text.split("=", 1))
        if not METHOD_NAME.fullmatch(name):
            raise UserError(f"--method '{text}': the name must be letters, digits, '.', '_' or '-' (it names a folder)")
        if name in seen:
            raise UserError(f"--method name '{name}' is used twice")
        seen.add(name)
        pieces = [] if not spec else [spec] if Path(spec).expanduser().exists() else spec.split("+")
        try:
            parts = [classify_part(piece.strip()) for piece in pieces]
        except UserError as err:
            raise UserError(f"--method '{text}': {err}") from None
        if any(kind == "network" for kind, _ in parts[1:]):
            raise UserError(f"--method '{text}': a UNet/transformer can only come first (NET+LORA)")
        methods.append({"name": name, "spec": spec, "parts": parts})
    return methods


def hub_kind(repo_id):
    """"lora" or "network" from a hub model's file list, or None when the list
    cannot be read (offline) or says neither. Looking first avoids
    downloading a full UNet only to find that it is not a LoRA."""
    try:
        from huggingface_hub import list_repo_files

        files = set(list_repo_files(repo_id))
    except Exception:
        return None
    if any(f.endswith(".safetensors") and "lora" in f.lower() and "/" not in f for f in files):
        return "lora"
    if files & {"config.json", "unet/config.json", "transformer/config.json"}:
        return "network"
    return None


def cached_snapshot(repo_id):
    """The local cache folder of a hub model, or None if it was never downloaded."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        return None


def apply_method(backbone, method, device):
    """Load a method's network and LoRAs into the base pipeline."""
    pipe = backbone.pipe
    adapters = []
    for k, (kind, ref) in enumerate(method["parts"]):
        if kind == "hub":
            kind = hub_kind(ref) or "hub"
            if kind == "hub" and cached_snapshot(ref):  # offline: look at the local copy instead
                kind, ref = classify_part(cached_snapshot(ref))
        if kind == "hub":
            # a hub id may hold a LoRA or a network: try the LoRA first (only
            # the first part may be a network, anything later must be a LoRA)
            try:
                common.load_lora_into(backbone, ref, adapter_name=f"eval_{k}")
                kind = "lora_loaded"
            except UserError as lora_err:
                if k > 0:
                    raise
                pipe.unload_lora_weights()  # drop anything half-loaded
                try:
                    common.load_network_override(backbone, ref)
                    kind = "network_loaded"
                except UserError as net_err:
                    raise UserError(f"method '{method['name']}': '{ref}' is not a local path, and from the hub it "
                                    f"loads neither as a LoRA ({lora_err}) nor as a network ({net_err})") from None
        elif kind == "lora":
            common.load_lora_into(backbone, ref, adapter_name=f"eval_{k}")
            kind = "lora_loaded"
        elif kind == "network":
            if k > 0:  # parse_methods checks local folders; this catches hub ids
                raise UserError(f"method '{method['name']}': '{ref}' is a UNet/transformer; only the first part "
                                "of NET+LORA may be one")
            common.load_network_override(backbone, ref)
            kind = "network_loaded"
        if kind == "lora_loaded":
            adapters.append(f"eval_{k}")
        else:
            backbone.net.to(device)
    if adapters:
        # every LoRA at full strength, as it was trained
        pipe.set_adapters(adapters, [1.0] * len(adapters))
    return adapters


def restore_base(backbone, base_net, adapters):
    """Undo apply_method: remove the LoRA layers and put the base network back."""
    if adapters:
        backbone.pipe.unload_lora_weights()
    if backbone.net is not base_net:
        setattr(backbone.pipe, backbone.net_name, base_net)
        backbone.net = base_net
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# =============================================================================
# Generation (SPEC §5)
# =============================================================================


def image_relpath(method, seed, index):
    return f"{method}/seed_{seed}/{index:05d}.png"


def check_generation_settings(out_dir, name, settings, write=True):
    """Images of one method folder must all come from the same settings.
    Every process checks (so all stop together); only the main one writes."""
    path = out_dir / name / "generation.json"
    common.check_same_settings(path, settings, f"{out_dir / name}")
    if write and not path.is_file():
        common.atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


@torch.no_grad()
def generate_images(pipe, prompts, todo, out_dir, method, steps, guidance, resolution, batch_size, device, progress):
    """Generate the (seed, index) items of `todo` and save them as PNGs.

    Every image gets its own generator seeded with its seed, so a prompt's
    image does not depend on the batch it lands in, and every prompt starts
    from the same noise for a given seed: the public protocol re-seeds the
    generator before each prompt (SPEC §5). The generator lives on the
    generation device, as in the public scripts (CPU and CUDA draw different
    noise, so images are device-specific either way)."""
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(todo), batch_size), desc=f"generating {method}", disable=not progress):
        batch = todo[start : start + batch_size]
        generators = [torch.Generator(device=device).manual_seed(seed) for seed, _ in batch]
        images = pipe(
            prompt=[prompts[index] for _, index in batch],
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="pil",
        ).images
        for (seed, index), image in zip(batch, images):
            common.atomic_save_image(image, out_dir / image_relpath(method, seed, index))


# =============================================================================
# The per-image score table
# =============================================================================
# scores.jsonl holds one line {"image", "metric", "value"} per scored image;
# value null means the scorer ran but produced no score (an unparseable
# UnifiedReward answer, say): it is counted as missing, never as 0 (SPEC §5).
# Lines are appended after every batch, so a killed run loses at most one
# batch. Under several processes each writes scores.part-RANK.jsonl and the
# main process folds them into scores.jsonl.


def read_score_table(out_dir):
    """{(image, metric): value} from scores.jsonl and any part files; a later
    line wins; a truncated last line (killed run) is ignored."""
    table = {}
    for path in [out_dir / SCORES] + sorted(out_dir.glob("scores.part-*.jsonl")):
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                table[(record["image"], record["metric"])] = record["value"]
            except (ValueError, KeyError, TypeError):
                continue
    return table


def append_scores(path, records):
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def merge_score_parts(out_dir):
    """Fold the per-process part files into scores.jsonl (main process)."""
    parts = sorted(out_dir.glob("scores.part-*.jsonl"))
    if not parts:
        return
    table = read_score_table(out_dir)
    lines = "".join(json.dumps({"image": image, "metric": metric, "value": value}) + "\n"
                    for (image, metric), value in table.items())
    common.atomic_write_text(out_dir / SCORES, lines)
    for part in parts:
        part.unlink()


def drop_scores(out_dir, images):
    """Forget the scores of images about to be (re)generated: a score belongs
    to the image it was computed on."""
    images = set(images)
    path = out_dir / SCORES
    if not images or not path.is_file():
        return
    table = read_score_table(out_dir)
    if not any(image in images for image, _ in table):
        return
    lines = "".join(json.dumps({"image": image, "metric": metric, "value": value}) + "\n"
                    for (image, metric), value in table.items() if image not in images)
    common.atomic_write_text(path, lines)


# =============================================================================
# Scorers (SPEC §5). Each is built once, scores a batch of (image, prompt)
# and returns one float per image, or None where it produced no score.
# =============================================================================


class ScorerUnavailable(Exception):
    """A scorer's package or weights are missing; the message says what to do."""


def _first_line(err):
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _load_clip(model_id, device):
    """A transformers CLIP model and processor, or ScorerUnavailable."""
    from transformers import AutoProcessor, CLIPModel

    try:
        processor = AutoProcessor.from_pretrained(model_id)
        model = CLIPModel.from_pretrained(model_id, dtype=common.default_dtype(device)).to(device).eval()
    except Exception as err:
        raise ScorerUnavailable(f"could not load the CLIP model '{model_id}' ({_first_line(err)}); download it or "
                                "pass a local folder") from None
    return model, processor


def _features(output):
    # transformers 5 returns a model output from get_*_features, older ones a tensor
    return getattr(output, "pooler_output", output)


@torch.no_grad()
def clip_image_embeds(model, processor, images):
    inputs = processor(images=images, return_tensors="pt")
    pixels = inputs["pixel_values"].to(model.device, model.dtype)
    return F.normalize(_features(model.get_image_features(pixel_values=pixels)).float(), dim=-1)


@torch.no_grad()
def clip_text_embeds(model, processor, texts):
    inputs = processor(text=texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    inputs = {key: value.to(model.device) for key, value in inputs.items()}
    return F.normalize(_features(model.get_text_features(**inputs)).float(), dim=-1)


# PickScore is shared by the 'pickscore' and 'sgp' metrics: one copy in memory.
_PICKSCORERS = {}


def _pickscorer(args, device):
    key = (args.pickscore_model, args.pickscore_processor)
    if key not in _PICKSCORERS:
        try:
            _PICKSCORERS[key] = common.PickScorer(args.pickscore_model, args.pickscore_processor, device=device)
        except UserError as err:
            raise ScorerUnavailable(f"{err}; download them or pass --pickscore_model/--pickscore_processor") from None
    return _PICKSCORERS[key]


class PickScoreMetric:
    """Raw PickScore, exp(logit_scale) * cosine (SPEC §2): about 20-23, never /26."""

    def __init__(self, args, device):
        self.scorer = _pickscorer(args, device)

    def __call__(self, images, prompts):
        return [float(v) for v in self.scorer(images, prompts, batch_size=len(images))]


class RealismMetric:
    """'SGP-PickScore' realism (Figure 2, SPEC §5): the PickScore of the image
    against "<real prefix><prompt>" minus that against "<cg prefix><prompt>",
    by default "Realistic photo, {prompt}" and "CG render, {prompt}". Positive
    when the image reads more like a photograph than a rendering."""

    def __init__(self, args, device):
        self.scorer = _pickscorer(args, device)
        self.real_prefix, self.cg_prefix = args.sgp_real_prefix, args.sgp_cg_prefix

    def __call__(self, images, prompts):
        real = self.scorer(images, [self.real_prefix + p for p in prompts], batch_size=len(images))
        cg = self.scorer(images, [self.cg_prefix + p for p in prompts], batch_size=len(images))
        return [float(v) for v in real - cg]


class ClipScoreMetric:
    """CLIP score = 100 * max(cosine(image, text), 0), text truncated to 77
    tokens (the usual CLIPScore scale; not part of the paper's tables)."""

    def __init__(self, args, device):
        self.model, self.processor = _load_clip(args.clip_model, device)

    def __call__(self, images, prompts):
        cosine = (clip_image_embeds(self.model, self.processor, images) *
                  clip_text_embeds(self.model, self.processor, prompts)).sum(-1)
        return [float(v) for v in 100 * cosine.clamp(min=0)]


def build_aesthetic_mlp(state_dict):
    """The LAION improved-aesthetic-predictor head (SPEC §5): Linear layers
    768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout between the first four
    and no activation anywhere. The layer indices match the released state
    dict's keys (layers.0/2/4/6/7); the sizes are read from it, so a smaller
    CLIP (the tests' tiny one) works with a matching small weights file."""
    linear = [0, 2, 4, 6, 7]
    try:
        shapes = [state_dict[f"layers.{i}.weight"].shape for i in linear]
    except KeyError as err:
        raise ScorerUnavailable(f"the aesthetic weights lack {err}; expected the sac+logos+ava1-l14-linearMSE.pth "
                                "state dict") from None
    layers = []
    for i, shape in zip(linear, shapes):
        while len(layers) < i:  # dropout slots (inactive in eval mode)
            layers.append(torch.nn.Dropout(0.0))
        layers.append(torch.nn.Linear(shape[1], shape[0]))
    mlp = torch.nn.Module()
    mlp.layers = torch.nn.Sequential(*layers)
    mlp.load_state_dict(state_dict)
    return mlp.eval()


class AestheticMetric:
    """LAION aesthetic score: the MLP above applied to the L2-normalised CLIP
    ViT-L/14 image embedding (SPEC §5), about 5-6 for SD images."""

    def __init__(self, args, device):
        weights = args.aesthetic_weights
        if re.match(r"https?://", weights):
            local = Path(args.cache_dir) / "weights" / Path(weights).name
            if not local.is_file():
                try:
                    local.parent.mkdir(parents=True, exist_ok=True)
                    torch.hub.download_url_to_file(weights, str(local), progress=False)
                except Exception as err:
                    raise ScorerUnavailable(f"could not download {weights} ({_first_line(err)}); download it and "
                                            "pass --aesthetic_weights FILE") from None
            weights = local
        if not Path(weights).is_file():
            raise ScorerUnavailable(f"aesthetic weights not found: {weights}")
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        self.mlp = build_aesthetic_mlp(state_dict).to(device)
        self.model, self.processor = _load_clip(args.aesthetic_clip_model, device)
        embed_dim = self.model.config.projection_dim
        if self.mlp.layers[0].in_features != embed_dim:
            raise ScorerUnavailable(f"the aesthetic MLP takes {self.mlp.layers[0].in_features}-d embeddings but "
                                    f"{args.aesthetic_clip_model} gives {embed_dim}-d (use CLIP ViT-L/14)")

    @torch.no_grad()
    def __call__(self, images, prompts):
        embeds = clip_image_embeds(self.model, self.processor, images)
        return [float(v) for v in self.mlp.layers(embeds).squeeze(-1)]


def rgb_to_gray(image):
    """Grayscale of an 8-bit RGB image: the BT.601 luma weights
    0.299 R + 0.587 G + 0.114 B in OpenCV's 14-bit fixed point,

        gray = (4899 R + 9617 G + 1868 B + 8192) >> 14   (integers 0-255).

    This is cv2.cvtColor(.., COLOR_RGB2GRAY)'s formula; OpenCV's vectorised
    path rounds an occasional pixel one level differently (checked: the
    Laplacian variance then differs by about 1e-5 relative)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    return (rgb[..., 0] * 4899 + rgb[..., 1] * 9617 + rgb[..., 2] * 1868 + 8192) >> 14


def laplacian_variance(image):
    """Texture detail (Figure 2, SPEC §5): the variance of the Laplacian of the
    grayscale image (rgb_to_gray, values 0-255).

    Laplacian kernel [[0, 1, 0], [1, -4, 1], [0, 1, 0]] (4-neighbour), borders
    mirrored without repeating the edge pixel (numpy 'reflect', OpenCV's
    default BORDER_REFLECT_101), population variance over all pixels. Equal to
    cv2.Laplacian(gray, cv2.CV_64F).var() for the same gray image."""
    gray = rgb_to_gray(image).astype(np.float64)
    p = np.pad(gray, 1, mode="reflect")
    laplacian = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * gray
    return float(laplacian.var())


class LaplacianMetric:
    def __init__(self, args, device):
        pass

    def __call__(self, images, prompts):
        return [laplacian_variance(image) for image in images]


class ImageRewardMetric:
    """ImageReward v1.0 (PyPI image-reward, SPEC §5)."""

    def __init__(self, args, device):
        try:
            import ImageReward as RM
        except ImportError:
            raise ScorerUnavailable("pip install image-reward (it pins timm 0.6.13 and fairscale; use a separate "
                                    "environment and `evaluate.py score` if that conflicts)") from None
        try:
            self.model = RM.load("ImageReward-v1.0", device=str(device)).eval()
        except Exception as err:
            raise ScorerUnavailable(f"could not load ImageReward-v1.0 ({_first_line(err)})") from None

    @torch.no_grad()
    def __call__(self, images, prompts):
        return [float(self.model.score(prompt, image)) for image, prompt in zip(images, prompts)]


class HPSv3Metric:
    """HPSv3 (PyPI hpsv3): the mean mu of its (mu, sigma) output."""

    wants_paths = True  # the package reads image files itself

    def __init__(self, args, device):
        try:
            from hpsv3 import HPSv3RewardInferencer
        except ImportError:
            raise ScorerUnavailable(
                "pip install hpsv3 (it pins transformers 4.45.2: install it in its own environment and run "
                "`python evaluate.py score --images OUT --metrics hpsv3` there)") from None
        try:
            self.inferencer = HPSv3RewardInferencer(device=str(device))
        except Exception as err:
            raise ScorerUnavailable(f"could not load HPSv3 ({_first_line(err)})") from None

    @torch.no_grad()
    def __call__(self, paths, prompts):
        rewards = self.inferencer.reward(prompts=list(prompts), image_paths=[str(p) for p in paths])
        return [float(r[0]) for r in rewards]


class DeQAMetric:
    """DeQA-Score (image only, 1-5 scale): the model's own `score` method from
    its remote code (SPEC §5)."""

    def __init__(self, args, device):
        from transformers import AutoModelForCausalLM

        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                args.deqa_model, trust_remote_code=True, attn_implementation="eager", dtype=dtype).to(device).eval()
        except Exception as err:
            raise ScorerUnavailable(
                f"could not load {args.deqa_model} ({_first_line(err)}); its remote code targets an older "
                "transformers: if that is the cause, run `evaluate.py score --metrics deqa` in an environment with "
                "the transformers version its model card names") from None

    @torch.no_grad()
    def __call__(self, images, prompts):
        return [float(v) for v in torch.as_tensor(self.model.score(images)).float().flatten()]


FINAL_SCORE = re.compile(r"final\s*score\s*[:：]\s*\**\s*([-+]?\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_final_score(answer):
    """The x of the last "Final Score: x" in a UnifiedReward answer, or None
    when there is none (such images are counted as missing, never scored 0).
    Tolerates markdown bold ("**Final Score:** 3.5") and any letter case."""
    if not isinstance(answer, str):
        return None
    matches = FINAL_SCORE.findall(answer)
    if not matches:
        return None
    value = float(matches[-1])
    return value if math.isfinite(value) else None


class UnifiedRewardMetric:
    """UnifiedReward-qwen-7b point score (SPEC §5): the model answers a
    question about (prompt, image) and ends with "Final Score: x"."""

    def __init__(self, args, device):
        try:
            from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
        except ImportError:
            raise ScorerUnavailable("needs a transformers with Qwen2.5-VL: pip install -U transformers") from None
        self.question = UNIFIEDREWARD_QUESTION
        if args.unifiedreward_question:
            self.question = Path(args.unifiedreward_question).read_text(encoding="utf-8")
            if "{prompt}" not in self.question:
                raise UserError(f"{args.unifiedreward_question} lacks the {{prompt}} placeholder")
        try:
            self.processor = AutoProcessor.from_pretrained(args.unifiedreward_model)
            self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                args.unifiedreward_model, dtype=common.default_dtype(device)).to(device).eval()
        except Exception as err:
            raise ScorerUnavailable(f"could not load {args.unifiedreward_model} ({_first_line(err)})") from None
        # batched generation needs the prompts padded on the left
        self.processor.tokenizer.padding_side = "left"
        self.max_new_tokens = args.unifiedreward_max_new_tokens
        self.unparsed = 0

    @torch.no_grad()
    def __call__(self, images, prompts):
        texts = []
        for prompt in prompts:
            messages = [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": self.question.replace("{prompt}", prompt)}]}]
            texts.append(self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        inputs = self.processor(text=texts, images=list(images), padding=True, return_tensors="pt").to(self.model.device)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        answers = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        scores = [parse_final_score(answer) for answer in answers]
        for answer, score in zip(answers, scores):
            if score is None:
                self.unparsed += 1
                if self.unparsed <= 5:  # show a few, the count goes to the report
                    logger.warning("UnifiedReward answer without 'Final Score: x' (counted missing): %r", answer[-300:])
        return scores


SCORERS = {
    "pickscore": PickScoreMetric, "imagereward": ImageRewardMetric, "unifiedreward": UnifiedRewardMetric,
    "hpsv3": HPSv3Metric, "deqa": DeQAMetric, "aesthetic": AestheticMetric, "laplacian": LaplacianMetric,
    "sgp": RealismMetric, "clip": ClipScoreMetric,
}


def parse_metrics(text):
    metrics = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in SCORERS]
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)}")
    return list(dict.fromkeys(metrics))


def score_images(out_dir, manifest, metrics, args, state):
    """Score every manifest image that lacks a score, metric by metric.

    Returns {metric: reason} for the metrics that did not run. A scorer is only
    built when it has work, and freed before the next one is built."""
    from tqdm.auto import tqdm

    device = state.device
    table = read_score_table(out_dir)
    target = out_dir / (SCORES if state.num_processes == 1 else f"scores.part-{state.process_index}.jsonl")
    not_run = {}
    for metric in metrics:
        pending = [entry for entry in manifest if (entry["image"], metric) not in table]
        if not pending:
            continue
        try:
            scorer = SCORERS[metric](args, device)
        except ScorerUnavailable as err:
            not_run[metric] = f"not run: {err}"
            logger.warning("%s: not run: %s", metric, err)
            continue
        logger.info("%s: scoring %d images", metric, len(pending))
        try:
            with state.split_between_processes(pending) as mine:
                for start in tqdm(range(0, len(mine), args.score_batch_size), desc=f"scoring {metric}",
                                  disable=not state.is_main_process):
                    batch = mine[start : start + args.score_batch_size]
                    paths = [out_dir / entry["image"] for entry in batch]
                    if getattr(scorer, "wants_paths", False):
                        inputs = paths
                    else:
                        inputs = [Image.open(path).convert("RGB") for path in paths]
                    values = scorer(inputs, [entry["prompt"] for entry in batch])
                    values = [v if v is not None and math.isfinite(v) else None for v in values]
                    append_scores(target, [{"image": entry["image"], "metric": metric, "value": value}
                                           for entry, value in zip(batch, values)])
        except Exception as err:  # a broken scorer must not lose the others' work
            logger.exception("%s failed", metric)
            not_run[metric] = f"failed: {_first_line(err)}"
        del scorer  # free it before the next scorer is built
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    _PICKSCORERS.clear()
    gc.collect()
    return not_run


# =============================================================================
# Aggregation and report (pure functions first)
# =============================================================================


def aggregate(rows, methods, metrics):
    """Table 1 statistics from per-image rows (SPEC §5).

    rows: dicts with method, seed, metric and value (None = missing).
    For every (method, metric): the mean over prompts within each seed
    (missing values excluded), then the mean and the standard deviation
    (population, ddof=0) of those per-seed means. n counts the scores used,
    missing the ones excluded. A pair with no scores at all is left out."""
    groups = {}
    for row in rows:
        groups.setdefault((row["method"], row["metric"]), {}).setdefault(row["seed"], []).append(row["value"])
    results = {}
    for method in methods:
        for metric in metrics:
            per_seed_values = groups.get((method, metric))
            if not per_seed_values:
                continue
            per_seed, n, missing = {}, 0, 0
            for seed in sorted(per_seed_values):
                valid = [v for v in per_seed_values[seed] if v is not None]
                missing += len(per_seed_values[seed]) - len(valid)
                n += len(valid)
                if valid:
                    per_seed[str(seed)] = float(np.mean(valid))
            means = list(per_seed.values())
            results.setdefault(method, {})[metric] = {
                "mean": float(np.mean(means)) if means else None,
                "std": float(np.std(means)) if means else None,
                "per_seed": per_seed,
                "n": n,
                "missing": missing,
            }
    return results


def human_preference(results, methods):
    """Figure 2's human preference: ½·minmax(UnifiedReward) + ½·minmax(HPSv3),
    min-max taken across methods (SPEC §5). None unless both metrics exist
    for every method; a metric equal for all methods contributes 0."""
    columns = []
    for metric in ("unifiedreward", "hpsv3"):
        values = [results.get(m, {}).get(metric, {}).get("mean") for m in methods]
        if any(v is None for v in values):
            return None
        lo, hi = min(values), max(values)
        columns.append([(v - lo) / (hi - lo) if hi > lo else 0.0 for v in values])
    return {m: 0.5 * a + 0.5 * b for m, a, b in zip(methods, *columns)}


def _rank_marks(values, higher_is_better):
    """{index: "best" | "second"} by value; ties share a mark."""
    distinct = sorted({v for v in values if v is not None}, reverse=higher_is_better)
    marks = {}
    for i, v in enumerate(values):
        if v is not None and v == distinct[0]:
            marks[i] = "best"
        elif v is not None and len(distinct) > 1 and v == distinct[1]:
            marks[i] = "second"
    return marks


def results_markdown(report):
    """Table 1 (SPEC §5) as markdown from a results.json dict.

    Rows are methods, columns metrics. Each cell: mean ± std over seeds, and,
    except on the baseline (first) row, the relative gain over the baseline,
    (value - baseline) / |baseline|, in percent. Per column the best value is
    bold and the second best underlined, compared at the shown precision and
    in the direction of HIGHER_IS_BETTER."""
    methods = [m["name"] for m in report["methods"]]
    metrics = report["metrics"]
    results = report["results"]
    baseline = methods[0]
    lines = [f"# {report.get('title', 'Evaluation')}", ""]
    lines.append("| Method | " + " | ".join(METRIC_TITLES.get(m, m) for m in metrics) + " |")
    lines.append("|---|" + "---|" * len(metrics))
    cells = {m: [] for m in methods}
    for metric in metrics:
        decimals = METRIC_DECIMALS.get(metric, 2)
        means = [results.get(m, {}).get(metric, {}).get("mean") for m in methods]
        shown = [None if v is None else round(v, decimals) for v in means]
        marks = _rank_marks(shown, HIGHER_IS_BETTER.get(metric, True))
        base = means[0]
        for i, method in enumerate(methods):
            entry = results.get(method, {}).get(metric)
            if entry is None or entry["mean"] is None:
                cells[method].append("—")
                continue
            text = f"{entry['mean']:.{decimals}f} ± {entry['std']:.{decimals}f}"
            if marks.get(i) == "best":
                text = f"**{text}**"
            elif marks.get(i) == "second":
                text = f"<u>{text}</u>"
            if method != baseline and base not in (None, 0):
                gain = round(100 * (entry["mean"] - base) / abs(base), 1) + 0.0  # + 0.0 turns -0.0 into 0.0
                text += f" ({gain:+.1f}%)"
            cells[method].append(text)
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(cells[method]) + " |")
    seeds = report.get("seeds", [])
    lines += [
        "",
        f"Mean over {report.get('n_prompts', '?')} prompts per seed, then mean ± std (population) over "
        f"{len(seeds)} seeds ({', '.join(str(s) for s in seeds)}). Relative gains are over the first row "
        f"({baseline}). **Bold**: best, <u>underlined</u>: second best. "
        + ("All metrics are higher-is-better." if all(HIGHER_IS_BETTER.get(m, True) for m in metrics)
           else "Lower is better for: " + ", ".join(m for m in metrics if not HIGHER_IS_BETTER.get(m, True)) + "."),
    ]
    missing = [(method, metric, results[method][metric]["missing"]) for method in methods
               for metric in metrics if results.get(method, {}).get(metric, {}).get("missing")]
    if missing:
        lines += ["", "Missing scores (excluded from the means, e.g. unparseable UnifiedReward answers):"]
        lines += [f"- {method} / {metric}: {count}" for method, metric, count in missing]
    if report.get("human_preference"):
        lines += ["", "Human preference (½·minmax UnifiedReward + ½·minmax HPSv3 across methods): "
                  + ", ".join(f"{m} {v:.3f}" for m, v in report["human_preference"].items())]
    if report.get("not_run"):
        lines += ["", "Metrics not computed:"]
        lines += [f"- {metric}: {reason}" for metric, reason in report["not_run"].items()]
    lines += ["", "Methods:"]
    lines += [f"- {m['name']}: {m['spec'] or '(base model)'}" for m in report["methods"]]
    return "\n".join(lines) + "\n"


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap size
        return ImageFont.load_default()


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _scatter_panel(points, x_label, y_label, title, size=(520, 440)):
    """One scatter plot drawn with PIL: points = [(label, x, y)]."""
    width, height = size
    left, right, top, bottom = 80, 20, 56, 60
    panel = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(panel)
    font, small = _font(15), _font(12)
    xs, ys = [p[1] for p in points], [p[2] for p in points]

    def span(values):
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.15 or abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad

    (x0, x1), (y0, y1) = span(xs), span(ys)
    to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * (width - left - right),
                          height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for frac in (0.0, 0.5, 1.0):  # three ticks per axis
        xv, yv = x0 + frac * (x1 - x0), y0 + frac * (y1 - y0)
        px, _ = to_px(xv, y0)
        _, py = to_px(x0, yv)
        draw.line([px, height - bottom, px, height - bottom + 5], fill="black")
        draw.text((px, height - bottom + 8), f"{xv:.4g}", fill="black", font=small, anchor="ma")
        draw.line([left - 5, py, left, py], fill="black")
        draw.text((left - 8, py), f"{yv:.4g}", fill="black", font=small, anchor="rm")
    draw.text((width / 2, 6), title, fill="black", font=font, anchor="ma")
    draw.text(((left + width - right) / 2, height - 22), x_label, fill="black", font=font, anchor="ma")
    draw.text((6, top - 22), y_label, fill="black", font=font)
    for i, (label, x, y) in enumerate(points):
        px, py = to_px(x, y)
        color = PALETTE[i % len(PALETTE)]
        draw.ellipse([px - 6, py - 6, px + 6, py + 6], fill=color, outline="black")
        draw.text((px + 9, py - 9), label, fill=color, font=small)
    return panel


def draw_figure2(report, path):
    """Figure-2-style scatter (SPEC §5): texture detail (Laplacian variance)
    vs realism (SGP-PickScore), and human preference vs realism. A panel is
    drawn only when its metrics exist; returns False when none can be."""
    methods = [m["name"] for m in report["methods"]]
    results = report["results"]
    mean = lambda method, metric: results.get(method, {}).get(metric, {}).get("mean")
    panels = []
    if all(mean(m, "laplacian") is not None and mean(m, "sgp") is not None for m in methods):
        panels.append(_scatter_panel([(m, mean(m, "laplacian"), mean(m, "sgp")) for m in methods],
                                     "texture detail (Laplacian variance)", "realism (SGP-PickScore)",
                                     "Texture detail vs realism"))
    preference = report.get("human_preference")
    if preference and all(mean(m, "sgp") is not None for m in methods):
        panels.append(_scatter_panel([(m, preference[m], mean(m, "sgp")) for m in methods],
                                     "human preference (UnifiedReward, HPSv3)", "realism (SGP-PickScore)",
                                     "Human preference vs realism"))
    if not panels:
        return False
    figure = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
    for i, panel in enumerate(panels):
        figure.paste(panel, (i * panel.width, 0))
    common.atomic_save_image(figure, path)
    return True


def draw_grid(out_dir, manifest, methods, num_prompts, path):
    """The first prompts at the first seed, one row per method."""
    if not manifest:
        return False
    seed = manifest[0]["seed"]
    indices = sorted({e["index"] for e in manifest})[:num_prompts]
    by_key = {(e["method"], e["seed"], e["index"]): out_dir / e["image"] for e in manifest}
    tiles = [[by_key.get((m, seed, i)) for i in indices] for m in methods]
    first = next((p for row in tiles for p in row if p is not None and p.is_file()), None)
    if first is None:
        return False
    size = max(128, min(256, Image.open(first).width))  # tiny test images are enlarged to stay readable
    label_width, header = 140, 24
    grid = Image.new("RGB", (label_width + size * len(indices), header + size * len(methods)), "white")
    draw = ImageDraw.Draw(grid)
    font = _font(14)
    for col, index in enumerate(indices):
        draw.text((label_width + col * size + 4, 4), f"prompt {index}", fill="black", font=font)
    draw.text((6, 4), f"seed {seed}", fill="black", font=font)
    for row, method in enumerate(methods):
        draw.text((6, header + row * size + size // 2), method, fill="black", font=font, anchor="lm")
        for col, tile in enumerate(tiles[row]):
            if tile is not None and tile.is_file():
                grid.paste(Image.open(tile).convert("RGB").resize((size, size)),
                           (label_width + col * size, header + row * size))
    common.atomic_save_image(grid, path)
    return True


def write_report(out_dir, run_info, manifest, requested_metrics, not_run, grid_prompts):
    """results.json, results.md, figure2.png and grid.png from the score table."""
    methods = [m["name"] for m in run_info["methods"]]
    table = read_score_table(out_dir)
    rows, scored = [], set()
    for entry in manifest:
        for metric in ALL_METRICS:
            if (entry["image"], metric) in table:
                rows.append({"method": entry["method"], "seed": entry["seed"], "index": entry["index"],
                             "metric": metric, "value": table[(entry["image"], metric)]})
                scored.add(metric)
    # columns: every requested metric and every metric scored earlier (e.g. by
    # `evaluate.py score` in another environment), in Table 1's order
    metrics = [m for m in ALL_METRICS if m in scored or m in requested_metrics]
    results = aggregate(rows, methods, metrics)
    report = dict(run_info)
    report.update({
        "title": run_info.get("title", "Evaluation"),
        "metrics": metrics,
        "higher_is_better": {m: HIGHER_IS_BETTER[m] for m in metrics},
        "results": results,
        "human_preference": human_preference(results, methods),
        # a failure is always shown; "not run" only while the metric has no scores
        "not_run": {m: r for m, r in not_run.items() if m in metrics and (m not in scored or r.startswith("failed"))},
    })
    common.atomic_write_text(out_dir / "results.json", json.dumps(report, indent=2) + "\n")
    common.atomic_write_text(out_dir / "results.md", results_markdown(report))
    if not draw_figure2(report, out_dir / "figure2.png"):
        logger.info("figure2.png not drawn: it needs laplacian and sgp (and unifiedreward + hpsv3 for the "
                    "human-preference panel)")
    draw_grid(out_dir, manifest, methods, grid_prompts, out_dir / "grid.png")
    return report


# =============================================================================
# The two commands
# =============================================================================


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path, records):
    common.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def make_state():
    """The process group of `accelerate launch` / torchrun (or a single process).
    Without a GPU, accelerate only forms a multi-process group when asked for
    CPU explicitly."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def main(argv=None):
    args = parse_args(argv)
    if args.command == "score":
        return score_main(args)

    # ---- 1. check every input before any heavy work --------------------------
    metrics = parse_metrics(args.metrics)
    methods = parse_methods(args.method)
    state = make_state()
    device = state.device
    out_dir = Path(args.output_dir)
    with state.main_process_first():  # only the main process downloads a prompt set
        prompts = load_prompts(args.prompts, args.cache_dir, args.max_prompts)
    check_prompts(out_dir, prompts, write=state.is_main_process)
    logger.info("%d prompts x %d seeds x %d methods on %d process(es)", len(prompts), len(args.seeds),
                len(methods), state.num_processes)

    # ---- 2. the base pipeline, loaded once (bf16 on GPU, SPEC §5) ------------
    dtype = common.default_dtype(device)
    pipe = common.load_pipeline(args.pretrained_model, dtype=dtype)
    # The public evaluation disables the safety checker: a blacked-out image
    # would be scored as if the model had drawn it.
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe.to(device)
    backbone = common.Backbone(pipe, device, dtype)
    base_net = backbone.net
    default_steps, default_guidance = SAMPLING_DEFAULTS[backbone.kind]
    steps = args.num_inference_steps or default_steps
    guidance = default_guidance if args.guidance_scale is None else args.guidance_scale

    # ---- 3. generate what is missing, one method at a time -------------------
    manifest = []
    for method in methods:
        name = method["name"]
        settings = {"spec": method["spec"], "pretrained_model": args.pretrained_model, "backbone": backbone.kind,
                    "num_inference_steps": steps, "guidance_scale": guidance, "resolution": args.resolution}
        check_generation_settings(out_dir, name, settings, write=state.is_main_process)
        items = [(seed, index) for seed in args.seeds for index in range(len(prompts))]
        manifest += [{"image": image_relpath(name, s, i), "method": name, "seed": s, "index": i,
                      "prompt": prompts[i]} for s, i in items]
        # Every process lists the missing images before any of them starts
        # writing (the barrier below), so all split the same list.
        todo = [(s, i) for s, i in items if not (out_dir / image_relpath(name, s, i)).is_file()]
        if not todo:
            logger.info("%s: all %d images exist", name, len(items))
            continue
        if state.is_main_process:
            drop_scores(out_dir, [image_relpath(name, s, i) for s, i in todo])
        state.wait_for_everyone()
        logger.info("%s: generating %d of %d images (%d steps, guidance %s)", name, len(todo), len(items), steps,
                    guidance)
        adapters = apply_method(backbone, method, device)
        try:
            with state.split_between_processes(todo) as mine:
                generate_images(pipe, prompts, mine, out_dir, name, steps, guidance, args.resolution,
                                args.batch_size, device, state.is_main_process)
        finally:
            restore_base(backbone, base_net, adapters)
        state.wait_for_everyone()
    del pipe, backbone, base_net
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    run_info = {
        "title": f"{Path(args.pretrained_model).name}, {Path(args.prompts).name}",
        "methods": [{"name": m["name"], "spec": m["spec"]} for m in methods],
        "prompts": args.prompts,
        "n_prompts": len(prompts),
        "seeds": list(args.seeds),
        "generation": {"pretrained_model": args.pretrained_model, "num_inference_steps": steps,
                       "guidance_scale": guidance, "resolution": args.resolution},
    }
    if state.is_main_process:
        write_jsonl(out_dir / MANIFEST, manifest)
        common.atomic_write_text(out_dir / RUN_INFO, json.dumps(run_info, indent=2) + "\n")

    # ---- 4. score, then the report -------------------------------------------
    finish(out_dir, run_info, manifest, metrics, args, state)


def scan_image_folder(folder, prompts, baseline=None):
    """A manifest for a folder laid out as NAME/seed_S/00000.png that another
    tool wrote: prompts[i] is the prompt of image i."""
    manifest = []
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(p.glob("seed_*/*.png")))
    if not names:
        raise UserError(f"{folder} has no NAME/seed_S/00000.png images")
    if baseline is not None:
        if baseline not in names:
            raise UserError(f"--baseline {baseline} is not a method folder of {folder} ({', '.join(names)})")
        names.remove(baseline)
        names.insert(0, baseline)
    seeds = set()
    for name in names:
        for seed_dir in sorted((folder / name).glob("seed_*")):
            seed = int(seed_dir.name.split("_", 1)[1])
            seeds.add(seed)
            for image in sorted(seed_dir.glob("*.png")):
                index = int(image.stem)
                if index >= len(prompts):
                    raise UserError(f"{image}: index {index} but only {len(prompts)} prompts")
                manifest.append({"image": image_relpath(name, seed, index), "method": name, "seed": seed,
                                 "index": index, "prompt": prompts[index]})
    run_info = {"title": folder.name, "methods": [{"name": n, "spec": ""} for n in names],
                "n_prompts": len({e["index"] for e in manifest}), "seeds": sorted(seeds)}
    return manifest, run_info


def score_main(args):
    """`evaluate.py score`: score an existing folder and refresh its report."""
    metrics = parse_metrics(args.metrics)
    out_dir = Path(args.images)
    if not out_dir.is_dir():
        raise UserError(f"--images {out_dir} is not a folder")
    state = make_state()
    if (out_dir / MANIFEST).is_file():
        manifest = read_jsonl(out_dir / MANIFEST)
        run_info = json.loads((out_dir / RUN_INFO).read_text()) if (out_dir / RUN_INFO).is_file() else None
        if run_info is None:
            names = list(dict.fromkeys(e["method"] for e in manifest))
            run_info = {"methods": [{"name": n, "spec": ""} for n in names],
                        "n_prompts": len({e["index"] for e in manifest}),
                        "seeds": sorted({e["seed"] for e in manifest})}
    else:
        if args.prompts is None:
            raise UserError(f"{out_dir} has no {MANIFEST}: pass --prompts (the prompts its images were made from)")
        prompts = load_prompts(args.prompts, args.cache_dir)
        manifest, run_info = scan_image_folder(out_dir, prompts, args.baseline)
        if state.is_main_process:
            write_jsonl(out_dir / MANIFEST, manifest)
            common.atomic_write_text(out_dir / RUN_INFO, json.dumps(run_info, indent=2) + "\n")
    missing = [e["image"] for e in manifest if not (out_dir / e["image"]).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) of {out_dir / MANIFEST} are missing, e.g. {missing[0]}; "
                        "run the generation first")
    finish(out_dir, run_info, manifest, metrics, args, state)


def finish(out_dir, run_info, manifest, metrics, args, state):
    """Score what is missing, merge the processes' scores, write the report."""
    not_run = score_images(out_dir, manifest, metrics, args, state)
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    merge_score_parts(out_dir)
    # a metric reported "not run" earlier stays so until it gets scores
    previous = run_info.get("not_run", {})
    run_info["not_run"] = {**{m: r for m, r in previous.items() if m not in metrics}, **not_run}
    common.atomic_write_text(out_dir / RUN_INFO, json.dumps(run_info, indent=2) + "\n")
    # columns: this run's metrics, and earlier ones still waiting to be computed
    requested = metrics + [m for m in run_info["not_run"] if m not in metrics]
    report = write_report(out_dir, run_info, manifest, requested, run_info["not_run"], args.grid_prompts)
    logger.info("wrote %s and %s", out_dir / "results.json", out_dir / "results.md")
    print(results_markdown(report))
    failed = {m: r for m, r in not_run.items() if r.startswith("failed")}
    if failed:
        raise SystemExit(f"error: metric(s) failed while scoring: {failed} (the other results were written)")


if __name__ == "__main__":
    common.run_main(main)
