#!/usr/bin/env python
# coding=utf-8
"""Evaluate text-to-image models as RealAlign's Table 1 and Figure 2 do (README 'Method: evaluation').

  python evaluate.py --method base= --method ours=outputs/dpo/checkpoint-800 --prompts pickapic_v2
  python evaluate.py score --images OUT --metrics hpsv3     (more metrics for a folder, e.g. in another environment)
  python evaluate.py userstudy --method ours=... --method dpo=... --prompts hpdv2 --num_prompts 60
  python evaluate.py userstudy-tally STUDY_DIR votes-*.json     (the paper's Fig. 4 user study)

Under `accelerate launch` the prompts, then the images to score, are split across processes; all resumes. The
folder: NAME/seed_S/00000.png (prompt 0, method NAME, seed S), NAME/generation.json and prompts.txt (checked on
resume), manifest.jsonl (one line per image), scores.jsonl (per image and metric), run.json (the methods, the first
the baseline), results.json and results.md (Table 1 beside the paper's values), figure2.png (Fig. 2), grid.png (the
same prompts across methods)."""

import argparse
import ast
import contextlib
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
from PIL import Image
from tqdm.auto import tqdm

import common
from common import UserError

logger = logging.getLogger("realalign")

# ---------------------------------------------------------------- constants: prompt sets, the paper's numbers

DEFAULT_SEEDS = [42, 123, 456, 789, 1000]  # the public protocol's five seeds
SAMPLING_DEFAULTS = {"sd15": (50, 7.5), "sd3": (40, 4.5)}  # (steps, classifier-free guidance) per backbone
# Table 1's six, Figure 2's, CLIP; stylization needs OneIG-Bench's prompts and environment, CLIP is opt-in.
ALL_METRICS = ["pickscore", "imagereward", "unifiedreward", "hpsv3", "deqa", "aesthetic", "laplacian", "sgp",
               "stylization", "clip"]
DEFAULT_METRICS = ",".join(m for m in ALL_METRICS if m not in ("clip", "stylization"))
METRIC_TITLES = {
    "pickscore": "PickScore", "imagereward": "ImageReward", "unifiedreward": "UnifiedReward", "hpsv3": "HPSv3",
    "deqa": "DeQA", "aesthetic": "Aesthetic", "laplacian": "Texture Detail (Laplacian var.)",
    "sgp": "Realism (SGP-PickScore)", "stylization": "Stylization (OneIG-Bench)", "clip": "CLIP score"}
# results.md's decimals: the realism gap is a small difference (about -0.04), Laplacian variance is in the 1000s
METRIC_DECIMALS = {"laplacian": 0, "sgp": 3, "stylization": 3}
# All higher-is-better (Laplacian variance: more texture detail); the table honours False here.
HIGHER_IS_BETTER = {metric: True for metric in ALL_METRICS}

# Table 1's prompt sets: the authors' files at the pinned commit, read with line.strip() (13 of the 500 Pick-a-Pic
# prompts hold double spaces, which T5 and UnifiedReward see); a file without the stated count is refused.
AUTHORS_PROMPT_FILES = {  # name: (path in the authors' repository, number of prompts)
    "pickapic_v2": ("training_sd35m/dataset/pick_a_pic_v2/test.txt", 500),
    "partiprompts": ("training_sd35m/dataset/partiprompts/test.txt", 1632),
    "drawbench": ("training_sd35m/dataset/drawbench-unique/test.txt", 200)}  # drawbench/test.txt repeats them
# The same sets from the hub (--prompt_source hub; their order can differ), and HPDv2, which only the hub has.
PROMPT_SETS = {
    "pickapic_v2": "yuvalkirstain/pickapic_v2, split test_unique, column caption (500 unique prompts; needs pyarrow)",
    "partiprompts": "nateraw/parti-prompts, PartiPrompts.tsv, column Prompt (1632 prompts)",
    "drawbench": "shunk031/DrawBench, parquet conversion, column prompts (200 unique prompts; needs pyarrow)",
    "hpdv2": "zhwang/HPDv2, benchmark/{anime,concept-art,paintings,photo}.json (3200 prompts)"}
# The prompts of the qualitative panels, in caption order (paper Fig. 6, SD-1.5; Fig. 7, SD-3.5-M).
FIGURE_PROMPT_SETS = {
    "figure6": ["a plant",
                "a woman sitting on a table drinking coffee, long shot, wide shot, highly detailed, intricate, "
                "professional photography, RAW color, night shot, bokeh, sharp focus, taken with EOS 5D, UHD 8K",
                "a corgi's head"],
    "figure7": ["a fire hydrant", "a person", "Anime illustration of Gundam mech suit on Pixiv"]}
AESTHETIC_WEIGHTS_URL = \
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
# The UnifiedReward question is the authors' instrument: read at run time from this file, never copied.
AUTHORS_REWARDS_FILE = "training_sd35m/flow_grpo/rewards.py"
DEQA_REVISION = "f37ba4273ad8d7548e21ac2fa58353c517e4df49"  # the revision (remote code) the public evaluation loads

# The paper's numbers: Table 1 and Fig. 2's raw values from the authors' notebooks (notebook/figures/ at
# AUTHORS_COMMIT: detail_vs_realism/sd15_detail_vs_realism.ipynb, human_preference_vs_stylization/*.ipynb;
# Fig. 2 normalises over the rows without Table 1 values). Keyed by (backbone, prompt set), run_all.sh's names.
PAPER_RESULTS = {  # the rows in the notebooks' order
    ("sd15", "pickapic_v2"): {
        "base": dict(pickscore=20.65, imagereward=0.16, unifiedreward=2.92, hpsv3=5.98, deqa=3.70, aesthetic=5.48,
                     laplacian=1832.336, sgp=-0.041),
        "diffusion_dpo": dict(pickscore=21.03, imagereward=0.33, unifiedreward=3.03, hpsv3=6.80, deqa=3.78,
                              aesthetic=5.59, laplacian=1552.312, sgp=-0.075),
        "diffusion_kto": dict(laplacian=1580.512, sgp=-0.221), "inpo": dict(laplacian=1255.905, sgp=-0.253),
        "realalign": dict(pickscore=21.04, imagereward=0.38, unifiedreward=3.06, hpsv3=7.33, deqa=3.96,
                          aesthetic=5.64, laplacian=2353.761, sgp=-0.009),
        "diffusion_dpo_realalign": dict(pickscore=21.19, imagereward=0.42, unifiedreward=3.08, hpsv3=7.50,
                                        deqa=3.95, aesthetic=5.65, laplacian=2345.722, sgp=-0.011)},
    ("sd3", "drawbench"): {
        "base": dict(pickscore=22.42, imagereward=0.79, unifiedreward=3.30, hpsv3=10.03, deqa=4.09, aesthetic=5.44,
                     stylization=0.357),
        "flow_grpo": dict(pickscore=23.56, imagereward=1.26, unifiedreward=3.59, hpsv3=12.63, deqa=4.18,
                          aesthetic=5.94, stylization=0.260),
        "grpo_guard": dict(unifiedreward=3.64, hpsv3=12.51, stylization=0.241),
        "diffusion_nft": dict(unifiedreward=3.68, hpsv3=12.47, stylization=0.175),
        "realalign": dict(pickscore=22.80, imagereward=1.08, unifiedreward=3.46, hpsv3=12.77, deqa=4.26,
                          aesthetic=5.55, stylization=0.305),
        "flow_grpo_realalign": dict(pickscore=23.63, imagereward=1.30, unifiedreward=3.60, hpsv3=13.30, deqa=4.21,
                                    aesthetic=5.99, stylization=0.273)}}
PAPER_FIGURE2 = {"a": ("sd15", "pickapic_v2"), "b": ("sd3", "drawbench")}  # each min-max over its table's six rows
PAPER_ROW_ALIASES = {"realalign_released": "realalign"}  # the authors' released LoRAs are the RealAlign row

MANIFEST, SCORES, RUN_INFO, PROMPTS_FILE = "manifest.jsonl", "scores.jsonl", "run.json", "prompts.txt"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "realalign")

# ---------------------------------------------------------------- arguments (the shared flags defined once)


