"""Tests of evaluate.py (issue 6, README 'Method: evaluation') on the tiny offline models."""
import json
import logging
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import evaluate

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red apple on a wooden table", "a photo of a dog in the snow", "a city street at night"]


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def lora_dir(tiny_models, work):
    """A LoRA checkpoint as the trainers save it, with nonzero weights."""
    pipe = common.load_pipeline(tiny_models["sd15"])
    backbone = common.Backbone(pipe, "cpu")
    config = common.setup_lora_roles(backbone, ["learner"], rank=4, alpha=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in common.role_parameters(backbone.net, "learner"):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    directory = work / "lora"
    common.save_lora_checkpoint(backbone, common.lora_state_dict(backbone.net, "learner"), config, directory)
    return directory


@pytest.fixture(scope="module")
def aesthetic_weights(work):
    """A small stand-in for sac+logos+ava1-l14-linearMSE.pth: same layer keys,
    input size 16 = the tiny CLIP's embedding size."""
    generator = torch.Generator().manual_seed(1)
    sizes = [16, 1024, 128, 64, 16, 1]
    state = {}
    for index, (fan_in, fan_out) in zip([0, 2, 4, 6, 7], zip(sizes[:-1], sizes[1:])):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) * 0.2
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=generator) * 0.2
    path = work / "aesthetic.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def prompt_file(work):
    path = work / "prompts.txt"
    # blank lines and surrounding spaces are ignored
    path.write_text(PROMPTS[0] + "\n\n  " + PROMPTS[1] + "  \n" + PROMPTS[2] + "\n")
    return path


def scorer_args(tiny_models, aesthetic_weights=None, extra=()):
    clip = tiny_models["clip"]
    argv = ["--pickscore_model", clip, "--pickscore_processor", clip, "--clip_model", clip,
            "--aesthetic_clip_model", clip]
    if aesthetic_weights is not None:
        argv += ["--aesthetic_weights", str(aesthetic_weights)]
    return evaluate.parse_args(argv + list(extra))


def random_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def clip_forward(tiny_models, images, texts):
    """The tiny CLIP's own forward pass: an independent route to the scores."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_models["clip"]).eval()
    processor = CLIPProcessor.from_pretrained(tiny_models["clip"])
    inputs = processor(text=texts, images=images, padding="max_length", truncation=True, max_length=77,
                       return_tensors="pt")
    with torch.no_grad():
        return model, model(**inputs)


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------


def test_pickscore_is_scaled_cosine(tiny_models):
    images = random_images(3)
    scores = evaluate.PickScoreMetric(scorer_args(tiny_models), "cpu")(images, PROMPTS)
    model, out = clip_forward(tiny_models, images, PROMPTS)
    image_embeds = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    expected = (model.logit_scale.exp() * (image_embeds * text_embeds).sum(-1)).detach()
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-4, atol=1e-4)
    # and it is the diagonal of CLIP's own logits (raw units, not /26)
    np.testing.assert_allclose(scores, out.logits_per_image.diagonal().numpy(), rtol=1e-4, atol=1e-4)


def test_sgp_is_difference_of_two_pickscores(tiny_models):
    args = scorer_args(tiny_models)
    assert (args.sgp_real_prefix, args.sgp_cg_prefix) == ("Realistic photo, ", "CG render, ")
    images = random_images(3, seed=1)
    realism = evaluate.RealismMetric(args, "cpu")(images, PROMPTS)
    _, real = clip_forward(tiny_models, images, ["Realistic photo, " + p for p in PROMPTS])
    _, cg = clip_forward(tiny_models, images, ["CG render, " + p for p in PROMPTS])
    expected = real.logits_per_image.diagonal() - cg.logits_per_image.diagonal()
    np.testing.assert_allclose(realism, expected.numpy(), rtol=1e-4, atol=1e-4)
    assert np.abs(realism).max() > 0  # the prefixes do change the score


def test_laplacian_variance_hand_computed():
    # 3x3 gray image, a single bright centre pixel. With mirrored borders the
    # Laplacian is -40 at the centre, +20 at the four edge midpoints and 0 at
    # the corners: mean 40/9, mean of squares 3200/9, variance 27200/81.
    gray = np.zeros((3, 3, 3), dtype=np.uint8)
    gray[1, 1] = 10
    assert evaluate.laplacian_variance(Image.fromarray(gray)) == pytest.approx(27200 / 81)
    assert evaluate.laplacian_variance(Image.new("RGB", (8, 8), (90, 20, 200))) == 0.0
    # OpenCV's fixed-point BT.601 grayscale: pure red, green, blue -> 76, 150, 29
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    assert evaluate.rgb_to_gray(Image.fromarray(colours)).tolist() == [[76, 150, 29, 255]]


def test_grayscale_is_opencvs_15_bit_formula():
    """(9798 R + 19235 G + 3735 B + 16384) >> 15, worked by hand: blue 250 ->
    (933750 + 16384) >> 15 = 950134 // 32768 = 28 (the 14-bit formula gives
    29); (10, 20, 30) -> (97980 + 384700 + 112050 + 16384) >> 15 = 611114 //
    32768 = 18; (200, 100, 50) -> (1959600 + 1923500 + 186750 + 16384) >> 15 =
    4086234 // 32768 = 124."""
    colours = np.array([[[0, 0, 250], [10, 20, 30], [200, 100, 50], [0, 0, 0]]], dtype=np.uint8)
    assert evaluate.rgb_to_gray(Image.fromarray(colours)).tolist() == [[28, 18, 124, 0]]


def test_pickscore_defaults_to_fp32_and_bf16_would_move_it(tiny_models):
    """Scorers run in fp32 (the public protocol): bf16 moves PickScore on the
    tiny CLIP by the printed amount; at the real model's logit scale of 100
    the same relative error is ~7x larger (the tiny CLIP's scale is
    exp(2.66) = 14.3)."""
    clip = tiny_models["clip"]
    fp32 = common.PickScorer(clip, clip, device="cpu")
    assert fp32.model.dtype == torch.float32
    bf16 = common.PickScorer(clip, clip, device="cpu", dtype=torch.bfloat16)
    images, prompts = random_images(8, seed=3), PROMPTS * 2 + PROMPTS[:2]
    moved = np.abs(bf16(images, prompts) - fp32(images, prompts))
    scale = float(fp32.model.logit_scale.exp())
    print(f"bf16 vs fp32 PickScore on the tiny CLIP (logit scale {scale:.1f}): mean |diff| {moved.mean():.4f}, "
          f"max {moved.max():.4f}; at logit scale 100: ~{moved.mean() * 100 / scale:.3f}")
    # bf16 keeps 8 bits of mantissa (~0.4% relative): the change is clearly
    # above fp32 rounding (1e-6 relative) and above curation's 0.02 gap filter
    # once scaled to the real model's logit scale
    assert moved.max() > 1e-3
    assert moved.mean() * 100 / scale > 0.02
    # the evaluation's CLIP models are fp32 too
    assert evaluate.ClipScoreMetric(evaluate.parse_args(["--clip_model", clip]), "cpu").scorer.model.dtype == \
        torch.float32