def parse_args(argv=None):
    """The four commands' flags; generation's and scoring's are shared, so each command reuses the other's work."""
    descriptions = {
        "generate": "Generate images for several methods and score them (RealAlign Table 1 / Figure 2). Use "
                    "`evaluate.py score --help` to score an existing folder.",
        "score": "Score the images of an existing evaluation folder (or any NAME/seed_S/00000.png folder) and refresh "
                 "its report. Scores already in the table are kept.",
        "userstudy": "Build a blind side-by-side user study (paper Fig. 4, Diffusion-DRO's protocol): --num_prompts "
                     "prompts drawn from --prompts with --seed, one comparison per prompt and baseline. The images "
                     "come from the evaluation folder --output_dir; the missing ones are generated there first.",
        "userstudy-tally": "Tally a user study (paper Fig. 4): win / tie / lose of the first method against each "
                           "baseline, with 95% intervals, into STUDY_DIR/tally.md, tally.json and figure4.png."}
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("score", "userstudy", "userstudy-tally") else "generate"
    formatter = argparse.ArgumentDefaultsHelpFormatter if command == "userstudy-tally" else common.HelpFormatter
    parser = argparse.ArgumentParser(prog="evaluate.py" + ("" if command == "generate" else f" {command}"),
                                     description=descriptions[command], formatter_class=formatter)
    add = parser.add_argument
    if command == "userstudy-tally":
        add("study_dir", help="The folder `evaluate.py userstudy` wrote (it holds key.json).")
        add("votes", nargs="+", help="The participants' vote files, as the page saves them.")
        add("--bootstrap_samples", type=common.positive_int, default=10000,
            help="Resamples of the participant-level bootstrap behind the 95%% intervals.")
        add("--seed", type=common.seed_int, default=0, help="Seed of the bootstrap.")
    if command in ("generate", "userstudy"):
        defaults = lambda j: ", ".join(f"{common.BACKBONE_NAMES[k]}: {v[j]}" for k, v in SAMPLING_DEFAULTS.items())
        add("--pretrained_model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
            help="Base diffusers pipeline (hub id or folder): SD-1.5 or SD-3.5-M.")
        add("--output_dir", default="outputs/eval", help="The evaluation folder: images (NAME/seed_S/00000.png) and "
            "reports. `userstudy` takes its images from here and makes the missing ones here.")
        add("--resolution", type=common.resolution_int, default=512, help="Image height and width.")
        add("--num_inference_steps", type=common.positive_int, help=f"Sampling steps (default: {defaults(0)}).")
        add("--guidance_scale", type=common.non_negative_float,
            help=f"Classifier-free guidance (default: {defaults(1)}).")
        add("--batch_size", type=common.positive_int, default=8, help="Prompts per pipeline call (per process).")
        add("--generation_dtype", choices=["fp16", "bf16"], default="fp16", help="Half precision of generation on a "
            "GPU. fp16 is the public protocol's (SD-1.5 pipeline in fp16; SD-3.5-M transformer and text encoders in "
            "fp16, VAE in fp32, under fp16 autocast). On CPU everything runs in fp32.")
        add("--method", action="append", metavar="NAME=MODEL", help="A model to evaluate, repeatable; the first is the "
            "baseline of the gains (in `userstudy`: the method under study, each later one a baseline). MODEL is empty "
            "(the base model), a LoRA (a .safetensors file; a folder or hub id holding diffusers' "
            "pytorch_lora_weights.safetensors or a PEFT adapter, at its root or in e.g. lora/learner/), or a "
            "UNet/transformer (a folder with config.json, or a hub id). 'NET+LORA' stacks a LoRA on another network "
            "(e.g. RealAlign trained on top of Diffusion-DPO). Default: base= (`userstudy` needs two or more).")
    if command == "score":
        add("--images", required=True, help="An evaluate.py output folder, or a folder of NAME/seed_S/00000.png.")
        add("--prompts", help="Only for a folder without manifest.jsonl: its prompts (file or set name).")
        add("--baseline", help="Only for a folder without manifest.jsonl: the baseline method's folder name "
            "(default: the first name in alphabetical order).")
    elif command == "generate":
        add("--prompts", default="pickapic_v2", help=f"A prompt set ({', '.join(PROMPT_SETS)}), the prompts of the "
            f"paper's qualitative panels ({', '.join(FIGURE_PROMPT_SETS)}), or a text file with one prompt per line.")
        add("--max_prompts", type=common.positive_int, help="Use only the first N prompts (quick runs).")
        add("--seeds", type=common.seed_int, nargs="+", default=DEFAULT_SEEDS,
            help="One image per prompt per seed; every prompt is generated with the same seed.")
    elif command == "userstudy":
        add("--prompts", default="hpdv2", help="The prompt set or file of the study's prompts (the paper: HPDv2).")
        add("--num_prompts", type=common.positive_int, default=60, help="Prompts drawn (the paper: 60).")
        add("--seed", type=common.seed_int, default=0, help="Seed of the draws: which prompts, the image seed and "
            "the side of 'ours' in each comparison, their numbering.")
        add("--image_seeds", type=common.seed_int, nargs="+", default=DEFAULT_SEEDS,
            help="Generation seeds of the images shown, at least one per baseline: the comparisons of a prompt each "
                 "use another one, so no image is shown twice (the evaluation's seeds, so its images are reused).")
        add("--study_dir", help="Where the study goes (default: OUTPUT_DIR/userstudy).")
        add("--question", default=STUDY_QUESTION, help="The question the page asks.")
        add("--cache_dir", default=CACHE_DIR, help="Where fetched prompt sets are kept.")
    if command in ("generate", "score"):
        add("--metrics", default=DEFAULT_METRICS,
            help=f"Comma-separated metrics, from: {', '.join(ALL_METRICS)}. Default: Table 1 and Figure 2's metrics.")
        add("--score_batch_size", type=common.positive_int, default=16,
            help="Images per scorer call, except HPSv3 and UnifiedReward (--vlm_batch_size).")
        add("--vlm_batch_size", type=common.positive_int, default=1, help="Images per HPSv3 / UnifiedReward call. 1 is "
            "the public evaluation's: batching pads the prompts, which can change a greedy answer.")
        add("--cache_dir", default=CACHE_DIR,
            help="Where fetched prompt sets, the authors' UnifiedReward question and the aesthetic MLP are kept.")
        add("--pickscore_model", default="yuvalkirstain/PickScore_v1", help="PickScore CLIP model (also for 'sgp').")
        add("--pickscore_processor", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            help="Processor (tokenizer + image transform) of the PickScore model.")
        add("--sgp_real_prefix", default="Realistic photo, ", help="Realism = PickScore(image, real_prefix + prompt) - "
            "PickScore(image, cg_prefix + prompt) (README 'Method: evaluation').")
        add("--sgp_cg_prefix", default="CG render, ", help="See --sgp_real_prefix.")
        add("--clip_model", default="openai/clip-vit-large-patch14",
            help="CLIP of the 'clip' metric (100 * max(cos, 0)).")
        add("--aesthetic_clip_model", default="openai/clip-vit-large-patch14",
            help="CLIP whose L2-normalised image embedding feeds the LAION aesthetic MLP.")
        add("--aesthetic_weights", default=AESTHETIC_WEIGHTS_URL,
            help="The aesthetic MLP's state dict: a local .pth file or a URL (downloaded to --cache_dir).")
        add("--unifiedreward_model", default="CodeGoat24/UnifiedReward-qwen-7b", help="UnifiedReward (a Qwen2.5-VL).")
        add("--unifiedreward_question", default=None, help="Text file with the question to ask UnifiedReward ({prompt} "
            f"is replaced by the prompt); default: the authors' template, read from {AUTHORS_REWARDS_FILE} of their "
            "repository at the pinned commit. The answer is read at 'Final Score: x', x in 1-5.")
        add("--unifiedreward_max_new_tokens", type=common.positive_int, default=512,
            help="Length limit of UnifiedReward's answer (its reasoning precedes the final score).")
        add("--deqa_model", default="zhiyuanyou/DeQA-Score-Mix3",
            help="DeQA-Score model (loaded with trust_remote_code).")
        add("--deqa_revision", default=DEQA_REVISION,
            help="Revision of --deqa_model, pinned to the public evaluation's (its remote code runs from it).")
        add("--oneig_dir", default=None, help="A clone of github.com/OneIG-Bench/OneIG-Benchmark with its style models "
            "(scripts/style/...), for 'stylization'; run `evaluate.py score --metrics stylization` in its environment.")
        add("--stylization_results", default=None, help="results.json of another evaluation folder with 'stylization' "
            "for the same method names (OneIG-Bench's style prompts), for Figure 2 (b).")
        add("--note", default=None, help="A line above results.md's table (the smoke run's: its models are tiny).")
        add("--prompt_source", choices=["authors", "hub"], default="authors", help="Where a named prompt set comes "
            "from: the authors' prompt files (the paper's prompts, pinned commit) or the Hugging Face hub datasets.")
        add("--grid_prompts", type=common.positive_int, default=4, help="Prompts shown in grid.png.")
    return argparse.Namespace(**vars(parser.parse_args(argv)), command=command)


def write_json(path, value):
    common.atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def open_image(path):
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as err:
        raise UserError(f"cannot read the image {path} ({common.first_line(err)}); it is damaged or missing: delete "
                        "it and rerun to generate it again") from None

# ---------------------------------------------------------------- prompts (README 'What the real run needs')


def fetch_prompt_set(name):
    """Download a public prompt set from the hub (PROMPT_SETS names the files and columns)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    if name == "partiprompts":
        path = hf_hub_download("nateraw/parti-prompts", "PartiPrompts.tsv", repo_type="dataset")
        with open(path, newline="", encoding="utf-8") as f:
            return [row["Prompt"] for row in csv.DictReader(f, delimiter="\t")]
    if name == "hpdv2":
        paths = [hf_hub_download("zhwang/HPDv2", f"benchmark/{style}.json", repo_type="dataset")
                 for style in ("anime", "concept-art", "paintings", "photo")]
        return [e if isinstance(e, str) else e["prompt"] for p in paths for e in json.loads(Path(p).read_text())]
    # Pick-a-Pic's parquet shards also hold the images (a large download, once); DrawBench: the hub's automatic
    # parquet conversion. Both are the 'unique' sets: the first occurrence of a prompt is kept.
    repo_id, columns, revision, files = {
        "pickapic_v2": ("yuvalkirstain/pickapic_v2", ["caption"], None, "*test_unique*.parquet"),
        "drawbench": ("shunk031/DrawBench", ["prompts", "prompt"], "refs/convert/parquet", "*.parquet")}[name]
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("this needs the package 'pyarrow': pip install pyarrow") from None
    paths = sorted(Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, allow_patterns=[files]))
                   .glob("**/*.parquet"))
    names = pq.read_schema(paths[0]).names if paths else []
    column = next((c for c in columns if c in names), None)
    if column is None:
        raise UserError(f"{repo_id} has no parquet file with one of the columns {columns} (found: {names})")
    values = (v for path in paths for v in pq.read_table(path, columns=[column])[column].to_pylist())
    return list(dict.fromkeys(map(str, values)))


def read_prompt_file(path):
    """One prompt per line, as the public code reads them (line.strip()); blank lines are skipped."""
    return [line.strip() for line in common.read_text(path).splitlines() if line.strip()]


def unifiedreward_question(args):
    """--unifiedreward_question FILE, or the authors': the string `prompt_template` in their `unifiedreward_score`."""
    if args.unifiedreward_question:
        if not Path(args.unifiedreward_question).is_file():
            raise UserError(f"--unifiedreward_question {args.unifiedreward_question}: no such file")
        question = common.read_text(args.unifiedreward_question)
    else:
        path = common.fetch_authors_file(AUTHORS_REWARDS_FILE, args.cache_dir, "the authors' UnifiedReward question")
        try:
            tree = ast.parse(common.read_text(path))
        except SyntaxError as err:
            raise UserError(f"{path} is not a Python file ({common.first_line(err)}); delete it and rerun") from None
        functions = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "unifiedreward_score"]
        found = [n.value.value for f in functions for n in ast.walk(f) if isinstance(n, ast.Assign)
                 and [getattr(t, "id", None) for t in n.targets] == ["prompt_template"]
                 and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)]
        if not found:
            raise UserError(f"{path} has no string `prompt_template` in a function `unifiedreward_score`; delete it "
                            "and rerun, or pass --unifiedreward_question FILE")
        question = found[-1]
    if "{prompt}" not in question:
        raise UserError(f"the UnifiedReward question in {args.unifiedreward_question or path} lacks {{prompt}}")
    return question


def load_prompts(spec, cache_dir, max_prompts=None, source="authors"):
    """The prompts of a set (fetched once from the authors' files or the hub, cached) or a text file."""
    if spec in FIGURE_PROMPT_SETS:
        prompts, source = FIGURE_PROMPT_SETS[spec], spec
    elif spec in AUTHORS_PROMPT_FILES and source == "authors":
        relpath, expected = AUTHORS_PROMPT_FILES[spec]
        cached = common.fetch_authors_file(relpath, cache_dir, f"the prompt set '{spec}'")
        prompts, source = read_prompt_file(cached), f"{spec} ({common.AUTHORS_REPO}/{relpath}, cached in {cached})"
        if len(prompts) != expected:
            cached.unlink()
            raise UserError(f"{common.AUTHORS_REPO}/{relpath} holds {len(prompts)} prompts, not the {expected} of "
                            f"paper Table 1's set '{spec}'; refusing it (pass --prompt_source hub, or a prompt file)")
    elif spec in PROMPT_SETS:
        cached = Path(cache_dir) / "prompts" / f"{spec}.hub.txt"
        if not cached.is_file():
            try:
                prompts = fetch_prompt_set(spec)
            except UserError:
                raise
            except Exception as err:
                raise UserError(f"could not fetch the prompt set '{spec}' ({PROMPT_SETS[spec]}): "
                                f"{common.first_line(err)} (offline, pass a text file of prompts instead)") from None
            # one prompt per line: only line breaks inside a prompt become spaces
            common.atomic_write_text(cached, "".join(" ".join(p.strip().splitlines()) + "\n"
                                                     for p in prompts if p.strip()))
        prompts, source = read_prompt_file(cached), f"{spec} ({PROMPT_SETS[spec]}, cached in {cached})"
    elif Path(spec).is_file():
        prompts, source = read_prompt_file(spec), spec
    else:
        names = ", ".join([*PROMPT_SETS, *FIGURE_PROMPT_SETS])
        raise UserError(f"--prompts '{spec}' is neither a prompt set ({names}) nor a file")
    if not prompts[:max_prompts]:
        raise UserError(f"no prompts in {source}")
    return prompts[:max_prompts]


def check_prompts(out_dir, prompts, write=True):
    """Image i of every method is prompt i's: other prompts are refused (by every process); the longest list is kept."""
    path = out_dir / PROMPTS_FILE
    old = path.read_text(encoding="utf-8").split("\n")[:-1] if path.is_file() else []
    for i, (a, b) in enumerate(zip(old, prompts)):
        if a != b:
            raise UserError(f"{out_dir} holds images for other prompts (prompt {i}: '{a}' there, '{b}' now); "
                            "use another --output_dir")
    if write:
        common.atomic_write_text(path, "".join(p + "\n" for p in prompts + old[len(prompts):]))

# ---------------------------------------------------------------- methods (NAME=MODEL): base, LoRA, network

def classify_part(part):
    """("lora" | "network" | "hub", ref) of one piece of a method spec: a folder is a LoRA in a published
    format (common.find_lora, also in e.g. the authors' lora/learner/) or a network (config.json)."""
    path = Path(part).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"'{part}' is a file but not a .safetensors LoRA")
        return "lora", str(path)
    if path.is_dir():
        if common.find_lora(common.lora_files(path), part):
            return "lora", str(path)
        if any((path / sub / "config.json").is_file() for sub in (".", "unet", "transformer")):
            return "network", str(path)
        raise UserError(f"'{part}' is a folder with neither a LoRA ({common.DIFFUSERS_LORA} or a PEFT "
                        f"{common.PEFT_CONFIG} + {common.PEFT_WEIGHTS}) nor config.json (a UNet/transformer)")
    if common.HUB_ID.fullmatch(part):
        return "hub", part  # resolved when loaded
    raise UserError(f"'{part}' is neither an existing file or folder nor a hub id (owner/name)")


def parse_methods(texts):
    """`NAME=MODEL` strings -> [{"name", "spec", "parts"}]; 'NET+LORA' splits, an existing path never."""
    methods = []
    for text in texts or ["base="]:
        name, equals, spec = (s.strip() for s in text.partition("="))
        if not equals:
            raise UserError(f"--method '{text}' must be NAME=MODEL (MODEL empty for the base model)")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise UserError(f"--method '{text}': the name must be letters, digits, '.', '_' or '-' (it names a folder)")
        if name in [m["name"] for m in methods]:
            raise UserError(f"--method name '{name}' is used twice")
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
    """"lora" or "network" from a hub model's file list (no UNet downloaded to learn it is no LoRA); None if unknown."""
    try:
        from huggingface_hub import list_repo_files
        files = set(list_repo_files(repo_id))
    except Exception:
        return None
    if any(f.rsplit("/", 1)[-1] in (common.PEFT_CONFIG, common.DIFFUSERS_LORA) or
           (f.endswith(".safetensors") and "lora" in f.lower() and "/" not in f) for f in files):
        return "lora"
    return "network" if files & {"config.json", "unet/config.json", "transformer/config.json"} else None


def apply_method(backbone, method, device):
    """Load a method's network and LoRAs into the base pipeline; returns the adapter names."""
    adapters = []
    for k, (kind, ref) in enumerate(method["parts"]):
        if kind == "hub" and not (kind := hub_kind(ref)):  # offline: what its local copy holds, if there is one
            snapshot = None
            with contextlib.suppress(Exception):
                from huggingface_hub import snapshot_download
                snapshot = snapshot_download(ref, local_files_only=True)
            kind, ref = classify_part(snapshot) if snapshot else ("hub", ref)
        if kind == "network" and k > 0:  # parse_methods checks local folders, this catches hub ids
            raise UserError(f"method '{method['name']}': '{ref}' is a UNet/transformer; only the first part of "
                            "NET+LORA may be one")
        if kind != "network":  # a LoRA, or a hub model of unknown kind: a LoRA, else (first part only) a network
            try:
                common.load_lora_into(backbone, ref, adapter_name=f"eval_{k}")
                adapters.append(f"eval_{k}")
                continue
            except UserError as err:
                if kind == "lora" or k > 0:
                    raise
                backbone.pipe.unload_lora_weights()  # drop anything half-loaded
                lora_error = err
        try:
            common.load_network_override(backbone, ref)
        except UserError as err:
            if kind == "network":
                raise
            raise UserError(f"method '{method['name']}': '{ref}' is not a local path, and from the hub it loads "
                            f"neither as a LoRA ({lora_error}) nor as a network ({err})") from None
        backbone.net.to(device)
    if adapters:  # every LoRA at full strength, as it was trained
        backbone.pipe.set_adapters(adapters, [1.0] * len(adapters))
    return adapters


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()  # a no-op without CUDA

# ---------------------------------------------------------------- generation (README 'Method: evaluation')


def set_generation_precision(pipe, kind, dtype, device):
    """The public protocol's precision; returns the context to sample in. SD-1.5: all in `dtype`. SD-3.5-M:
    the VAE in fp32 (16-channel latents can overflow fp16), sampling under autocast to `dtype`. CPU: fp32."""
    if device.type != "cuda" or kind != "sd3":
        return contextlib.nullcontext()
    pipe.vae.to(torch.float32)
    return torch.autocast("cuda", dtype=dtype)


def image_relpath(method, seed, index):
    return f"{method}/seed_{seed}/{index:05d}.png"


def generate_images(pipe, prompts, todo, out_dir, method, steps, guidance, resolution, batch_size, device, progress):
    """The (seed, index) items of `todo` as PNGs, each image from its own generator seeded with its seed on
    the device, as the public protocol re-seeds per prompt: an image does not depend on its batch."""
    for start in tqdm(range(0, len(todo), batch_size), desc=f"generating {method}", disable=not progress):
        batch = todo[start : start + batch_size]
        images = pipe(prompt=[prompts[index] for _, index in batch], height=resolution, width=resolution,
                      num_inference_steps=steps, guidance_scale=guidance, output_type="pil",
                      generator=[torch.Generator(device=device).manual_seed(seed) for seed, _ in batch]).images
        for (seed, index), image in zip(batch, images):
            common.atomic_save_image(image, out_dir / image_relpath(method, seed, index))


def generate_missing_images(args, methods, prompts, items, out_dir, state):
    """Each method's missing images of the (seed, prompt index) `items` (a list, or {name: list}), for the main command
    and `userstudy` alike. A method folder's images come from one set of settings (NAME/generation.json), its models
    counted by content: a moved folder keeps its images, a retrained one gets new ones. Returns manifest, settings."""
    main_process, device = state.is_main_process, state.device
    if main_process:
        common.lock_output_dir(out_dir, "evaluate.py")
    check_prompts(out_dir, prompts, write=main_process)
    # The base pipeline, once, in the public protocol's dtypes (GPU: --generation_dtype; CPU: fp32). The
    # public evaluation disables the safety checker: a blacked-out image would be scored as the model's.
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.generation_dtype] if device.type == "cuda" \
        else torch.float32
    pipe = common.load_pipeline(args.pretrained_model, dtype=dtype)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    backbone = common.Backbone(pipe.to(device), device, dtype)
    common.check_resolution(backbone, args.resolution)
    base_net, autocast = backbone.net, set_generation_precision(pipe, backbone.kind, dtype, device)
    steps, guidance = SAMPLING_DEFAULTS[backbone.kind]
    steps = args.num_inference_steps or steps
    guidance = guidance if args.guidance_scale is None else args.guidance_scale
    settings = {"backbone": backbone.kind, "num_inference_steps": steps, "guidance_scale": guidance,
                "resolution": args.resolution, "dtype": str(dtype).removeprefix("torch.")}
    hashes = common.FileHashes.beside(out_dir)

    def models_of(method):  # the paths (shown) and a digest of the files (compared; None while not downloaded)
        parts = [common.fingerprint(ref, hashes) for ref in [args.pretrained_model, *(r for _, r in method["parts"])]]
        hashes.save()
        return {"pretrained_model": args.pretrained_model, "spec": method["spec"], "model_content": None if any(
            "not downloaded" in (part or {}).values() for part in parts) else common.digest_of(parts)}

    manifest = []
    for method in methods:
        name, record = method["name"], out_dir / method["name"] / "generation.json"
        method_items, models = items[name] if isinstance(items, dict) else items, models_of(method)
        common.check_same_settings(record, settings, f"{out_dir / name}")
        recorded = None
        with contextlib.suppress(OSError, ValueError):
            recorded = json.loads(record.read_text()).get("model_content")
        content = models["model_content"] or recorded  # None: a hub model not downloaded yet, so unknown
        if main_process:
            if recorded is not None and recorded != content:
                stale = sorted((out_dir / name).glob("seed_*/*.png"))
                logger.info("%s: its model changed since its %d images were made: they are made again", name,
                            len(stale))
                for image in stale:
                    image.unlink()
            write_json(record, {**settings, **models, "model_content": content})
        state.wait_for_everyone()  # stale images are deleted before anyone lists what is missing
        manifest += [{"image": image_relpath(name, s, i), "method": name, "seed": s, "index": i,
                      "prompt": prompts[i]} for s, i in method_items]
        # every process lists the missing images before any starts writing, so all split the same list
        todo = [(s, i) for s, i in method_items if not (out_dir / image_relpath(name, s, i)).is_file()]
        if not todo:
            logger.info("%s: all %d images exist in %s", name, len(method_items), out_dir)
            continue
        if main_process:  # a score belongs to the image it was computed on
            rewrite_scores(out_dir, drop={image_relpath(name, s, i) for s, i in todo})
        state.wait_for_everyone()
        logger.info("%s: generating %d of %d images (%d steps, guidance %s)", name, len(todo), len(method_items),
                    steps, guidance)
        adapters = apply_method(backbone, method, device)
        if main_process and models["model_content"] is None:  # a hub model just downloaded: its revision
            write_json(record, {**settings, **models_of(method)})
        try:
            with state.split_between_processes(todo) as mine, autocast:
                generate_images(pipe, prompts, mine, out_dir, name, steps, guidance, args.resolution,
                                args.batch_size, device, main_process)
        finally:  # the base pipeline back
            if adapters:
                pipe.unload_lora_weights()
            if backbone.net is not base_net:
                setattr(pipe, backbone.net_name, base_net)
                backbone.net = base_net
                free_memory()
        state.wait_for_everyone()
    del pipe, backbone, base_net
    free_memory()
    return manifest, {"pretrained_model": args.pretrained_model, **settings}

# ---------------------------------------------------------------- the per-image score table
# scores.jsonl: one line {"image", "metric", "value"} per scored image; null: the scorer gave no score (an unparseable
# UnifiedReward answer), counted as missing, never as 0. Appended after every batch (a killed run loses one at most);
# several processes each write scores.part-RANK.jsonl, which the main process folds into scores.jsonl.


def read_score_table(out_dir):
    """{(image, metric): record}; a later line wins, a truncated last line (killed run) is ignored."""
    table = {}
    for path in [out_dir / SCORES] + sorted(out_dir.glob("scores.part-*.jsonl")):
        for line in (path.read_text(encoding="utf-8").splitlines() if path.is_file() else []):
            with contextlib.suppress(ValueError, KeyError, TypeError):  # a record without a value is skipped too
                record = json.loads(line)
                table[(record["image"], record["metric"])] = record | {"value": record["value"]}
    return table


def rewrite_scores(out_dir, drop=frozenset()):
    """Fold the part files into scores.jsonl and forget the scores of `drop` (images about to be made again)."""
    parts, table = sorted(out_dir.glob("scores.part-*.jsonl")), read_score_table(out_dir)
    if parts or any(image in drop for image, _ in table):
        kept = (record for (image, _), record in table.items() if image not in drop)
        common.atomic_write_text(out_dir / SCORES, "".join(json.dumps(record) + "\n" for record in kept))
        for part in parts:
            part.unlink()

# ---------------------------------------------------------------- scorers (README 'Method: evaluation')
# Each loads in __init__(args, device) and maps `__call__(images, prompts)` to one float per image, or None
# where it gives no score; a scorer whose package or weights are missing raises ScorerUnavailable, which
# says what to do, and its metric is "not run".


class ScorerUnavailable(Exception):
    """A scorer's package or weights are missing; the message says what to do."""


def loaded(what, load, hint=""):
    """load(), or ScorerUnavailable naming what did not load."""
    try:
        return load()
    except Exception as err:
        raise ScorerUnavailable(f"could not load {what} ({common.first_line(err)}){hint}") from None


def gpu_half(device):
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


_CLIP_MODELS = {}  # one copy of each CLIP: PickScore serves 'pickscore' and 'sgp', ViT-L/14 'clip' and 'aesthetic'


def clip_model(model, processor, device, flags):
    """common.PickScorer (a transformers CLIP and processor, fp32 on GPU too, as the public scorers), loaded once."""
    try:
        if (model, processor, str(device)) not in _CLIP_MODELS:
            _CLIP_MODELS[(model, processor, str(device))] = common.PickScorer(model, processor, device=device)
    except UserError as err:
        raise ScorerUnavailable(f"{err}; download them or pass {flags}") from None
    return _CLIP_MODELS[(model, processor, str(device))]


class PickScoreMetric:
    """Raw PickScore (yuvalkirstain/PickScore_v1), exp(logit_scale) * cosine: about 20-23, never /26."""

    def __init__(self, args, device):
        self.scorer = clip_model(args.pickscore_model, args.pickscore_processor, device,
                                 "--pickscore_model/--pickscore_processor")
        self.prefixes = args.sgp_real_prefix, args.sgp_cg_prefix

    def __call__(self, images, prompts):
        return [float(v) for v in self.scorer(images, prompts, batch_size=len(images))]