def test_scorers_are_fp32_on_gpu_too(tiny_models, monkeypatch):
    """The dtype a scorer asks for on a CUDA device (no GPU needed: the model
    load is intercepted)."""
    import transformers

    asked = []

    class Loaded:
        def to(self, device):
            return self

        def eval(self):
            return self

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained",
                        lambda model, dtype=None, **kwargs: asked.append(dtype) or Loaded())
    clip = tiny_models["clip"]
    common.PickScorer(clip, clip, device="cuda")
    monkeypatch.setattr(evaluate, "_CLIP_MODELS", {})  # none loaded before
    evaluate.ClipScoreMetric(evaluate.parse_args(["--clip_model", clip]), "cuda")
    assert asked == [torch.float32, torch.float32]


def test_generation_precision_follows_the_public_protocol(tiny_models):
    """SD-3.5-M on GPU: VAE in fp32, sampling under fp16 autocast; SD-1.5 and
    CPU runs: nothing changes."""
    pipe = common.load_pipeline(tiny_models["sd3"], dtype=torch.float16)
    assert isinstance(evaluate.set_generation_precision(pipe, "sd3", torch.float16, torch.device("cpu")),
                      type(evaluate.contextlib.nullcontext()))
    assert pipe.vae.dtype == torch.float16
    context = evaluate.set_generation_precision(pipe, "sd3", torch.float16, torch.device("cuda"))
    assert isinstance(context, torch.autocast) and context.fast_dtype == torch.float16
    assert pipe.vae.dtype == torch.float32 and pipe.transformer.dtype == torch.float16
    sd15 = common.load_pipeline(tiny_models["sd15"], dtype=torch.float16)
    evaluate.set_generation_precision(sd15, "sd15", torch.float16, torch.device("cuda"))
    assert sd15.vae.dtype == torch.float16  # SD-1.5: the whole pipeline in fp16
    assert evaluate.parse_args([]).generation_dtype == "fp16"
    assert evaluate.parse_args(["--generation_dtype", "bf16"]).generation_dtype == "bf16"


def test_deqa_is_loaded_as_the_public_code_loads_it(monkeypatch):
    """Pinned revision, fp16 on GPU, eager attention, model.score(images)."""
    import transformers

    seen = {}

    class FakeDeQA(torch.nn.Module):
        def score(self, images):
            return torch.tensor([[3.5] * len(images)])

    def from_pretrained(model, **kwargs):
        seen.update(kwargs, model=model)
        return FakeDeQA()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    args = evaluate.parse_args([])
    metric = evaluate.DeQAMetric(args, "cpu")
    assert seen == {"model": "zhiyuanyou/DeQA-Score-Mix3", "revision": "f37ba4273ad8d7548e21ac2fa58353c517e4df49",
                    "trust_remote_code": True, "attn_implementation": "eager", "dtype": torch.float32}
    assert metric(random_images(2), ["a", "b"]) == [3.5, 3.5]
    evaluate.DeQAMetric(evaluate.parse_args(["--deqa_revision", "main"]), "cuda")
    assert seen["revision"] == "main" and seen["dtype"] == torch.float16


# The stylization prompts of the fixture: (category, id, prompt_en, class in style.csv)
ONEIG_ROWS = [("Anime_Stylization", "000", "1girl, solo, anime, looking at viewer, short hair", ""),
              ("Anime_Stylization", "001", "A cat on a windowsill, drawn in line art", "Line Art"),
              ("Portrait", "001", "A portrait of a man in a studio", None)]  # ids restart per category