class RealismMetric(PickScoreMetric):
    """'SGP-PickScore' realism (paper Fig. 2): PickScore with "Realistic photo, " minus with "CG render, " prefixed."""

    def __call__(self, images, prompts):
        real, cg = (self.scorer(images, [x + p for p in prompts], batch_size=len(images)) for x in self.prefixes)
        return [float(v) for v in real - cg]


class ClipScoreMetric(PickScoreMetric):
    """CLIP score = 100 * max(cosine(image, text), 0), text cut at 77 tokens (openai/clip-vit-large-patch14; the
    usual CLIPScore scale, not in the paper's tables): PickScore's computation without CLIP's own logit scale."""

    def __init__(self, args, device):
        self.scorer = clip_model(args.clip_model, args.clip_model, device, "--clip_model")

    def __call__(self, images, prompts):
        cosine = np.array(super().__call__(images, prompts)) / float(self.scorer.model.logit_scale.exp())
        return [float(v) for v in 100 * cosine.clip(min=0)]


class AestheticMetric:
    """LAION aesthetic score (christophschuhmann/improved-aesthetic-predictor, about 5-6): its MLP head on the
    L2-normalised CLIP ViT-L/14 image embedding, Linear 768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropout between the first
    four, no activation; layer indices as the released keys (layers.0/2/4/6/7), sizes as the file's."""

    def __init__(self, args, device):
        weights, options = args.aesthetic_weights, dict(map_location="cpu", weights_only=True)

        def load():  # a URL is downloaded once, into --cache_dir/weights
            state = torch.hub.load_state_dict_from_url(weights, str(Path(args.cache_dir) / "weights"), progress=False,
                                                       **options) if re.match(r"https?://", weights) else \
                torch.load(weights, **options)
            shapes = {i: state[f"layers.{i}.weight"].shape for i in (0, 2, 4, 6, 7)}
            layers = [torch.nn.Linear(*shapes[i][::-1]) if i in shapes else torch.nn.Dropout(0.0) for i in range(8)]
            mlp = torch.nn.ModuleDict({"layers": torch.nn.Sequential(*layers)})
            mlp.load_state_dict(state)
            return mlp.to(device).eval()
        self.mlp = loaded(f"the aesthetic MLP {weights}", load, "; download it and pass --aesthetic_weights FILE, the "
                                                                "sac+logos+ava1-l14-linearMSE.pth state dict")
        self.clip = clip_model(args.aesthetic_clip_model, args.aesthetic_clip_model, device, "--aesthetic_clip_model")
        takes, gives = self.mlp["layers"][0].in_features, self.clip.model.config.projection_dim
        if takes != gives:
            raise ScorerUnavailable(f"the aesthetic MLP takes {takes}-d embeddings but {args.aesthetic_clip_model} "
                                    f"gives {gives}-d (use CLIP ViT-L/14)")

    def __call__(self, images, prompts):
        pixels = self.clip.processor(images=images, return_tensors="pt")["pixel_values"]
        output = self.clip.model.get_image_features(pixel_values=pixels.to(self.clip.device, self.clip.model.dtype))
        # transformers 5 returns a model output from get_image_features, older ones a tensor
        embedding = torch.nn.functional.normalize(getattr(output, "pooler_output", output).float(), dim=-1)
        return [float(v) for v in self.mlp["layers"](embedding).squeeze(-1)]


def rgb_to_gray(image):
    """Grayscale of an 8-bit RGB image exactly as OpenCV's cv2.cvtColor(.., COLOR_RGB2GRAY) on uint8 (BT.601
    luma in 15-bit fixed point, rounded; OpenCV is not a dependency): (9798 R + 19235 G + 3735 B + 16384) >> 15."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    return (rgb[..., 0] * 9798 + rgb[..., 1] * 19235 + rgb[..., 2] * 3735 + 16384) >> 15


def laplacian_variance(image):
    """Texture detail (paper Fig. 2), as cv2.Laplacian(gray, cv2.CV_64F).var(): kernel [[0, 1, 0], [1, -4, 1],
    [0, 1, 0]], borders mirrored without the edge pixel (BORDER_REFLECT_101), population variance."""
    gray = rgb_to_gray(image).astype(np.float64)
    p = np.pad(gray, 1, mode="reflect")
    return float((p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * gray).var())


class LaplacianMetric:
    """Texture detail (paper Fig. 2; the authors' detail_vs_realism notebook): laplacian_variance per image."""

    def __init__(self, args, device): pass

    def __call__(self, images, prompts):
        return [laplacian_variance(image) for image in images]


class ImageRewardMetric:
    """ImageReward v1.0 (PyPI image-reward, THUDM/ImageReward)."""

    def __init__(self, args, device):
        try:
            import ImageReward as rm
        except ImportError:
            raise ScorerUnavailable("pip install image-reward (it pins timm 0.6.13 and fairscale; use a separate "
                                    "environment and `evaluate.py score` if that conflicts)") from None
        self.model = loaded("ImageReward-v1.0", lambda: rm.load("ImageReward-v1.0", device=str(device)).eval())

    def __call__(self, images, prompts):
        return [float(self.model.score(prompt, image)) for image, prompt in zip(images, prompts)]


class HPSv3Metric:
    """HPSv3 (PyPI hpsv3, MizzenAI/HPSv3): the mean mu of its (mu, sigma) output. Reads the files itself."""
    wants_paths = True

    def __init__(self, args, device):
        try:
            import hpsv3
        except ImportError:
            raise ScorerUnavailable("pip install hpsv3 (it pins transformers 4.45.2: install it in its own environment "
                                    "and run `python evaluate.py score --images OUT --metrics hpsv3` there)") from None
        self.inferencer = loaded("HPSv3", lambda: hpsv3.HPSv3RewardInferencer(device=str(device)))

    def __call__(self, paths, prompts):
        return [float(r[0]) for r in self.inferencer.reward(prompts=list(prompts), image_paths=list(map(str, paths)))]


class DeQAMetric:
    """DeQA-Score (zhiyuanyou/DeQA-Score-Mix3; image only, 1-5), loaded as the public evaluation loads it:
    the pinned revision's remote code, fp16 on GPU, eager attention, the model's own `score(images)`."""

    def __init__(self, args, device):
        from transformers import AutoModelForCausalLM

        self.model = loaded(args.deqa_model, lambda: AutoModelForCausalLM.from_pretrained(
            args.deqa_model, revision=args.deqa_revision, trust_remote_code=True, attn_implementation="eager",
            dtype=gpu_half(device)).to(device).eval(), "; its remote code targets an older transformers: if that "
            "is the cause, run `evaluate.py score --metrics deqa` with the transformers its model card names")

    def __call__(self, images, prompts):
        return [float(v) for v in torch.as_tensor(self.model.score(images)).float().flatten()]


# OneIG-Benchmark's layout (github.com/OneIG-Bench/OneIG-Benchmark, commit 41b49831e79e6dde5323618c164da1c4cf0f699d):
# the prompts in OneIG-Bench.csv (category,id,prompt_en,type,prompt_length,class), the stylization ones in category
# Anime_Stylization; each id's style in scripts/style/style.csv (,id,class), empty where style_score.py skips it.


def read_csv_columns(path, columns):
    """The rows of a CSV as dicts; a missing file or column is one error naming both."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ScorerUnavailable(f"cannot read {path} ({common.first_line(err)}); needs its column(s) "
                                f"{', '.join(columns)}") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise ScorerUnavailable(f"{path} lacks the column(s) {', '.join(missing)} (has: {', '.join(header)})")
    return rows


class StylizationMetric:
    """Stylization (paper Fig. 2 (b)): OneIG-Bench's style score by its own evaluator, from a clone (--oneig_dir) in its
    environment. Per image, as its style_score.py: the CSD and OneIG style embeddings against the references of the
    prompt's style class (dot product), the mean of the two best matches, each clipped at 0; no class, no score."""
    wants_paths = True  # the style encoders read the files themselves

    def __init__(self, args, device):
        if not args.oneig_dir:
            raise ScorerUnavailable("needs --oneig_dir, a clone of github.com/OneIG-Bench/OneIG-Benchmark with its "
                                    "style models, in OneIG-Bench's environment (README: Metric environments)")
        root = Path(args.oneig_dir).resolve()
        style_dir = root / "scripts" / "style"
        # {prompt: style} of its stylization prompts, the CSV files first (a wrong clone says so at once), the
        # styles named as its style_score.py names them ("Line Art" -> "line_art"), prompts without one left out
        prompts = read_csv_columns(root / "OneIG-Bench.csv", ["category", "id", "prompt_en"])
        style_of_id = {row["id"].strip(): row["class"].strip().lower().replace(" ", "_")
                       for row in read_csv_columns(style_dir / "style.csv", ["id", "class"])
                       if (row["class"] or "").strip() not in ("", "nan")}
        self.style_of = {(row["prompt_en"] or "").strip(): style_of_id[row["id"].strip()] for row in prompts
                         if row["category"] == "Anime_Stylization" and row["id"].strip() in style_of_id}
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))  # its modules import each other as scripts.*

        def load():
            from scripts.utils.inference import CSDStyleEmbedding, SEStyleEmbedding
            return (CSDStyleEmbedding(model_path=str(style_dir / "models" / "checkpoint.pth")),
                    SEStyleEmbedding(pretrained_path="xingpng/OneIG-StyleEncoder"),
                    torch.load(style_dir / "CSD_embed.pt", weights_only=False),
                    torch.load(style_dir / "SE_embed.pt", weights_only=False))
        self.csd, self.se, self.csd_ref, self.se_ref = loaded(f"OneIG-Bench's style evaluator from {root}", load,
                                                              "; install its requirements and models (its README)")

    def __call__(self, paths, prompts):
        scores = []
        for path, style in zip(paths, (self.style_of.get(prompt.strip()) for prompt in prompts)):
            best = [max(float((encoder.get_style_embedding(str(path)) @ ref[style].T).max()), 0.0)
                    for encoder, ref in ((self.csd, self.csd_ref), (self.se, self.se_ref)) if style in ref]
            scores.append(sum(best) / 2 if len(best) == 2 else None)
        return scores


def parse_final_score(answer):
    """A UnifiedReward answer's score or None (missing; the public code scores 0.0), read as the authors' rewards.py
    reads it: case-sensitive, the first match, 1-5 only, so "Final Score: 10" reads as 1, "Final Score: 7" as None."""
    match = re.search(r"Final Score:\s*([1-5](?:\.\d+)?)", answer) if isinstance(answer, str) else None
    return float(match.group(1)) if match else None


class UnifiedRewardMetric:
    """UnifiedReward-qwen-7b point score (CodeGoat24/UnifiedReward-qwen-7b), asked as the public evaluation asks: the
    image, then the question; sides resized to multiples of 28 px (qwen_vl_utils); fp16 on GPU; one image per call."""

    def __init__(self, args, device):
        try:
            from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
        except ImportError:
            raise ScorerUnavailable("needs a transformers with Qwen2.5-VL: pip install -U transformers") from None
        self.question = unifiedreward_question(args)
        self.processor, self.model = loaded(args.unifiedreward_model, lambda: (
            AutoProcessor.from_pretrained(args.unifiedreward_model), Qwen2_5_VLForConditionalGeneration.from_pretrained(
                args.unifiedreward_model, dtype=gpu_half(device)).to(device).eval()))
        self.processor.tokenizer.padding_side = "left"  # only a batch (--vlm_batch_size > 1) is padded
        self.max_new_tokens, self.unparsed = args.unifiedreward_max_new_tokens, 0

    def __call__(self, images, prompts):
        texts = [self.processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": self.question.replace("{prompt}", prompt)}]}],
            tokenize=False, add_generation_prompt=True) for prompt in prompts]
        side = lambda n: max(28, round(n / 28) * 28)
        images = [image.resize((side(image.width), side(image.height))) for image in images]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.model.device)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        answers = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False)
        for answer in (a for a in answers if parse_final_score(a) is None):
            self.unparsed += 1
            if self.unparsed <= 5:  # a few shown; the count goes to the report
                logger.warning("UnifiedReward answer without 'Final Score: x' (counted missing): %r", answer[-300:])
        return [parse_final_score(answer) for answer in answers]


SCORERS = {"pickscore": PickScoreMetric, "imagereward": ImageRewardMetric, "unifiedreward": UnifiedRewardMetric,
           "hpsv3": HPSv3Metric, "deqa": DeQAMetric, "aesthetic": AestheticMetric, "laplacian": LaplacianMetric,
           "sgp": RealismMetric, "stylization": StylizationMetric, "clip": ClipScoreMetric}


def parse_metrics(text):
    metrics = list(dict.fromkeys(m.strip().lower() for m in text.split(",") if m.strip()))
    unknown = [m for m in metrics if m not in SCORERS]
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)}")
    return metrics


def scorer_key(metric, args, hashes):
    """What a metric's scores depend on besides image and prompt (README "Running reliably"): its flags (sgp's
    include PickScore's, the VLMs' their batch size) and what they name (a file, a model folder, a hub revision)."""
    prefixes = {"sgp": ("sgp_", "pickscore_"), "hpsv3": ("vlm_",), "unifiedreward": ("unifiedreward_", "vlm_"),
                "stylization": ("oneig_",)}.get(metric, (metric + "_",))
    values = [v for k, v in sorted(vars(args).items()) if k.startswith(prefixes)]  # a path by content: moved, the same
    return common.digest_of([(common.fingerprint(v, hashes) if isinstance(v, str) else None) or v for v in values])


def score_images(out_dir, manifest, metrics, args, state):
    """Score what lacks a score under this scorer_key, metric by metric, building a scorer only for work; {metric: why}
    not run."""
    table, not_run = read_score_table(out_dir), {}
    target = out_dir / (SCORES if state.num_processes == 1 else f"scores.part-{state.process_index}.jsonl")
    hashes = common.FileHashes.beside(out_dir)
    for metric in metrics:
        key = scorer_key(metric, args, hashes)
        pending = [entry for entry in manifest if table.get((entry["image"], metric), {}).get("scorer") != key]
        if not pending:
            continue
        try:
            scorer = SCORERS[metric](args, state.device)
            key = scorer_key(metric, args, hashes)  # a hub model it just downloaded has a revision now
        except ScorerUnavailable as err:
            not_run[metric] = f"not run: {err}"
            logger.warning("%s: not run: %s", metric, err)
            continue
        logger.info("%s: scoring %d images", metric, len(pending))
        # HPSv3 and UnifiedReward one image at a time by default, as the public evaluation scores them
        size = args.vlm_batch_size if metric in ("hpsv3", "unifiedreward") else args.score_batch_size
        try:
            with state.split_between_processes(pending) as mine, torch.no_grad():
                for start in tqdm(range(0, len(mine), size), desc=f"scoring {metric}",
                                  disable=not state.is_main_process):
                    batch = mine[start : start + size]
                    paths = [out_dir / entry["image"] for entry in batch]
                    images = [open_image(path) for path in paths]  # also checks the files of path-reading scorers
                    values = scorer(paths if getattr(scorer, "wants_paths", False) else images,
                                    [entry["prompt"] for entry in batch])
                    with open(target, "a", encoding="utf-8") as f:
                        f.writelines(json.dumps({"image": entry["image"], "metric": metric, "value": v if v is not None
                                                 and math.isfinite(v) else None, "scorer": key}) + "\n"
                                     for entry, v in zip(batch, values))
                        f.flush()
                        os.fsync(f.fileno())
        except UserError:  # a damaged image: the user's to fix, not the scorer's failure
            raise
        except Exception as err:  # a broken scorer must not lose the others' work
            logger.exception("%s failed", metric)
            not_run[metric] = f"failed: {common.first_line(err)}"
        del scorer
        free_memory()
    _CLIP_MODELS.clear()
    gc.collect()
    hashes.save()
    return not_run

# ---------------------------------------------------------------- aggregation (README 'Method: evaluation')


def aggregate(rows, methods, metrics):
    """Table 1's statistics from rows {method, seed, metric, value (None = missing)}: per (method, metric) the
    mean over prompts per seed (missing excluded), then mean and population std of those per-seed means."""
    groups, results = {}, {}
    for row in rows:
        groups.setdefault((row["method"], row["metric"]), {}).setdefault(row["seed"], []).append(row["value"])
    for method, metric in [(m, k) for m in methods for k in metrics if (m, k) in groups]:  # no scores: left out
        by_seed = groups[(method, metric)]
        valid = {seed: [v for v in by_seed[seed] if v is not None] for seed in sorted(by_seed)}
        per_seed = {str(seed): float(np.mean(values)) for seed, values in valid.items() if values}
        n, means = sum(map(len, valid.values())), list(per_seed.values())
        results.setdefault(method, {})[metric] = {
            "mean": float(np.mean(means)) if means else None, "std": float(np.std(means)) if means else None,
            "per_seed": per_seed, "n": n, "missing": sum(map(len, by_seed.values())) - n}
    return results


def minmax(values):
    """{key: (v - min) / (max - min)} (0 when all are equal), as the authors' notebooks normalise Fig. 2."""
    lo, hi = min(values.values()), max(values.values())
    return {k: (v - lo) / (hi - lo) if hi > lo else 0.0 for k, v in values.items()}


def human_preference(results, methods):
    """Fig. 2's ½·minmax(UnifiedReward) + ½·minmax(HPSv3) across `methods`; None unless all have both."""
    means = [{m: results.get(m, {}).get(k, {}).get("mean") for m in methods} for k in ("unifiedreward", "hpsv3")]
    if any(v is None for values in means for v in values.values()):
        return None
    unifiedreward, hpsv3 = map(minmax, means)
    return {m: 0.5 * unifiedreward[m] + 0.5 * hpsv3[m] for m in methods}


def stylization_means(results, methods, other_results=None):
    """Fig. 2 (b)'s stylization per method, from this folder or another one's results.json (the paper scores it
    on OneIG-Bench's style prompts, human preference on DrawBench: matched by method name); None if any lacks."""
    if other_results:
        try:
            results = json.loads(Path(other_results).read_text())["results"]
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"--stylization_results {other_results}: not an evaluate.py results.json "
                            f"({common.first_line(err)})") from None
    values = {m: results.get(m, {}).get("stylization", {}).get("mean") for m in methods}
    return None if any(v is None for v in values.values()) else values


def paper_values(report):
    """{method: {metric: value}} of the paper for this report's rows it reports (the full named prompt set)."""
    table = PAPER_RESULTS.get((report.get("backbone"), report.get("prompts")))
    if table is None or report.get("n_prompts") != AUTHORS_PROMPT_FILES.get(report.get("prompts"), (0, None))[1]:
        return {}
    rows = {m["name"]: table.get(PAPER_ROW_ALIASES.get(m["name"], m["name"])) for m in report["methods"]}
    return {name: row for name, row in rows.items() if row}


def figure2_points(report):
    """Paper Fig. 2's points as the authors' notebooks normalise them, {panel: {"ours" | "paper": {method: (x, y)},
    "over" | "paper_over": methods}}: ours over this report's rows, the paper's over its six (ours move none)."""
    methods = [m["name"] for m in report["methods"]]
    mean = lambda m, metric: report["results"].get(m, {}).get(metric, {}).get("mean")
    points = {}
    if all(mean(m, k) is not None for m in methods for k in ("laplacian", "sgp")):
        x, y = minmax({m: mean(m, "sgp") for m in methods}), minmax({m: mean(m, "laplacian") for m in methods})
        points["a"] = {"ours": {m: (x[m], y[m]) for m in methods}, "over": methods}
    if report.get("human_preference") and report.get("stylization"):
        points["b"] = {"ours": {m: (report["human_preference"][m], report["stylization"][m]) for m in methods},
                       "over": methods}
    paper = paper_values(report)
    for panel, table in PAPER_FIGURE2.items():
        if panel not in points or (report.get("backbone"), report.get("prompts")) != table:
            continue
        rows, six = PAPER_RESULTS[table], list(PAPER_RESULTS[table])
        if panel == "a":
            x, y = minmax({m: rows[m]["sgp"] for m in six}), minmax({m: rows[m]["laplacian"] for m in six})
        else:
            x = human_preference({m: {k: {"mean": rows[m][k]} for k in ("unifiedreward", "hpsv3")} for m in six}, six)
            y = {m: rows[m]["stylization"] for m in six}
        ours = {m: PAPER_ROW_ALIASES.get(m, m) for m in methods if m in paper}
        points[panel].update(paper={m: (x[p], y[p]) for m, p in ours.items() if p in six}, paper_over=six)
    return points

# ---------------------------------------------------------------- the report: results.md/json, figure2.png, grid.png


def _rank_marks(values, spreads, higher_is_better):
    """{index: "best" | "second"}, each only to a method ahead of the next by more than one std over seeds (the
    larger): a lead within the spread or a tie is nobody's best, and nothing is second to an unmarked best."""
    order = sorted((i for i, v in enumerate(values) if v is not None), key=values.__getitem__, reverse=higher_is_better)
    marks = {}
    for i, after, label in zip(order, order[1:] + [None], ("best", "second")):
        if after is not None and abs(values[i] - values[after]) <= max(spreads[i] or 0.0, spreads[after] or 0.0):
            break
        marks[i] = label
    return marks


def markdown_table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def results_markdown(report):
    """Table 1: mean ± std over seeds (one seed: the mean), the gain over the first row in %, the paper's value and our
    difference where it has one; per column the best bold, the second underlined (at the shown precision)."""
    methods, metrics, results = [m["name"] for m in report["methods"]], report["metrics"], report["results"]
    baseline, paper = methods[0], paper_values(report)
    entry = lambda method, metric: results.get(method, {}).get(metric) or {}
    lines = [f"# {report.get('title', 'Evaluation')}", ""]
    if report.get("note"):  # e.g. the smoke run's: tiny random models
        lines += [f"**{report['note']}**", ""]
    cells = {m: [] for m in methods}
    for metric in metrics:
        decimals = METRIC_DECIMALS.get(metric, 2)
        means = [entry(m, metric).get("mean") for m in methods]
        marks = _rank_marks([None if v is None else round(v, decimals) for v in means],
                            [entry(m, metric).get("std") for m in methods], HIGHER_IS_BETTER.get(metric, True))
        for i, (method, mean) in enumerate(zip(methods, means)):
            reference = paper.get(method, {}).get(metric)
            cited = "" if reference is None else f" · paper {reference:.{decimals}f}"
            if mean is None:
                cells[method].append("—" + cited)
                continue
            text = f"{mean:.{decimals}f}"
            if len(entry(method, metric).get("per_seed") or {}) != 1:  # one seed has no spread to show
                text += f" ± {entry(method, metric)['std']:.{decimals}f}"
            text = {"best": f"**{text}**", "second": f"<u>{text}</u>"}.get(marks.get(i), text)
            if method != baseline and means[0] not in (None, 0):  # + 0.0: no -0.0
                text += f" ({round(100 * (mean - means[0]) / abs(means[0]), 1) + 0.0:+.1f}%)"
            if reference is not None:
                text += f"{cited} (Δ {round(mean - reference, decimals) + 0.0:+.{decimals}f})"
            cells[method].append(text)
    lines += markdown_table(["Method"] + [METRIC_TITLES.get(m, m) for m in metrics], [[m] + cells[m] for m in methods])
    seeds, lower = report.get("seeds", []), [m for m in metrics if not HIGHER_IS_BETTER.get(m, True)]
    lines += ["", f"Mean over {report.get('n_prompts', '?')} prompts per seed, then mean ± std (population) over "
                  f"{len(seeds)} seed{'' if len(seeds) == 1 else 's'} ({', '.join(map(str, seeds))}). Relative gains "
                  f"are over the first row ({baseline}). **Bold**: best, <u>underlined</u>: second best, each only "
                  "when ahead of the next row by more than one std over seeds (a tie is neither). "
                  + (f"Lower is better for: {', '.join(lower)}." if lower else "All metrics are higher-is-better.")]
    if paper:
        lines += ["", f"'paper': the value of paper Table 1 / Fig. 2 (a) for {report.get('backbone')} on "
                      f"{report.get('prompts')}; Δ = ours − paper."]
    missing = [f"- {method} / {metric}: {entry(method, metric)['missing']}" for method in methods for metric in metrics
               if entry(method, metric).get("missing")]
    if missing:
        lines += ["", "Missing scores (excluded from the means, e.g. unparseable UnifiedReward answers):", *missing]
    if "unifiedreward" in metrics:
        unparsed = sum(entry(m, "unifiedreward").get("missing", 0) for m in methods)
        total = unparsed + sum(entry(m, "unifiedreward").get("n", 0) for m in methods)
        lines += ["", f"UnifiedReward question: {report.get('unifiedreward_question', 'not recorded')}. "
                      f"Unparsed answers (no 'Final Score: x'): {unparsed} of {total}, left out of the means "
                      "(the public code counts them as 0.0)."]
    if report.get("human_preference"):
        lines += ["", "Human preference (½·minmax UnifiedReward + ½·minmax HPSv3, min-max over this table's rows; "
                      "Fig. 2 (b)): " + ", ".join(f"{m} {v:.3f}" for m, v in report["human_preference"].items())]
    panel_a = figure2_points(report).get("a")
    if panel_a:
        lines += ["", "Fig. 2 (a) in figure2.png: x = realism (SGP), y = texture detail, each min-max normalised over "
                      "this table's rows (raw values above)" + ("; the paper's points over its six methods."
                                                                if panel_a.get("paper") else ".")]
    if report.get("not_run"):
        lines += ["", "Metrics not computed:"] + [f"- {m}: {reason}" for m, reason in report["not_run"].items()]
    lines += ["", "Methods:"] + [f"- {m['name']}: {m['spec'] or '(base model)'}" for m in report["methods"]]
    return "\n".join(lines) + "\n"