@pytest.fixture
def oneig_clone(tmp_path):
    """A OneIG-Benchmark clone in its published layout (github.com/OneIG-Bench/
    OneIG-Benchmark, commit 41b49831e79e6dde5323618c164da1c4cf0f699d), written
    with csv: OneIG-Bench.csv at the root, header
    `category,id,prompt_en,type,prompt_length,class` with CRLF line ends as
    there; scripts/style/style.csv, header `,id,class` (pandas' unnamed index
    first), an empty class for the ids its style_score.py skips; the
    reference embeddings per style, scripts/style/CSD_embed.pt and SE_embed.pt
    (torch.save). Only its style encoders (scripts/utils/inference.py) are
    stand-ins: they embed an image by its normalised mean colour (SE: negated)."""
    import csv

    root = tmp_path / "OneIG-Benchmark"
    (root / "scripts" / "utils").mkdir(parents=True)
    (root / "scripts" / "style").mkdir(parents=True)
    (root / "scripts" / "utils" / "inference.py").write_text(
        "import numpy as np, torch\n"
        "from PIL import Image\n"
        "class _Encoder:\n"
        "    def __init__(self, model_path=None, pretrained_path=None):\n"
        "        self.sign = -1.0 if pretrained_path else 1.0\n"
        "    def get_style_embedding(self, path):\n"
        "        rgb = torch.tensor(np.asarray(Image.open(path).convert('RGB'), dtype=np.float32).mean((0, 1)))\n"
        "        return (self.sign * rgb / rgb.norm())[None]\n"
        "CSDStyleEmbedding = SEStyleEmbedding = _Encoder\n")
    reference = {"line_art": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])}
    torch.save(reference, root / "scripts" / "style" / "CSD_embed.pt")
    torch.save({"line_art": -reference["line_art"]}, root / "scripts" / "style" / "SE_embed.pt")
    with open(root / "OneIG-Bench.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)  # csv's default line end is CRLF, OneIG-Bench.csv's
        writer.writerow(["category", "id", "prompt_en", "type", "prompt_length", "class"])
        for category, id_, prompt, style in ONEIG_ROWS:
            writer.writerow([category, id_, prompt, "T, P" if category == "Anime_Stylization" else "NP", "short",
                             style or ""])
    with open(root / "scripts" / "style" / "style.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["", "id", "class"])
        for index, (category, id_, _, style) in enumerate(r for r in ONEIG_ROWS if r[0] == "Anime_Stylization"):
            writer.writerow([index, id_, style])
    yield root
    if str(root.resolve()) in sys.path:  # StylizationMetric put it there to import the encoders
        sys.path.remove(str(root.resolve()))
    for module in ("scripts.utils.inference", "scripts.utils", "scripts"):
        sys.modules.pop(module, None)


def test_stylization_runs_oneig_benchs_style_evaluator(oneig_clone, tmp_path):
    # without a OneIG-Bench clone the metric reports how to get it
    with pytest.raises(evaluate.ScorerUnavailable, match="needs --oneig_dir"):
        evaluate.StylizationMetric(evaluate.parse_args([]), "cpu")
    metric = evaluate.StylizationMetric(evaluate.parse_args(["--oneig_dir", str(oneig_clone)]), "cpu")
    paths = []
    for i, colour in enumerate([(200, 100, 0), (0, 0, 255)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), colour).save(paths[-1])
    prompts = [row[2] for row in ONEIG_ROWS]
    scores = metric(paths + paths[:1] * 2, [prompts[1], prompts[1], prompts[0], prompts[2]])
    # image 0: unit mean colour (0.894, 0.447, 0): best CSD match 0.894, the
    # SE embedding is its negative and matches the negated references alike;
    # image 1 (pure blue) matches neither reference: 0. No style class (id
    # 000), and the Portrait row that shares id 001: None
    assert scores[0] == pytest.approx(200 / np.hypot(200, 100), abs=1e-6)
    assert scores[1:] == [0.0, None, None]


def test_a_oneig_clone_without_a_needed_column_is_one_clear_error(oneig_clone):
    args = evaluate.parse_args(["--oneig_dir", str(oneig_clone)])
    style_csv = oneig_clone / "scripts" / "style" / "style.csv"
    style_csv.write_text(",id,style\n0,000,\n")
    with pytest.raises(evaluate.ScorerUnavailable, match=r"style\.csv lacks the column\(s\) class"):
        evaluate.StylizationMetric(args, "cpu")
    style_csv.unlink()
    with pytest.raises(evaluate.ScorerUnavailable, match=r"cannot read .*style\.csv .*columns?\(s\) id, class"):
        evaluate.StylizationMetric(args, "cpu")
    (oneig_clone / "OneIG-Bench.csv").write_text("category,id,prompt\r\n")
    with pytest.raises(evaluate.ScorerUnavailable, match=r"OneIG-Bench\.csv lacks the column\(s\) prompt_en"):
        evaluate.StylizationMetric(args, "cpu")


def test_figure2b_is_drawn_from_a_oneig_clone(oneig_clone, tmp_path):
    """Paper Fig. 2 (b): two methods' images of OneIG's stylization prompts,
    scored by `evaluate.py score --metrics stylization --oneig_dir CLONE`,
    then the panel drawn from that folder's stylization means."""
    folder = tmp_path / "oneig-images"
    colours = {"base": (200, 100, 0), "realalign": (255, 0, 0)}
    for method, colour in colours.items():
        (folder / method / "seed_42").mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (8, 8), colour).save(folder / method / "seed_42" / f"{index:05d}.png")
    prompts = tmp_path / "oneig-prompts.txt"
    prompts.write_text(ONEIG_ROWS[1][2] + "\n" + ONEIG_ROWS[0][2] + "\n")  # line art; no style class
    evaluate.main(["score", "--images", str(folder), "--prompts", str(prompts), "--metrics", "stylization",
                   "--oneig_dir", str(oneig_clone)])
    report = json.loads((folder / "results.json").read_text())
    names = [m["name"] for m in report["methods"]]
    stylization = evaluate.stylization_means(report["results"], names)
    # per image (CSD + SE) / 2 of the best matches: orange 0.894, red 1.0; the
    # second prompt has no style class and is left out, as style_score.py skips it
    assert stylization == {"base": pytest.approx(200 / np.hypot(200, 100), abs=1e-6), "realalign": 1.0}
    assert report["results"]["base"]["stylization"]["missing"] == 1
    panel = {**report, "results": {}, "human_preference": {"base": 0.0, "realalign": 1.0},
             "stylization": stylization}
    assert evaluate.draw_figure2(panel, tmp_path / "figure2.png")
    assert Image.open(tmp_path / "figure2.png").size[0] > 0


def test_aesthetic_and_clip_score_on_tiny_clip(tiny_models, aesthetic_weights):
    args = scorer_args(tiny_models, aesthetic_weights)
    images = random_images(2, seed=2)
    aesthetic = evaluate.AestheticMetric(args, "cpu")(images, PROMPTS[:2])
    clip_scores = evaluate.ClipScoreMetric(args, "cpu")(images, PROMPTS[:2])

    _, out = clip_forward(tiny_models, images, PROMPTS[:2])
    x = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    state = torch.load(aesthetic_weights, weights_only=True)
    for index in (0, 2, 4, 6, 7):  # no activations in the LAION head
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    np.testing.assert_allclose(aesthetic, x.squeeze(-1).numpy(), rtol=1e-4, atol=1e-5)

    cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    np.testing.assert_allclose(clip_scores, (100 * cosine.clamp(min=0)).numpy(), rtol=1e-4, atol=1e-4)


def test_unifiedreward_answer_parser():
    """The public parser: "Final Score:" case-sensitive, the first match, 1-5 only (a regex search: "10" reads 1)."""
    parse = evaluate.parse_final_score
    assert parse("The apple is there (object): 5\n...\nFinal Score: 3.75") == 3.75
    assert parse("Final Score: 2\nrevised. Final Score: 4.5") == 2.0  # the first one counts
    assert parse("Final Score:4") == 4.0 and parse("Final Score: 10") == 1.0
    for unparsed in ("Final Score: 7", "Final Score: -2", "final score: 4", "**Final Score:** 4", "Final Score: N/A",
                     "Final Score:", "The image looks fine overall.", "", None):
        assert parse(unparsed) is None, unparsed


# A stand-in for the authors' rewards.py (Cwyxx/RealAlign, training_sd35m/flow_grpo/rewards.py at the pinned
# commit): the same Python shape (a string literal `prompt_template`, implicitly concatenated, inside a function
# `unifiedreward_score`, beside another function with its own `prompt_template`), with an invented question.
STAND_IN_REWARDS = '''import re

def qwenvl_score(device):
    prompt_template = "not this one {prompt}"

def unifiedreward_score(device):
    score_pattern = re.compile(r"Final Score: ([1-5])")
    prompt_template = (
        "Invented question about a picture. "
        "Caption: [{prompt}]"
    )
    return prompt_template
'''


class FakeQwen:
    """Stands in for UnifiedReward's processor and model (transformers' Qwen2.5-VL classes): records every
    generate() call and answers from a script, one answer per image."""

    def __init__(self, answers):
        self.answers, self.calls, self.texts = list(answers), [], []
        self.tokenizer, self.device = self, torch.device("cpu")

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert [c["type"] for c in messages[0]["content"]] == ["image", "text"]  # the public layout: image first
        return messages[0]["content"][1]["text"]

    def __call__(self, text, images, padding, return_tensors):
        self.texts += text
        self.sizes = [image.size for image in images]
        from transformers import BatchFeature

        return BatchFeature({"input_ids": torch.zeros(len(text), 3, dtype=torch.long)})

    def generate(self, input_ids, **kwargs):
        self.calls.append((len(input_ids), kwargs, self.sizes))
        return torch.zeros(len(input_ids), 5, dtype=torch.long)

    def batch_decode(self, ids, skip_special_tokens, clean_up_tokenization_spaces):
        return [self.answers.pop(0) for _ in ids]


def image_folder(folder, prompts):
    """An evaluation folder of 512 px images of method 'base' at seed 42, one per prompt; its manifest."""
    manifest = []
    for index, (image, prompt) in enumerate(zip(random_images(len(prompts)), prompts)):
        manifest.append({"image": evaluate.image_relpath("base", 42, index), "method": "base", "seed": 42,
                         "index": index, "prompt": prompt})
        common.atomic_save_image(image.resize((512, 512)), folder / manifest[-1]["image"])
    return manifest


def test_unifiedreward_asks_the_authors_question_one_image_at_a_time(tmp_path, monkeypatch):
    """The default question is the authors' template, read from their rewards.py at the pinned commit (here a
    stand-in served offline); each image is asked on its own with max_new_tokens=512 and the model's own
    generation settings; answers go through the public parser."""
    import transformers

    served = {}
    monkeypatch.setattr(common, "download_url", lambda url, path: Path(path).write_text(served[url]))
    url = f"https://raw.githubusercontent.com/Cwyxx/RealAlign/{'158ce2826b51566f58131235911e313a9313c91c'}/" \
          "training_sd35m/flow_grpo/rewards.py"
    args = evaluate.parse_args(["--cache_dir", str(tmp_path / "cache"), "--metrics", "unifiedreward"])
    # offline: one message naming the URL and where to place the file
    with pytest.raises(common.UserError, match=f"could not fetch the authors' UnifiedReward question from {url}.*"
                                               "place it at .*cache/authors/158ce2826b51566f58131235911e313a9313c91c/"
                                               "training_sd35m/flow_grpo/rewards.py"):
        evaluate.unifiedreward_question(args)
    served[url] = STAND_IN_REWARDS
    assert evaluate.unifiedreward_question(args) == "Invented question about a picture. Caption: [{prompt}]"
    served.clear()  # cached: no second download
    assert evaluate.unifiedreward_question(args).startswith("Invented question")

    prompts = ["a cat", "a dog", "a cow"]
    manifest = image_folder(tmp_path, prompts)
    fake = FakeQwen(["element (object): 1\nFinal Score: 4\nFinal Score: 2", "Final Score: 7", "final score: 3"])
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: fake)
    monkeypatch.setattr(transformers.Qwen2_5_VLForConditionalGeneration, "from_pretrained",
                        lambda *a, **k: type("M", (), {"to": lambda self, d: self, "eval": lambda self: fake})())
    assert evaluate.score_images(tmp_path, manifest, ["unifiedreward"], args, evaluate.make_state()) == {}
    assert fake.texts == [f"Invented question about a picture. Caption: [{p}]" for p in prompts]
    # one image per generate() call (--score_batch_size 16 does not batch it), resized as qwen_vl_utils does
    assert fake.calls == [(1, {"max_new_tokens": 512}, [(504, 504)])] * 3
    scores = evaluate.read_score_table(tmp_path)
    assert [scores[(e["image"], "unifiedreward")]["value"] for e in manifest] == [4.0, None, None]