def draw_figure2(report, path):
    """Paper Fig. 2 (figure2_points), ours filled, the paper's hollow; a panel lacking data says why. False if none."""
    from matplotlib import colormaps
    points = figure2_points(report)
    if not points:
        return False
    methods, colours = [m["name"] for m in report["methods"]], colormaps["tab10"].colors
    figure = common.new_figure(11, 5)
    panels = {"a": ("(a) Texture detail vs realism", "Realism (SGP-PickScore), min-max",  # paper Fig. 2's axes
                    "Texture Detail (Laplacian variance), min-max"),
              "b": ("(b) Human preference vs stylization",
                    "Human Preference (½ minmax HPSv3 + ½ minmax UnifiedReward)",
                    "Stylization (OneIG-Bench style score)")}
    for ax, (panel, (title, xlabel, ylabel)) in zip(figure.subplots(1, 2), panels.items()):
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if panel not in points:
            why = ["the laplacian and sgp metrics"] if panel == "a" else [w for w, key in (
                ("unifiedreward and hpsv3 (human preference)", "human_preference"),
                ("stylization: OneIG-Bench's style score on its style\nprompts, in its own environment "
                 "(--metrics stylization\n--oneig_dir, or --stylization_results)", "stylization"))
                if not report.get(key)]
            ax.axis("off")
            ax.text(0.5, 0.5, "not drawn: needs\n" + "\n".join("• " + w for w in why), ha="center", va="center",
                    fontsize=9)
            continue
        drawn = points[panel]
        for m, colour in zip(methods, colours * len(methods)):
            ax.scatter(*drawn["ours"][m], color=colour, s=60, label=m, zorder=3)
            if m in drawn.get("paper", {}):
                ax.scatter(*drawn["paper"][m], facecolors="none", edgecolors=colour, s=90, linewidths=1.5,
                           label=f"{m} (paper)", zorder=3)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title_fontsize=7, title="filled: this run, hollow: the paper,\neach normalised over "
                  "its own methods" if drawn.get("paper") else None)
        over = f"min-max over this run's rows: {', '.join(drawn['over'])}"
        if drawn.get("paper"):
            over += f"\nthe paper's points: min-max over its methods: {', '.join(drawn['paper_over'])}"
        ax.text(0.5, -0.16, over, transform=ax.transAxes, ha="center", va="top", fontsize=7)
    common.save_figure(figure, path)
    return True


def draw_grid(out_dir, manifest, methods, num_prompts, path):
    """The first prompts at the first seed as the paper's qualitative panels (Figs. 6-7), a column per method."""
    if not manifest:
        return False
    seed, prompts = manifest[0]["seed"], {e["index"]: e["prompt"] for e in manifest}
    indices = sorted(prompts)[:num_prompts]
    by_key = {(e["method"], e["seed"], e["index"]): out_dir / e["image"] for e in manifest}
    tiles = [[by_key.get((m, seed, i)) for m in methods] for i in indices]
    if not any(p is not None and p.is_file() for row in tiles for p in row):
        return False
    tile, text_width = 2.4, 2.6  # inches; at 100 dpi a tile is 240 px, tiny test images are enlarged
    figure = common.new_figure(text_width + tile * len(methods), 0.5 + tile * len(indices))
    axes = figure.subplots(len(indices), len(methods) + 1, squeeze=False,
                           gridspec_kw={"width_ratios": [text_width] + [tile] * len(methods)})
    for row, index in enumerate(indices):
        axes[row][0].axis("off")
        axes[row][0].text(0.97, 0.5, common.wrap_text(prompts[index], 30, max_lines=9), ha="right", va="center",
                          fontsize=9, transform=axes[row][0].transAxes)  # cut, not drawn over the next row
        for ax, method, tile_path in zip(axes[row][1:], methods, tiles[row]):
            ax.set(xticks=[], yticks=[])
            ax.set_title(method if row == 0 else "", fontsize=11)
            if tile_path is not None and tile_path.is_file():
                image = open_image(tile_path)
                ax.imshow(np.asarray(image), interpolation="nearest" if image.width < 128 else "antialiased")
            else:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
    figure.suptitle(f"seed {seed}", fontsize=10)
    common.save_figure(figure, path)
    return True


def write_report(out_dir, run_info, manifest, metrics, grid_prompts):
    """results.json, results.md, figure2.png and grid.png from the score table; returns the paths."""
    methods, table = [m["name"] for m in run_info["methods"]], read_score_table(out_dir)
    rows = [{"method": e["method"], "seed": e["seed"], "index": e["index"], "metric": metric,
             "value": table[(e["image"], metric)]["value"]} for e in manifest for metric in ALL_METRICS
            if (e["image"], metric) in table]
    scored, not_run = {row["metric"] for row in rows}, run_info.get("not_run", {})
    # columns: this run's metrics, earlier ones still waiting to be computed, and every one scored earlier (e.g.
    # by `evaluate.py score` in another environment), in Table 1's order
    metrics = [m for m in ALL_METRICS if m in scored or m in metrics or m in not_run]
    results = aggregate(rows, methods, metrics)
    report = {**run_info, "title": run_info.get("title", "Evaluation"), "metrics": metrics,
              "higher_is_better": {m: HIGHER_IS_BETTER[m] for m in metrics}, "results": results,
              "human_preference": human_preference(results, methods),
              "stylization": stylization_means(results, methods, run_info.get("stylization_results")),
              # a failure is always shown; "not run" only while the metric has no scores
              "not_run": {m: r for m, r in not_run.items()
                          if m in metrics and (m not in scored or r.startswith("failed"))}}
    write_json(out_dir / "results.json", report)
    common.atomic_write_text(out_dir / "results.md", results_markdown(report))
    figure2 = draw_figure2(report, out_dir / "figure2.png")
    grid = draw_grid(out_dir, manifest, methods, grid_prompts, out_dir / "grid.png")
    if not figure2:
        logger.info("figure2.png not drawn: (a) needs laplacian and sgp, (b) unifiedreward, hpsv3 and stylization")
    return [out_dir / n for n, made in (("results.md", True), ("figure2.png", figure2), ("grid.png", grid)) if made]

# ---------------------------------------------------------------- the two commands: generate and score


def make_state():
    """The process group of `accelerate launch` / torchrun (without a GPU, only when asked for CPU)."""
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


def main(argv=None):
    args = parse_args(argv)
    command = {"score": score_main, "userstudy": userstudy_main, "userstudy-tally": userstudy_tally_main}
    if args.command in command:
        return command[args.command](args)
    # 1. every input checked before any heavy work
    metrics, methods = parse_metrics(args.metrics), parse_methods(args.method)
    state, out_dir = make_state(), Path(args.output_dir)
    with state.main_process_first():  # only the main process downloads a prompt set
        prompts = load_prompts(args.prompts, args.cache_dir, args.max_prompts, args.prompt_source)
    common.log_world_size(state.num_processes, "evaluate", state.is_main_process)
    logger.info("%d prompts x %d seeds x %d methods on %d process(es)", len(prompts), len(args.seeds),
                len(methods), state.num_processes)
    # 2. generate what is missing, one method at a time
    items = [(seed, index) for seed in args.seeds for index in range(len(prompts))]
    manifest, generation = generate_missing_images(args, methods, prompts, items, out_dir, state)
    previous = json.loads((out_dir / RUN_INFO).read_text()) if (out_dir / RUN_INFO).is_file() else {}
    run_info = {
        "title": f"{Path(args.pretrained_model).name}, {Path(args.prompts).name}",
        "methods": [{"name": m["name"], "spec": m["spec"]} for m in methods],
        "prompts": args.prompts, "prompt_source": args.prompt_source if args.prompts in PROMPT_SETS else "file",
        "backbone": generation["backbone"], "n_prompts": len(prompts), "seeds": list(args.seeds),
        "generation": {**{k: v for k, v in generation.items() if k != "backbone"}, "device": state.device.type},
        # what an earlier run recorded about its scores stays true of them
        **{k: previous[k] for k in ("unifiedreward_question", "stylization_results", "note") if k in previous}}
    # 3. score, then the report
    finish(out_dir, run_info, manifest, metrics, args, state)


def score_main(args):
    """`evaluate.py score`: score an existing folder and refresh its report. A NAME/seed_S/00000.png folder another
    tool wrote gets a manifest first: prompts[i] is image i's prompt, the --baseline folder first."""
    metrics, out_dir = parse_metrics(args.metrics), Path(args.images)
    if not out_dir.is_dir():
        raise UserError(f"--images {out_dir} is not a folder")
    state, manifest, run_info = make_state(), [], {}
    if (out_dir / MANIFEST).is_file():
        lines = (out_dir / MANIFEST).read_text(encoding="utf-8").splitlines()
        manifest = [json.loads(line) for line in lines if line.strip()]
        run_info = json.loads((out_dir / RUN_INFO).read_text()) if (out_dir / RUN_INFO).is_file() else {}
    elif args.prompts is None:
        raise UserError(f"{out_dir} has no {MANIFEST}: pass --prompts (the prompts its images were made from)")
    else:
        prompts = load_prompts(args.prompts, args.cache_dir, source=args.prompt_source)
        names = sorted(p.name for p in out_dir.iterdir() if p.is_dir() and any(p.glob("seed_*/*.png")))
        if not names:
            raise UserError(f"{out_dir} has no NAME/seed_S/00000.png images")
        if args.baseline is not None and args.baseline not in names:
            raise UserError(f"--baseline {args.baseline} is not a method folder of {out_dir} ({', '.join(names)})")
        for name in sorted(names, key=lambda n: n != args.baseline):  # the baseline first
            for image in sorted((out_dir / name).glob("seed_*/*.png")):
                seed, index = int(image.parent.name.split("_", 1)[1]), int(image.stem)
                if index >= len(prompts):
                    raise UserError(f"{image}: index {index} but only {len(prompts)} prompts")
                manifest.append({"image": image_relpath(name, seed, index), "method": name, "seed": seed,
                                 "index": index, "prompt": prompts[index]})
        run_info = {"title": out_dir.name}
    missing = [e["image"] for e in manifest if not (out_dir / e["image"]).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) of {out_dir / MANIFEST} are missing, e.g. {missing[0]}; "
                        "run the generation first")
    if "methods" not in run_info:
        run_info.update(methods=[{"name": n, "spec": ""} for n in dict.fromkeys(e["method"] for e in manifest)],
                        n_prompts=len({e["index"] for e in manifest}), seeds=sorted({e["seed"] for e in manifest}))
    finish(out_dir, run_info, manifest, metrics, args, state)