def test_hpsv3_scores_one_image_at_a_time(tmp_path, monkeypatch, capsys):
    """As the public evaluation does (batch size 1 for HPSv3 and UnifiedReward); --vlm_batch_size batches."""
    batches = []

    class FakeHPSv3:  # the hpsv3 package's HPSv3RewardInferencer: (mu, sigma) per image
        def __init__(self, device):
            pass

        def reward(self, prompts, image_paths):
            batches.append(len(image_paths))
            return [torch.tensor([5.0 + len(p), 1.0]) for p in prompts]

    monkeypatch.setitem(sys.modules, "hpsv3", type(sys)("hpsv3"))
    sys.modules["hpsv3"].HPSv3RewardInferencer = FakeHPSv3
    manifest = image_folder(tmp_path, ["a", "bb", "ccc"])
    assert evaluate.score_images(tmp_path, manifest, ["hpsv3"], evaluate.parse_args([]), evaluate.make_state()) == {}
    assert batches == [1, 1, 1]
    assert [evaluate.read_score_table(tmp_path)[(e["image"], "hpsv3")]["value"] for e in manifest] == [6.0, 7.0, 8.0]
    batches.clear()
    evaluate.score_images(tmp_path / "b", image_folder(tmp_path / "b", ["a", "bb", "ccc"]), ["hpsv3"],
                          evaluate.parse_args(["--vlm_batch_size", "2"]), evaluate.make_state())
    assert batches == [2, 1]
    with pytest.raises(SystemExit) as stop:  # the flag's domain: argparse stops before anything loads
        evaluate.main(["score", "--images", str(tmp_path), "--vlm_batch_size", "0"])
    assert stop.value.code == 2
    assert "--vlm_batch_size: must be an integer >= 1 (got 0)" in capsys.readouterr().err


def test_aggregate_mean_over_prompts_then_seeds():
    rows = []
    for seed, values in {42: [1.0, 2.0, 3.0], 123: [3.0, None, 5.0], 456: [None, None, None]}.items():
        rows += [{"method": "a", "seed": seed, "metric": "pickscore", "value": v} for v in values]
    rows += [{"method": "b", "seed": 42, "metric": "pickscore", "value": 7.0}]
    results = evaluate.aggregate(rows, ["a", "b"], ["pickscore", "deqa"])
    a = results["a"]["pickscore"]
    # per-seed means 2 and 4 (missing excluded; seed 456 has no score left)
    assert a["per_seed"] == {"42": 2.0, "123": 4.0}
    assert a["mean"] == pytest.approx(3.0) and a["std"] == pytest.approx(1.0)  # population std
    assert (a["n"], a["missing"]) == (5, 4)
    assert results["b"]["pickscore"]["mean"] == 7.0 and results["b"]["pickscore"]["std"] == 0.0
    assert "deqa" not in results["a"]


def test_human_preference_minmax():
    results = {"a": {"unifiedreward": {"mean": 3.0}, "hpsv3": {"mean": 6.0}},
               "b": {"unifiedreward": {"mean": 3.2}, "hpsv3": {"mean": 8.0}},
               "c": {"unifiedreward": {"mean": 3.1}, "hpsv3": {"mean": 8.0}}}
    pref = evaluate.human_preference(results, ["a", "b", "c"])
    assert pref == pytest.approx({"a": 0.0, "b": 1.0, "c": 0.75})
    del results["c"]["hpsv3"]
    assert evaluate.human_preference(results, ["a", "b", "c"]) is None


def _entry(mean, std):
    return {"mean": mean, "std": std, "per_seed": {}, "n": 10, "missing": 0}


def test_results_markdown_gains_bold_underline(monkeypatch):
    report = {
        "title": "test",
        "methods": [{"name": "sd15", "spec": ""}, {"name": "dpo", "spec": "x"}, {"name": "ours", "spec": "y"}],
        "metrics": ["pickscore", "unifiedreward", "laplacian"],
        "seeds": [42, 123],
        "n_prompts": 5,
        "results": {
            "sd15": {"pickscore": _entry(20.0, 0.1), "unifiedreward": _entry(3.0, 0.01), "laplacian": _entry(1832, 5)},
            "dpo": {"pickscore": _entry(21.0, 0.2), "unifiedreward": _entry(3.1, 0.02), "laplacian": _entry(1552, 4)},
            "ours": {"pickscore": _entry(20.5, 0.05), "laplacian": _entry(2354, 6)},
        },
        "not_run": {"hpsv3": "not run: pip install hpsv3"},
    }
    report["results"]["dpo"]["unifiedreward"]["missing"] = 3
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in evaluate.results_markdown(report).splitlines() if line.startswith("| ")}
    assert rows["Method"] == ["PickScore", "UnifiedReward", "Texture Detail (Laplacian var.)"]
    assert rows["sd15"] == ["20.00 ± 0.10", "<u>3.00 ± 0.01</u>", "<u>1832 ± 5</u>"]  # baseline: no gain
    assert rows["dpo"] == ["**21.00 ± 0.20** (+5.0%)", "**3.10 ± 0.02** (+3.3%)", "1552 ± 4 (-15.3%)"]
    assert rows["ours"] == ["<u>20.50 ± 0.05</u> (+2.5%)", "—", "**2354 ± 6** (+28.5%)"]
    text = evaluate.results_markdown(report)
    assert "All metrics are higher-is-better." in text
    assert "dpo / unifiedreward: 3" in text and "hpsv3: not run: pip install hpsv3" in text

    # a lead within one std over seeds is nobody's best: dpo leads by 0.5 with std 0.6
    report["results"]["dpo"]["pickscore"]["std"] = 0.6
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in evaluate.results_markdown(report).splitlines() if line.startswith("| ")}
    assert [rows[m][0] for m in ("sd15", "dpo", "ours")] == ["20.00 ± 0.10", "21.00 ± 0.60 (+5.0%)",
                                                              "20.50 ± 0.05 (+2.5%)"]
    report["results"]["dpo"]["pickscore"]["std"] = 0.2
    # a smoke run says above its table that the numbers mean nothing
    text = evaluate.results_markdown({**report, "note": "Smoke run: these numbers mean nothing."})
    assert text.index("Smoke run: these numbers mean nothing.") < text.index("| Method |")

    # a lower-is-better metric ranks the other way round
    monkeypatch.setitem(evaluate.HIGHER_IS_BETTER, "laplacian", False)
    text = evaluate.results_markdown(report)
    assert "**1552 ± 4** (-15.3%)" in text and "<u>1832 ± 5</u>" in text and "Lower is better for: laplacian" in text


def test_results_markdown_beside_the_papers_numbers(tmp_path):
    """A hand-made results.json of a known combination (SD-1.5, the full
    Pick-a-Pic v2 set): every cell of a paper row shows the paper's value and
    our difference; a method the paper does not have shows none; one seed
    prints no spread; a tie is nobody's best."""
    one_seed = lambda mean: {"mean": mean, "std": 0.0, "per_seed": {"42": mean}, "n": 500, "missing": 0}
    report = {
        "title": "known", "backbone": "sd15", "prompts": "pickapic_v2", "n_prompts": 500, "seeds": [42],
        "methods": [{"name": n, "spec": ""} for n in ("base", "diffusion_dpo", "realalign", "stage1")],
        "metrics": ["pickscore", "unifiedreward", "laplacian", "sgp"],
        "unifiedreward_question": "q.txt (user file)",
        "results": {
            "base": {"pickscore": one_seed(20.70), "unifiedreward": one_seed(2.90), "laplacian": one_seed(1800.2),
                     "sgp": one_seed(-0.05)},
            "diffusion_dpo": {"pickscore": one_seed(21.004), "unifiedreward": one_seed(3.00),
                              "laplacian": one_seed(1500.0), "sgp": one_seed(-0.08)},
            "realalign": {"pickscore": one_seed(20.996), "unifiedreward": one_seed(3.10),
                          "laplacian": one_seed(2400.0), "sgp": one_seed(-0.01)},
            "stage1": {"pickscore": one_seed(20.80), "unifiedreward": one_seed(3.05), "laplacian": one_seed(2000.0),
                       "sgp": one_seed(-0.02)},
        },
    }
    report["results"]["realalign"]["unifiedreward"]["missing"] = 7
    path = tmp_path / "results.json"
    path.write_text(json.dumps(report))
    text = evaluate.results_markdown(json.loads(path.read_text()))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ")}
    assert rows["base"] == ["20.70 · paper 20.65 (Δ +0.05)", "2.90 · paper 2.92 (Δ -0.02)",
                            "1800 · paper 1832 (Δ -32)", "-0.050 · paper -0.041 (Δ -0.009)"]
    # 21.004 and 20.996 both show as 21.00: a tie, so neither is bold and
    # nothing is underlined in that column
    assert rows["diffusion_dpo"][0] == "21.00 (+1.5%) · paper 21.03 (Δ -0.03)"
    assert rows["realalign"][0] == "21.00 (+1.4%) · paper 21.04 (Δ -0.04)"
    assert rows["realalign"][1] == "**3.10** (+6.9%) · paper 3.06 (Δ +0.04)"
    assert rows["realalign"][2] == "**2400** (+33.3%) · paper 2354 (Δ +46)"
    assert rows["stage1"] == ["20.80 (+0.5%)", "<u>3.05</u> (+5.2%)", "<u>2000</u> (+11.1%)", "<u>-0.020</u> (+60.0%)"]
    assert "±" not in "".join(sum(rows.values(), []))
    assert "over 1 seed (42)" in text and "1 seeds" not in text
    assert "Unparsed answers (no 'Final Score: x'): 7 of 2007" in text and "q.txt (user file)" in text
    # another prompt set, or a subset of this one: no paper values
    for change in ({"prompts": "partiprompts"}, {"n_prompts": 100}, {"backbone": "sd3"}):
        assert "paper" not in evaluate.results_markdown({**report, **change}).split("Methods:")[0]
    # the released LoRAs are compared with the paper's RealAlign row
    report["methods"][3]["name"] = "realalign_released"
    report["results"]["realalign_released"] = report["results"].pop("stage1")
    assert "<u>2000</u> (+11.1%) · paper 2354 (Δ -354)" in evaluate.results_markdown(report)
    # two seeds: "seeds" and the spread are back
    two = {**report, "seeds": [42, 123]}
    for method in two["results"].values():
        for entry in method.values():
            entry["per_seed"] = {"42": entry["mean"], "123": entry["mean"]}
    assert "over 2 seeds (42, 123)" in evaluate.results_markdown(two)
    assert "20.70 ± 0.00" in evaluate.results_markdown(two)