def finish(out_dir, run_info, manifest, metrics, args, state):
    """Score what is missing, merge the processes' scores, write the report and log where it is."""
    if args.stylization_results:  # kept for later refreshes of the report
        stylization_means({}, [], args.stylization_results)  # readable? (before any scoring)
        run_info["stylization_results"] = args.stylization_results
    if args.note is not None:
        run_info["note"] = args.note
    if "unifiedreward" in metrics:  # the question sets the scale of the answers: one per folder, named in results.md
        question = f"{args.unifiedreward_question} (user file)" if args.unifiedreward_question else \
            f"the authors' (prompt_template of unifiedreward_score in {common.AUTHORS_REPO}/{AUTHORS_REWARDS_FILE})"
        recorded = run_info.get("unifiedreward_question")
        if recorded and recorded != question:
            raise UserError(f"{out_dir} holds UnifiedReward scores from another question ({recorded}); pass the "
                            "same --unifiedreward_question, or use another output folder")
        with state.main_process_first():  # fetched (or refused) before any scoring, by one process
            unifiedreward_question(args)
        run_info["unifiedreward_question"] = question
    if state.is_main_process:
        common.atomic_write_text(out_dir / MANIFEST, "".join(json.dumps(entry) + "\n" for entry in manifest))
        write_json(out_dir / RUN_INFO, run_info)
    not_run = score_images(out_dir, manifest, metrics, args, state)
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    rewrite_scores(out_dir)  # the processes' part files folded in
    # a metric reported "not run" earlier stays so until it gets scores
    run_info["not_run"] = {**{m: r for m, r in run_info.get("not_run", {}).items() if m not in metrics}, **not_run}
    write_json(out_dir / RUN_INFO, run_info)
    written = write_report(out_dir, run_info, manifest, metrics, args.grid_prompts)
    logger.info("report: %s (and results.json)", ", ".join(map(str, written)))
    failed = {m: r for m, r in not_run.items() if r.startswith("failed")}
    if failed:
        raise SystemExit(f"error: metric(s) failed while scoring: {failed} (the other results were written)")

# ---------------------------------------------------------------- paper Fig. 4: the user study
# `evaluate.py userstudy` writes STUDY_DIR/page/index.html (the blind page, opens from disk), page/images/c017-1.png
# and -2.png (left and right image of comparison c017), and key.json (which method is on which side), kept OUT of
# page/ so that sharing page/ keeps the study blind; `userstudy-tally` writes tally.md, tally.json and figure4.png.

STUDY_CHOICES, OTHER_SIDE = ("left", "tie", "right"), {"left": "right", "right": "left"}
STUDY_QUESTION = ("Which image is better? Judge the overall quality: how realistic and detailed it looks, the "
                  "absence of artifacts, and how well it matches the text.")