def test_one_unifiedreward_question_per_folder(tmp_path):
    """Scores made with one question are not mixed with another's."""
    run_info = {"methods": [{"name": "base", "spec": ""}], "unifiedreward_question": "old.txt (user file)"}
    manifest = [{"image": "base/seed_42/00000.png", "method": "base", "seed": 42, "index": 0, "prompt": "p"}]
    args = evaluate.parse_args(["--metrics", "unifiedreward"])
    with pytest.raises(common.UserError, match=r"another question \(old.txt \(user file\)\)"):
        evaluate.finish(tmp_path, run_info, manifest, ["unifiedreward"], args, state=None)
    assert not (tmp_path / "scores.jsonl").exists()


def test_figure2_as_the_authors_notebooks_draw_it(tmp_path, monkeypatch):
    """(a) x = realism, y = texture detail, both min-max over the rows shown; (b) human preference (min-max
    inside) vs stylization. The paper's points are normalised over the paper's six methods from its numbers
    (the notebooks'), so they do not move when the run has other rows; each panel names both sets."""
    names = ["base", "diffusion_dpo", "realalign", "mine"]
    report = {"backbone": "sd15", "prompts": "pickapic_v2", "n_prompts": 500, "human_preference": None,
              "methods": [{"name": n, "spec": ""} for n in names],
              "results": {n: {"laplacian": {"mean": 1800.0 + 100 * i}, "sgp": {"mean": -0.05 + 0.02 * i}}
                          for i, n in enumerate(names)}}
    points = evaluate.figure2_points(report)["a"]
    assert points["ours"] == {n: pytest.approx((i / 3, i / 3)) for i, n in enumerate(names)}  # (realism, detail)
    # the paper's: realism over -0.253 (InPO) .. -0.009 (RealAlign), detail over 1255.905 (InPO) .. 2353.761
    assert points["paper"]["realalign"] == pytest.approx((1.0, 1.0))
    assert points["paper"]["diffusion_dpo"] == pytest.approx(((0.253 - 0.075) / 0.244, (1552.312 - 1255.905) /
                                                             (2353.761 - 1255.905)))
    assert set(points["paper"]) == {"base", "diffusion_dpo", "realalign"} and "mine" not in points["paper"]
    assert evaluate.PAPER_RESULTS[("sd15", "pickapic_v2")]["diffusion_dpo_realalign"]["laplacian"] == 2345.722
    assert evaluate.PAPER_RESULTS[("sd15", "pickapic_v2")]["diffusion_dpo_realalign"]["sgp"] == -0.011
    import matplotlib.pyplot as plt

    drawn = []
    original = plt.Axes.text
    monkeypatch.setattr(plt.Axes, "text", lambda self, x, y, s, *a, **k: drawn.append(s) or original(self, x, y, s,
                                                                                                      *a, **k))
    assert evaluate.draw_figure2(report, tmp_path / "figure2.png")
    assert Image.open(tmp_path / "figure2.png").format == "PNG"
    assert any("min-max over this run's rows: base, diffusion_dpo, realalign, mine" in t and
               "the paper's points: min-max over its methods: base, diffusion_dpo, diffusion_kto, inpo, realalign, "
               "diffusion_dpo_realalign" in t for t in drawn), drawn
    # without texture/realism and without stylization there is nothing to draw
    assert not evaluate.draw_figure2({**report, "results": {}}, tmp_path / "none.png")

    # (b) on SD-3.5-M DrawBench: the paper's points over its six methods (with GRPO-Guard and DiffusionNFT),
    # whichever rows this run holds: ours 0.629, Flow-GRPO 0.779, Flow-GRPO + RealAlign 0.895
    rows = ["base", "flow_grpo", "realalign", "flow_grpo_realalign"]
    paper = evaluate.PAPER_RESULTS[("sd3", "drawbench")]
    for shown in (rows, rows[:3]):
        results = {m: {k: {"mean": paper[m][k] + 0.01} for k in ("unifiedreward", "hpsv3")} for m in shown}
        sd3 = {"backbone": "sd3", "prompts": "drawbench", "n_prompts": 200, "results": results,
               "methods": [{"name": m, "spec": ""} for m in shown],
               "human_preference": evaluate.human_preference(results, shown),
               "stylization": {m: paper[m]["stylization"] for m in shown}}
        b = evaluate.figure2_points(sd3)["b"]
        expected = {"base": 0.0, "flow_grpo": 0.779, "realalign": 0.629, "flow_grpo_realalign": 0.895}
        assert {m: round(x, 3) for m, (x, _) in b["paper"].items()} == {m: expected[m] for m in shown}
        assert b["paper"]["realalign"][1] == 0.305 and b["paper_over"][2:4] == ["grpo_guard", "diffusion_nft"]
        assert b["over"] == shown
    # ours are normalised over the run's three rows: realalign has the top HPSv3, UnifiedReward 0.16 of 0.29 up
    assert b["ours"]["realalign"] == pytest.approx((0.5 * 0.16 / 0.29 + 0.5, 0.305))
    assert evaluate.draw_figure2(sd3, tmp_path / "b.png")
    # panel (b): stylization from another folder (OneIG-Bench's style prompts), matched by method name
    other = tmp_path / "oneig" / "results.json"
    other.parent.mkdir()
    other.write_text(json.dumps({"results": {n: {"stylization": {"mean": 0.3 + 0.01 * i}}
                                             for i, n in enumerate(names)}}))
    assert evaluate.stylization_means(report["results"], names, other) == \
        {n: pytest.approx(0.3 + 0.01 * i) for i, n in enumerate(names)}
    assert evaluate.stylization_means(report["results"], names) is None
    assert evaluate.stylization_means(report["results"], names + ["absent"], other) is None
    with pytest.raises(common.UserError, match="not an evaluate.py results.json"):
        evaluate.stylization_means({}, names, tmp_path / "nope.json")


# ---------------------------------------------------------------------------
# methods and prompts
# ---------------------------------------------------------------------------


def test_method_specs(tiny_models, lora_dir, tmp_path):
    methods = evaluate.parse_methods(["base=", f"ours={lora_dir}", f"net={tiny_models['sd15']}",
                                      f"both={tiny_models['sd15']}+{lora_dir}", "hub=owner/some-lora"])
    assert [m["parts"] for m in methods] == [
        [], [("lora", str(lora_dir))], [("network", tiny_models["sd15"])],
        [("network", tiny_models["sd15"]), ("lora", str(lora_dir))], [("hub", "owner/some-lora")]]
    assert evaluate.parse_methods(None)[0]["name"] == "base"
    (tmp_path / "empty").mkdir()
    bad = {
        "ours": "must be NAME=MODEL",
        "=": "the name must be",
        "my model=": "the name must be",
        f"ours={tmp_path / 'missing'}": "neither an existing file or folder nor a hub id",
        f"ours={tmp_path / 'empty'}": "neither a LoRA",
        f"ours={lora_dir}+{tiny_models['sd15']}": "can only come first",
    }
    for text, message in bad.items():
        with pytest.raises(common.UserError, match=message):
            evaluate.parse_methods([text])
    with pytest.raises(common.UserError, match="used twice"):
        evaluate.parse_methods(["a=", "a="])


def test_bad_method_exits_2_with_message(tiny_models, prompt_file, tmp_path, capsys):
    argv = ["--pretrained_model", tiny_models["sd15"], "--method", "base=", "--method", "ours",
            "--prompts", str(prompt_file), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        common.run_main(lambda: evaluate.main(argv))
    assert exit_info.value.code == 2
    assert "--method 'ours' must be NAME=MODEL" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # stopped before any work


def test_authors_prompt_sets_by_url(tmp_path, monkeypatch):
    """A named set defaults to the authors' file at the pinned commit, read
    with line.strip() (inner whitespace kept), with the stated count enforced."""
    served = {}

    def fake_download(url, path):
        Path(path).write_text(served[url], encoding="utf-8")

    monkeypatch.setattr(common, "download_url", fake_download)
    for name, (relpath, count) in evaluate.AUTHORS_PROMPT_FILES.items():
        url = f"https://raw.githubusercontent.com/Cwyxx/RealAlign/158ce2826b51566f58131235911e313a9313c91c/{relpath}"
        lines = [f"  prompt {i} of {name}  with  double spaces " for i in range(count)]
        served[url] = "\n".join(lines) + "\n\n"  # a trailing blank line is not a prompt
        prompts = evaluate.load_prompts(name, tmp_path / "cache")
        assert len(prompts) == count
        assert prompts[0] == f"prompt 0 of {name}  with  double spaces"
        # cached: a second load does not download
        served.pop(url)
        assert evaluate.load_prompts(name, tmp_path / "cache") == prompts
    assert {name: n for name, (_, n) in evaluate.AUTHORS_PROMPT_FILES.items()} == \
        {"pickapic_v2": 500, "partiprompts": 1632, "drawbench": 200}
    # a file with another number of prompts is refused and not cached
    served[f"{common.AUTHORS_REPO}/training_sd35m/dataset/drawbench-unique/test.txt"] = "only one\n"
    with pytest.raises(common.UserError, match="holds 1 prompts, not the 200"):
        evaluate.load_prompts("drawbench", tmp_path / "other_cache")
    assert not list((tmp_path / "other_cache").rglob("*.txt"))


def test_hub_prompt_sets_keep_inner_whitespace(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "fetch_prompt_set", lambda name: ["a  cat\n on a mat ", "b\tdog", "  "])
    assert evaluate.load_prompts("partiprompts", tmp_path, source="hub") == ["a  cat  on a mat", "b\tdog"]
    assert evaluate.load_prompts("hpdv2", tmp_path) == ["a  cat  on a mat", "b\tdog"]  # a hub-only set


def test_prompt_file_and_consistency(prompt_file, tmp_path):
    assert evaluate.load_prompts(str(prompt_file), tmp_path) == PROMPTS
    assert evaluate.load_prompts(str(prompt_file), tmp_path, max_prompts=2) == PROMPTS[:2]
    with pytest.raises(common.UserError, match="neither a prompt set"):
        evaluate.load_prompts(str(tmp_path / "nope.txt"), tmp_path)
    evaluate.check_prompts(tmp_path, PROMPTS)
    evaluate.check_prompts(tmp_path, PROMPTS[:1])  # a prefix is fine, the longer list is kept
    assert (tmp_path / "prompts.txt").read_text().splitlines() == PROMPTS
    with pytest.raises(common.UserError, match="other prompts"):
        evaluate.check_prompts(tmp_path, ["something else"])


def test_empty_prompt_file_is_a_clear_error(tiny_models, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    proc = subprocess.run([sys.executable, "evaluate.py", "--pretrained_model", tiny_models["sd15"],
                           "--prompts", str(empty), "--output_dir", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"error: no prompts in {empty}" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------
# end to end through the command line
# ---------------------------------------------------------------------------


def e2e_command(tiny_models, lora_dir, aesthetic_weights, prompt_file, out_dir):
    clip = tiny_models["clip"]
    return [sys.executable, "evaluate.py", "--pretrained_model", tiny_models["sd15"],
            "--method", "base=", "--method", f"ours={lora_dir}", "--method", f"net={tiny_models['sd15']}",
            "--method", "base2=",
            "--prompts", str(prompt_file), "--output_dir", str(out_dir), "--seeds", "42", "123",
            "--max_prompts", "2", "--resolution", "32", "--num_inference_steps", "2",
            "--metrics", "pickscore,sgp,laplacian,aesthetic,imagereward",
            "--pickscore_model", clip, "--pickscore_processor", clip,
            "--aesthetic_clip_model", clip, "--aesthetic_weights", str(aesthetic_weights)]


def run_cli(command, work):
    # An ImageReward module that fails to import stands in for the package not
    # being installed, whatever this environment has.
    fake = work / "fake_packages"
    fake.mkdir(exist_ok=True)
    (fake / "ImageReward.py").write_text("raise ImportError('pretend image-reward is not installed')\n")
    # One torch thread: the tiny models gain nothing from more, and the test
    # machines' two cores are shared with other test processes.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(ROOT), os.environ.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def e2e(tiny_models, lora_dir, aesthetic_weights, prompt_file, work):
    out_dir = work / "out"
    command = e2e_command(tiny_models, lora_dir, aesthetic_weights, prompt_file, out_dir)
    proc = run_cli(command, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out_dir, command


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_end_to_end_report(e2e):
    out_dir, _ = e2e
    report = json.loads((out_dir / "results.json").read_text())
    assert [m["name"] for m in report["methods"]] == ["base", "ours", "net", "base2"]
    assert report["metrics"] == ["pickscore", "imagereward", "aesthetic", "laplacian", "sgp"]
    for method in ("base", "ours", "net", "base2"):
        for metric in ("pickscore", "aesthetic", "laplacian", "sgp"):
            entry = report["results"][method][metric]
            assert entry["n"] == 4 and entry["missing"] == 0 and set(entry["per_seed"]) == {"42", "123"}
            assert np.isfinite(entry["mean"]) and np.isfinite(entry["std"])
    # the missing package is reported, the other metrics were computed
    assert report["not_run"]["imagereward"].startswith("not run: pip install image-reward")
    assert "imagereward" not in report["results"]["base"]
    table = (out_dir / "results.md").read_text()
    assert "| ours |" in table and "**" in table and "<u>" in table and "not run: pip install image-reward" in table
    for name in ("figure2.png", "grid.png"):
        assert Image.open(out_dir / name).format == "PNG"
    manifest = [json.loads(line) for line in (out_dir / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 4 * 2 * 2
    assert {(e["seed"], e["index"], e["prompt"]) for e in manifest if e["method"] == "ours"} == \
        {(s, i, p) for s in (42, 123) for i, p in enumerate(PROMPTS[:2])}
    scores = evaluate.read_score_table(out_dir)
    assert len(scores) == 4 * 2 * 2 * 4


def test_end_to_end_images(e2e):
    out_dir, _ = e2e
    for seed in (42, 123):
        for index in range(2):
            image = f"seed_{seed}/{index:05d}.png"
            base = pixels(out_dir / "base" / image)
            assert base.shape == (32, 32, 3)
            assert np.abs(pixels(out_dir / "ours" / image) - base).max() > 0  # the LoRA changes the images
            # the same UNet loaded as an override, and the base model after
            # both, give back the base images: methods switch cleanly
            assert np.array_equal(pixels(out_dir / "net" / image), base)
            assert np.array_equal(pixels(out_dir / "base2" / image), base)
    # the generator is re-seeded for every prompt: seeds differ, images differ
    assert np.abs(pixels(out_dir / "base/seed_42/00000.png") - pixels(out_dir / "base/seed_123/00000.png")).max() > 0


def test_resume_does_not_regenerate_or_rescore(e2e, work):
    out_dir, command = e2e
    images = sorted(out_dir.glob("*/seed_*/*.png"))
    before = {path: path.stat().st_mtime_ns for path in images}
    proc = run_cli(command, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {path: path.stat().st_mtime_ns for path in images} == before
    assert proc.stderr.count("all 4 images exist") == 4
    for metric in ("pickscore", "sgp", "laplacian", "aesthetic"):
        assert f"{metric}: scoring" not in proc.stderr


def test_score_command_merges_new_metric(e2e, tiny_models):
    out_dir, _ = e2e
    before = json.loads((out_dir / "results.json").read_text())
    evaluate.main(["score", "--images", str(out_dir), "--metrics", "clip", "--clip_model", tiny_models["clip"]])
    after = json.loads((out_dir / "results.json").read_text())
    assert after["metrics"] == ["pickscore", "imagereward", "aesthetic", "laplacian", "sgp", "clip"]
    assert all(after["results"][m]["clip"]["n"] == 4 for m in ("base", "ours", "net", "base2"))
    assert after["results"]["ours"]["pickscore"] == before["results"]["ours"]["pickscore"]
    assert "imagereward" in after["not_run"]  # still not computed


def test_scores_follow_their_scorer(e2e, tiny_models, tmp_path, caplog):
    """Scores are reused only from the same scorer (README "Running reliably"): a moved PickScore folder keeps
    them; another --sgp_real_prefix scores sgp again; retrained PickScore weights under the same path, both."""
    from transformers import CLIPModel

    out_dir, clip = shutil.copytree(e2e[0], tmp_path / "out"), shutil.copytree(tiny_models["clip"], tmp_path / "clip")

    def score(*extra):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="realalign"):
            evaluate.main(["score", "--images", str(out_dir), "--metrics", "pickscore,sgp", "--pickscore_model",
                           str(clip), "--pickscore_processor", str(clip), *extra])
        report = json.loads((out_dir / "results.json").read_text())["results"]["ours"]
        return [m for m in ("pickscore", "sgp") if f"{m}: scoring 16 images" in caplog.text], report

    assert score()[0] == []  # the same weights in another folder
    rescored, prefixed = score("--sgp_real_prefix", "A photo, ")
    assert rescored == ["sgp"] and prefixed["sgp"]["mean"] != json.loads((e2e[0] / "results.json").read_text())[
        "results"]["ours"]["sgp"]["mean"]
    model = CLIPModel.from_pretrained(clip)
    with torch.no_grad():
        model.visual_projection.weight.mul_(-1.0)
    model.save_pretrained(clip)
    rescored, retrained = score("--sgp_real_prefix", "A photo, ")
    assert rescored == ["pickscore", "sgp"] and retrained["pickscore"]["mean"] != prefixed["pickscore"]["mean"]


def test_sd3_defaults_and_generation(tiny_models, prompt_file, tmp_path, monkeypatch):
    # the shipped per-backbone defaults (README 'Method: evaluation') ...
    assert evaluate.SAMPLING_DEFAULTS == {"sd15": (50, 7.5), "sd3": (40, 4.5)}
    # ... and the SD-3 entry is the one picked for an SD-3 pipeline (3 steps
    # instead of 40 to keep the test fast)
    monkeypatch.setitem(evaluate.SAMPLING_DEFAULTS, "sd3", (3, 4.5))
    out_dir = tmp_path / "sd3"
    evaluate.main(["--pretrained_model", tiny_models["sd3"], "--prompts", str(prompt_file), "--max_prompts", "1",
                   "--seeds", "7", "--resolution", "32", "--output_dir", str(out_dir), "--metrics", "laplacian"])
    settings = json.loads((out_dir / "base" / "generation.json").read_text())
    assert (settings["backbone"], settings["num_inference_steps"], settings["guidance_scale"]) == ("sd3", 3, 4.5)
    assert Image.open(out_dir / "base/seed_7/00000.png").size == (32, 32)
    report = json.loads((out_dir / "results.json").read_text())
    assert report["results"]["base"]["laplacian"]["n"] == 1
    # settings changed on a rerun in the same folder: refused, not mixed
    with pytest.raises(common.UserError, match="other settings"):
        evaluate.main(["--pretrained_model", tiny_models["sd3"], "--prompts", str(prompt_file), "--max_prompts",
                       "1", "--seeds", "7", "--resolution", "32", "--output_dir", str(out_dir),
                       "--num_inference_steps", "4", "--metrics", "laplacian"])


def test_unreachable_hub_method_is_a_clear_error(tiny_models, prompt_file, tmp_path):
    # offline (conftest sets HF_HUB_OFFLINE): neither a LoRA nor a network loads
    with pytest.raises(common.UserError, match="loads neither as a LoRA .* nor as a network"):
        evaluate.main(["--pretrained_model", tiny_models["sd15"], "--method", "hub=owner/not-here",
                       "--prompts", str(prompt_file), "--max_prompts", "1", "--seeds", "1", "--resolution", "32",
                       "--num_inference_steps", "1", "--output_dir", str(tmp_path / "out"), "--metrics", "laplacian"])


def test_nonsense_values_and_a_held_folder_are_refused(tiny_models, prompt_file, tmp_path, capsys):
    import socket

    base = ["--pretrained_model", tiny_models["sd15"], "--method", "base=", "--prompts", str(prompt_file),
            "--output_dir", str(tmp_path / "out")]
    for flag, message in (("--num_inference_steps", "--num_inference_steps: must be an integer >= 1 (got 0)"),
                          ("--batch_size", "--batch_size: must be an integer >= 1 (got 0)")):
        with pytest.raises(SystemExit) as exit_info:
            common.run_main(lambda: evaluate.main([*base, flag, "0"]))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    # a folder that a live run holds
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / common.LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        with pytest.raises(common.UserError, match=f"in use by another run \\(pid {holder.pid}"):
            evaluate.main(base)
    finally:
        holder.kill()
        holder.wait()