# The page: plain HTML and JavaScript, no library, so it opens from disk (file://) in any browser. __STUDY__ becomes
# the page's data: the study id, the question, and per comparison its id, prompt and two image files (key.json's
# sides; the page mirrors them for about half the participants), never the methods. Each participant sees the pairs
# in an order of their own; answers (keys 1/2/3, Backspace goes back) are kept in localStorage, so a reload resumes.
STUDY_PAGE = r"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Image comparison study</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>
body { font-family: system-ui, sans-serif; margin: 0; background: #f3f3f3; color: #222; }
main { max-width: 1120px; margin: 0 auto; padding: 18px 20px; }  [hidden] { display: none !important; }
#progress { height: 10px; background: #ddd; border-radius: 5px; }  #bar { height: 100%; width: 0; background: #3b7dd8; }
#count, .nav { font-size: 14px; color: #666; margin: 6px 0; }  #prompt { font-size: 19px; font-weight: 600; }
.pair, .choices, .nav { display: flex; gap: 18px; justify-content: center; margin: 12px 0; }  figure { margin: 0; }
/* both images and the buttons fit in the window, whatever its shape; small images stay sharp */
img { width: min(44vw, calc(100vh - 300px), 520px); min-width: 160px; aspect-ratio: 1; object-fit: contain;
      background: #fff; border: 1px solid #ccc; }  img.small { image-rendering: pixelated; }
button { font-size: 16px; padding: 10px 18px; border-radius: 6px; border: 1px solid #999; background: #fff; }
button.chosen { background: #3b7dd8; color: #fff; }  button:disabled { opacity: .4; }
kbd { border: 1px solid #aaa; border-radius: 3px; padding: 0 5px; background: #fff; }
</style></head><body><main>
<section id="intro" hidden><h1>Which image is better?</h1>
  <p>You will see <b class="total"></b> pairs of images, both made from the text shown above them.
    <span class="question"></span></p>
  <p>Answer with the buttons or the keys <kbd>1</kbd> left is better, <kbd>2</kbd> about the same, <kbd>3</kbd>
    right is better; <kbd>Backspace</kbd> goes back. There are no right answers: go with your impression. Your
    progress is kept in this browser, so you can close the page and continue later.</p>
  <p><label>Participant id: <input id="pid" autocomplete="off"></label> <button id="start">Start</button></p></section>
<section id="study" hidden><div id="progress"><div id="bar"></div></div><div id="count"></div>
  <p class="question"></p><p id="prompt"></p>
  <div class="pair"><figure><img id="left" alt="left image"><figcaption>left (1)</figcaption></figure>
    <figure><img id="right" alt="right image"><figcaption>right (3)</figcaption></figure></div>
  <div class="choices"><button data-choice="left"><kbd>1</kbd> Left is better</button>
    <button data-choice="tie"><kbd>2</kbd> About the same</button>
    <button data-choice="right"><kbd>3</kbd> Right is better</button></div>
  <div class="nav"><button id="back">&larr; Back</button><span id="who"></span></div></section>
<section id="done" hidden><h1>Thank you!</h1>
  <p>All <b class="total"></b> comparisons are answered. Save your votes and send the file to the person who runs
    the study.</p>
  <p><button id="download">Save my votes (JSON)</button> <button id="review">&larr; Back to the last pair</button></p>
  <p><button id="restart">Start again as another participant</button></p></section></main>
<script>"use strict";
const STUDY = __STUDY__, STORE = "image-study-" + STUDY.id;  // localStorage key: one study, one participant at a time
const byId = Object.fromEntries(STUDY.comparisons.map(c => [c.id, c])), KEYS = { 1: "left", 2: "tie", 3: "right" };
const $ = id => document.getElementById(id), all = selector => document.querySelectorAll(selector);
let state = JSON.parse(localStorage.getItem(STORE) || "null"), shownAt = 0;
for (const e of all(".total")) e.textContent = STUDY.comparisons.length;
for (const e of all(".question")) e.textContent = STUDY.question;
// Seeded draws (FNV-1a of a text seeds mulberry32) per participant id: each sees the pairs in an order of their own
// (no order effect shared by all), about half see every pair mirrored (the votes say so; the tally swaps back).
function random(text) {
  let a = 2166136261;
  for (const ch of text) a = Math.imul(a ^ ch.codePointAt(0), 16777619);
  return () => { a = (a + 0x6D2B79F5) | 0; let t = Math.imul(a ^ (a >>> 15), 1 | a);
                 t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t; return ((t ^ (t >>> 14)) >>> 0) / 4294967296; };
}
function sidesMirrored(pid) { return random(STUDY.id + "/sides/" + pid)() < 0.5; }
function render() {
  const c = state && byId[state.order[state.pos]], n = STUDY.comparisons.length;
  for (const s of ["intro", "study", "done"]) $(s).hidden = s !== (!state ? "intro" : c ? "study" : "done");
  if (!state) return $("pid").focus();
  const answered = Object.keys(state.answers).length;
  $("bar").style.width = (100 * answered / n) + "%";
  $("count").textContent = answered + " of " + n + " answered";
  document.body.dataset.comparison = c ? c.id : "";  // read by the browser test
  if (!c) return;
  $("prompt").textContent = "\u201c" + c.prompt + "\u201d";
  [$("left").src, $("right").src] = state.mirrored ? [c.right, c.left] : [c.left, c.right];
  $("who").textContent = "participant " + state.participant + " \u00b7 pair " + (state.pos + 1) + " of " + n;
  for (const b of all("[data-choice]")) b.classList.toggle("chosen", state.answers[c.id]?.choice === b.dataset.choice);
  $("back").disabled = state.pos === 0;
  shownAt = performance.now();
  const next = byId[state.order[state.pos + 1]];  // preload the next pair
  if (next) new Image().src = next.left, new Image().src = next.right;
}
function go(pos) { state.pos = pos; localStorage.setItem(STORE, JSON.stringify(state)); render(); }
function start() {  // the participant's own order: a Fisher-Yates shuffle
  const pid = $("pid").value.trim(), draw = random(STUDY.id + "/" + pid), ids = STUDY.comparisons.map(c => c.id);
  if (!pid) return $("pid").focus();
  for (let i = ids.length - 1, j; i > 0; i--) { j = Math.floor(draw() * (i + 1)); [ids[i], ids[j]] = [ids[j], ids[i]]; }
  state = { participant: pid, order: ids, mirrored: sidesMirrored(pid), answers: {} };
  go(0);
}
function choose(choice) {
  state.answers[state.order[state.pos]] = { choice: choice, time_ms: Math.round(performance.now() - shownAt) };
  go(state.pos + 1);
}
function back() { if (state.pos > 0) go(state.pos - 1); }
window.studyVotes = () => ({  // the votes as the tally reads them; also callable from the console
  study: STUDY.id, participant: state.participant, comparisons: state.order.length, mirrored: !!state.mirrored,
  saved_at: new Date().toISOString(), votes: state.order.filter(id => id in state.answers).map(id => ({
    comparison: id, choice: state.answers[id].choice, time_ms: state.answers[id].time_ms })) });
$("download").onclick = () => Object.assign(document.createElement("a"), {
  href: URL.createObjectURL(new Blob([JSON.stringify(studyVotes(), null, 1)], { type: "application/json" })),
  download: "votes-" + state.participant.replace(/[^A-Za-z0-9._-]+/g, "_") + ".json" }).click();
for (const img of [$("left"), $("right")]) img.onload = () => img.classList.toggle("small", img.naturalWidth < 128);
for (const b of all("[data-choice]")) b.onclick = () => choose(b.dataset.choice);
$("start").onclick = start; $("back").onclick = $("review").onclick = back;
$("restart").onclick = () => {  // the answers kept in this browser are cleared
  if (!confirm("Start again as another participant? Save your votes first: the answers kept here are cleared.")) return;
  localStorage.removeItem(STORE); state = null; $("pid").value = ""; render();
};
document.addEventListener("keydown", event => {  // keys only act in the section they belong to
  if (!$("intro").hidden && event.key === "Enter") start();
  if ($("study").hidden || !(event.key in KEYS || event.key === "Backspace")) return;
  event.preventDefault();
  event.key in KEYS ? choose(KEYS[event.key]) : back();
});
render();</script></body></html>
"""


def sample_study(prompts, methods, num_prompts, seed, image_seeds):
    """num_prompts prompts, each compared once with every baseline (one seeded generator). Blind: a prompt's
    comparisons each use another image seed; ids after a shuffle. Balanced: per baseline, ours left in half (±1)."""
    if num_prompts < 1 or num_prompts > len(prompts):
        raise UserError(f"--num_prompts {num_prompts}: the prompt set has {len(prompts)} prompts")
    baselines = [m["name"] for m in methods[1:]]
    if len(set(image_seeds)) < len(baselines):
        raise UserError(f"--image_seeds: {len(baselines)} baselines need {len(baselines)} different seeds (one per "
                        f"comparison of a prompt), got {len(set(image_seeds))}")
    rng = np.random.default_rng(seed)
    indices = sorted(int(i) for i in rng.choice(len(prompts), size=num_prompts, replace=False))
    seeds = {i: [int(s) for s in rng.choice(sorted(set(image_seeds)), size=len(baselines), replace=False)]
             for i in indices}
    # per baseline, exactly floor or ceil of half its comparisons with ours on the left
    left = {b: rng.permutation(np.arange(num_prompts) < (num_prompts + rng.integers(2)) // 2) for b in baselines}
    pairs = [(j, index, k, b) for j, index in enumerate(indices) for k, b in enumerate(baselines)]
    width, comparisons = len(str(len(pairs))), {}
    for number, p in enumerate(rng.permutation(len(pairs))):
        j, index, k, baseline = pairs[p]
        comparisons[f"c{number + 1:0{width}d}"] = {
            "prompt_index": index, "prompt": prompts[index], "ours": methods[0]["name"], "baseline": baseline,
            "image_seed": seeds[index][k], "ours_side": "left" if left[baseline][j] else "right"}
    return indices, comparisons


def userstudy_main(args):
    """`evaluate.py userstudy`: the study folder (page, images, key)."""
    methods = parse_methods(args.method)
    if len(methods) < 2:
        raise UserError("a user study needs --method twice or more: the method under study first, then the "
                        "baseline(s) it is compared with")
    out_dir, state = Path(args.output_dir), make_state()
    study_dir = Path(args.study_dir) if args.study_dir else out_dir / "userstudy"
    with state.main_process_first():  # only the main process downloads a prompt set
        prompts = load_prompts(args.prompts, args.cache_dir)
    indices, comparisons = sample_study(prompts, methods, args.num_prompts, args.seed, args.image_seeds)
    key = {"ours": methods[0]["name"], "baselines": [m["name"] for m in methods[1:]],
           "methods": [{"name": m["name"], "spec": m["spec"]} for m in methods],
           "prompts": args.prompts, "num_prompts": args.num_prompts, "seed": args.seed,
           "evaluation_folder": str(out_dir), "pretrained_model": args.pretrained_model, "comparisons": comparisons}
    # the id ties vote files to this study; a hash, so it names no method
    key = {"study_id": common.digest_of(key)[:12], **key}
    key_path = study_dir / "key.json"
    if key_path.is_file() and json.loads(key_path.read_text())["study_id"] != key["study_id"]:
        raise UserError(f"{study_dir} holds another study (votes collected for it would no longer match its key); "
                        "use another --study_dir")
    # every comparison's images, from the evaluation folder (the missing ones generated there first)
    needed = {m["name"]: sorted({(c["image_seed"], c["prompt_index"]) for c in comparisons.values()
                                 if m["name"] in (c["ours"], c["baseline"])}) for m in methods}
    generate_missing_images(args, methods, prompts, needed, out_dir, state)
    if not state.is_main_process:
        return
    page, page_comparisons = study_dir / "page", []
    for cid, c in comparisons.items():
        sides = {c["ours_side"]: c["ours"], OTHER_SIDE[c["ours_side"]]: c["baseline"]}
        files = {side: f"images/{cid}-{number}.png" for side, number in (("left", 1), ("right", 2))}
        for side, file in files.items():  # re-encoded, not copied: a PNG text chunk could name its maker
            image = open_image(out_dir / image_relpath(sides[side], c["image_seed"], c["prompt_index"]))
            common.atomic_save_image(image, page / file)
        page_comparisons.append({"id": cid, "prompt": c["prompt"], **files})
    page_data = {"id": key["study_id"], "question": args.question, "comparisons": page_comparisons}
    # "</" is escaped so that no prompt can close the <script> element
    common.atomic_write_text(page / "index.html", STUDY_PAGE.replace(
        "__STUDY__", json.dumps(page_data, ensure_ascii=False).replace("</", "<\\/")))
    write_json(key_path, key)
    logger.info("user study %s: %d comparisons (%d prompts x %d baseline(s)) in %s", key["study_id"],
                len(comparisons), len(indices), len(methods) - 1, page)
    print(f"Study page: {page / 'index.html'} (share the folder {page}; keep {key_path} to yourself)\n"
          f"Tally:      python evaluate.py userstudy-tally {study_dir} votes-*.json")


def read_study_votes(paths, key):
    """{participant: (mirrored, {comparison: choice as shown}, file)} from the vote files, checked against the key
    (same study, known comparisons, one file per participant); mirrored: shown the other way round."""
    participants = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"no vote file {path}")
        try:
            data = json.loads(common.read_text(path))
            study, participant, votes, mirrored = data["study"], data["participant"], data["votes"], data["mirrored"]
            if not (isinstance(participant, (str, int)) and isinstance(votes, list) and isinstance(mirrored, bool)
                    and all(isinstance(vote, dict) for vote in votes)):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path} is not a vote file of the study page (a JSON object with study, participant, "
                            "mirrored and votes, a list of {comparison, choice})") from None
        participant, choices = str(participant).strip(), {}
        if study != key["study_id"]:
            raise UserError(f"{path} holds votes of study {study}, not of this one ({key['study_id']})")
        if not participant:
            raise UserError(f"{path} has no participant id")
        if participant in participants:
            raise UserError(f"participant '{participant}' has two vote files: {participants[participant][2]} and "
                            f"{path}")
        for cid, choice in ((vote.get("comparison"), vote.get("choice")) for vote in votes):
            if not isinstance(cid, str) or cid not in key["comparisons"] or choice not in STUDY_CHOICES:
                raise UserError(f"{path}: a vote for comparison {cid!r} with choice {choice!r} does not belong to "
                                f"this study (choices: {', '.join(STUDY_CHOICES)})")
            if choices.setdefault(cid, choice) != choice:
                raise UserError(f"{path}: comparison {cid} is answered twice, '{choices[cid]}' and '{choice}'; "
                                "keep one answer and tally again")
        participants[participant] = mirrored, choices, path
    return participants


def tally_study(key, participants, bootstrap_samples, seed):
    """Win / tie / lose % of 'ours' per baseline, pooled over votes, 95% intervals by a participant-level bootstrap
    (one person's votes are correlated); as a side-bias check, the left image's share of decided votes (about 50%)."""
    names, outcomes = list(participants), ("win", "tie", "lose")
    counts = {b: np.zeros((len(names), 3), dtype=np.int64) for b in key["baselines"]}  # win, tie, lose
    sides = dict.fromkeys(STUDY_CHOICES, 0)
    for p, (mirrored, choices, _) in enumerate(participants.values()):
        for cid, choice in choices.items():
            comparison = key["comparisons"][cid]
            ours_side = OTHER_SIDE[comparison["ours_side"]] if mirrored else comparison["ours_side"]
            counts[comparison["baseline"]][p, 1 if choice == "tie" else 0 if choice == ours_side else 2] += 1
            sides[choice] += 1
    rng, rows = np.random.default_rng(seed), {}
    for baseline, matrix in counts.items():
        total, intervals = int(matrix.sum()), [None] * 3
        if total and len(names) > 1:
            sums = matrix[rng.integers(0, len(names), size=(bootstrap_samples, len(names)))].sum(axis=1)
            n = sums.sum(axis=1)
            intervals = np.percentile(100.0 * sums[n > 0] / n[n > 0, None], [2.5, 97.5], axis=0).T.tolist()
        rows[baseline] = row = {"votes": total, "participants": int((matrix.sum(1) > 0).sum())}
        for j, outcome in enumerate(outcomes):
            row[outcome], row[f"{outcome}_ci95"] = 100.0 * matrix[:, j].sum() / total if total else None, intervals[j]
    decided = sides["left"] + sides["right"]
    return {"study_id": key["study_id"], "ours": key["ours"], "participants": len(names),
            "mirrored_participants": sum(p[0] for p in participants.values()),
            "left_win": 100.0 * sides["left"] / decided if decided else None, "decided_votes": decided,
            "comparisons": len(key["comparisons"]),
            "answered": {name: len(p[1]) for name, p in participants.items()}, "baselines": rows,
            "interval": f"95% participant-level percentile bootstrap, {bootstrap_samples} resamples, seed {seed}"}


def tally_markdown(tally):
    ours = tally["ours"]
    cell = lambda row, outcome: "—" if row[outcome] is None else f"{row[outcome]:.1f}" + (
        " [{:.1f}, {:.1f}]".format(*row[f"{outcome}_ci95"]) if row[f"{outcome}_ci95"] else "")
    lines = [f"# User study: {ours} vs each baseline (paper Fig. 4)", "",
             f"{tally['participants']} participant(s), {tally['comparisons']} comparisons in the study. "
             f"Win = the participant preferred {ours}'s image. Percentages pool all votes; brackets: "
             f"{tally['interval']} (whole participants are resampled: one person's votes are correlated)"
             + ("." if tally["participants"] > 1 else "; none with a single participant."), ""]
    lines += markdown_table([f"{ours} vs", "Win %", "Tie %", "Lose %", "Votes", "Participants"],
                            [[baseline, cell(row, "win"), cell(row, "tie"), cell(row, "lose"), str(row["votes"]),
                              str(row["participants"])] for baseline, row in tally["baselines"].items()])
    if tally["left_win"] is not None:
        lines += ["", f"Side check: the left image won {tally['left_win']:.1f}% of the {tally['decided_votes']} "
                      f"decided votes (about 50% without a side bias); {tally['mirrored_participants']} of "
                      f"{tally['participants']} participant(s) saw the pairs mirrored."]
    partial = [f"{name}: {n}" for name, n in tally["answered"].items() if n < tally["comparisons"]]
    if partial:
        lines += ["", f"Incomplete vote files (answered of {tally['comparisons']}): " + ", ".join(partial)]
    return "\n".join(lines) + "\n"


def draw_figure4(tally, path):
    """Horizontal stacked bars, one per baseline: win | tie | lose, as in the paper's Fig. 4."""
    rows = [(b, r) for b, r in tally["baselines"].items() if r["votes"]]
    if not rows:
        return False
    figure = common.new_figure(7.5, 0.8 + 0.6 * len(rows), dpi=120)
    ax, y, left = figure.subplots(), np.arange(len(rows))[::-1], np.zeros(len(rows))
    colours = {"win": "#3b7dd8", "tie": "#c8c8c8", "lose": "#e58b3a"}
    labels = {"win": f"{tally['ours']} wins", "tie": "tie", "lose": f"{tally['ours']} loses"}
    for outcome in ("win", "tie", "lose"):
        values = np.array([r[outcome] for _, r in rows])
        bars = ax.barh(y, values, left=left, color=colours[outcome], label=labels[outcome], height=0.6)
        ax.bar_label(bars, labels=[f"{v:.0f}%" if v >= 6 else "" for v in values], label_type="center", fontsize=9)
        left += values
    ax.set_yticks(y, [f"{tally['ours']} vs {b}" for b, _ in rows])
    ax.set(xlim=(0, 100), xlabel=f"% of votes ({tally['participants']} participant(s))")
    ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    common.save_figure(figure, path)
    return True


def userstudy_tally_main(args):
    """`evaluate.py userstudy-tally`: tally.json, tally.md and figure4.png."""
    study_dir = Path(args.study_dir)
    if not (study_dir / "key.json").is_file():
        raise UserError(f"{study_dir / 'key.json'} not found: STUDY_DIR is the folder `evaluate.py userstudy` wrote")
    key = json.loads((study_dir / "key.json").read_text())
    tally = tally_study(key, read_study_votes(args.votes, key), args.bootstrap_samples, args.seed)
    write_json(study_dir / "tally.json", tally)
    common.atomic_write_text(study_dir / "tally.md", tally_markdown(tally))
    draw_figure4(tally, study_dir / "figure4.png")
    print(tally_markdown(tally))
    logger.info("wrote %s, %s and %s", study_dir / "tally.md", study_dir / "tally.json", study_dir / "figure4.png")


if __name__ == "__main__":
    common.run_main(main)
