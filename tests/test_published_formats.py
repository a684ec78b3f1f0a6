"""The released weights load as their publishers publish them (README 'What
the real run needs'): every LoRA format is read by common.load_lora_into
(which --init_lora, evaluate.py --method, RELEASED=1 and COMPLEMENTARITY=1
all use), applies the LoRA exactly as PEFT's own loader does, and our own
checkpoints open in PEFT and in the authors' layout. The stand-ins are
tests/tiny_models.py's build_tiny_released, written by the libraries that
write the real ones (each cites the public file it mirrors)."""
import json
from pathlib import Path

import pytest
import torch

import common
import evaluate
from tiny_models import build_tiny_released


@pytest.fixture(scope="module")
def released(tiny_models):
    return {name: Path(path) for name, path in build_tiny_released(Path(tiny_models["sd3"]).parent).items()}


def inputs(bb):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), bb.sample_timesteps(2, g), bb.encode_prompts(["a cat", "a dog"])


@torch.no_grad()
def output(bb, net=None):
    x, t, cond = inputs(bb)
    return bb.predict(bb.net if net is None else net, x, t, cond)


def backbone(tiny_models, kind):
    return common.Backbone(common.load_pipeline(tiny_models[kind]), "cpu")


def peft_reference(tiny_models, kind, folder, **load_adapter):
    """What PEFT's own loader gives: PeftModel.from_pretrained on a fresh
    network (flow_grpo's loader), or, with load_adapter, the authors' SD-3.5-M
    evaluation: get_peft_model with their LoraConfig, then load_adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model

    bb = backbone(tiny_models, kind)
    if load_adapter:
        model = get_peft_model(bb.net, LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian",
                                                  target_modules=common.LORA_TARGETS[kind]))
        model.load_adapter(str(folder), **load_adapter)
        model.set_adapter(load_adapter["adapter_name"])
    else:
        model = PeftModel.from_pretrained(bb.net, str(folder))
    return output(bb, model)


@pytest.mark.parametrize("name,kind,peft_folder", [
    ("flowgrpo-lora-sd3", "sd3", ""),                    # a bare PEFT adapter folder (Flow-GRPO)
    ("realalign-lora-sd3", "sd3", "lora/learner"),       # the authors' SD-3.5-M checkpoint layout
    ("realalign-lora-sd15", "sd15", None),               # the authors' SD-1.5 diffusers file
])
def test_each_published_lora_loads_as_its_own_library_loads_it(name, kind, peft_folder, released, tiny_models):
    base = output(backbone(tiny_models, kind))
    bb = backbone(tiny_models, kind)
    common.load_lora_into(bb, str(released[name]), "eval_0")
    ours = output(bb)
    assert (ours - base).abs().max() > 1e-2  # the LoRA is applied, far above float noise
    if peft_folder is None:  # diffusers' format: the stock pipeline's load_lora_weights is its loader
        stock = backbone(tiny_models, kind)
        stock.pipe.load_lora_weights(str(released[name]))
        reference = output(stock)
    else:
        reference = peft_reference(tiny_models, kind, released[name] / peft_folder)
        config = bb.net.peft_config["eval_0"]
        assert (config.r, config.lora_alpha) == (32, 64)  # rank and alpha from its adapter_config.json
    assert torch.allclose(ours, reference, atol=1e-5)
    # evaluate.py takes the folder as a LoRA (break 1: a PEFT folder was "neither ... nor config.json")
    assert evaluate.parse_methods([f"m={released[name]}"])[0]["parts"] == [("lora", str(released[name]))]


def test_init_lora_continues_the_flow_grpo_peft_lora(released, tiny_models):
    """--init_lora / COMPLEMENTARITY=1 on SD-3.5-M: Stage 1 starts from
    Flow-GRPO's PEFT folder; learner and reference both equal it, at its own
    rank and alpha, and only the learner trains."""
    reference = peft_reference(tiny_models, "sd3", released["flowgrpo-lora-sd3"])
    bb = backbone(tiny_models, "sd3")
    config = common.setup_lora_roles(bb, [common.LEARNER, common.REF], rank=4, alpha=4,
                                     init_lora=str(released["flowgrpo-lora-sd3"]))
    assert (config.r, config.lora_alpha) == (32, 64)
    for role in (common.LEARNER, common.REF):
        common.use_role(bb.net, role)
        assert torch.allclose(output(bb), reference, atol=1e-5)
    assert [p for p in bb.net.parameters() if p.requires_grad] == common.role_parameters(bb.net, common.LEARNER)


@pytest.mark.parametrize("kind", ["sd3", "sd15"])
def test_our_checkpoints_open_in_diffusers_peft_and_the_authors_layout(kind, tiny_models, tmp_path):
    bb = backbone(tiny_models, kind)
    config = common.setup_lora_roles(bb, [common.LEARNER], rank=4, alpha=8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in common.role_parameters(bb.net, common.LEARNER):
            param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    trained = output(bb)
    common.save_lora_checkpoint(bb, common.lora_state_dict(bb.net, common.LEARNER), config, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 8
    # PEFT's own loader (flow_grpo: PeftModel.from_pretrained(pipe.transformer, checkpoint))
    assert torch.allclose(peft_reference(tiny_models, kind, tmp_path), trained, atol=1e-5)
    # the authors' SD-3.5-M evaluation script: <checkpoint>/lora/learner, load_adapter(..., "learner")
    if kind == "sd3":
        authors = peft_reference(tiny_models, kind, tmp_path / "lora" / "learner", adapter_name="learner",
                                 is_trainable=False)
        assert torch.allclose(authors, trained, atol=1e-5)
    # diffusers' stock loader, and ours
    stock = backbone(tiny_models, kind)
    stock.pipe.load_lora_weights(str(tmp_path))
    assert torch.allclose(output(stock), trained, atol=1e-5)
    again = backbone(tiny_models, kind)
    common.load_lora_into(again, str(tmp_path), "eval_0")
    assert torch.allclose(output(again), trained, atol=1e-5)


def test_the_released_dpo_unet_loads_from_its_unet_subfolder(released, tiny_models):
    """mhdang/dpo-sd1.5-text2image-v1 keeps its UNet in unet/ (its model card:
    UNet2DConditionModel.from_pretrained(id, subfolder="unet"))."""
    from diffusers import UNet2DConditionModel

    folder = released["dpo-unet-sd15"]
    assert (folder / "unet" / "config.json").is_file() and not (folder / "config.json").exists()
    base = output(backbone(tiny_models, "sd15"))
    bb = backbone(tiny_models, "sd15")
    common.load_network_override(bb, str(folder))
    assert (output(bb) - base).abs().max() > 1e-2
    reference = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    assert torch.allclose(output(bb), output(bb, reference), atol=1e-5)
    assert evaluate.parse_methods([f"m={folder}"])[0]["parts"] == [("network", str(folder))]


def test_a_hub_id_resolves_to_its_published_layout_offline(released, tiny_models, tmp_path, monkeypatch):
    """A hub id is downloaded (here: found in a local hub cache laid out as
    huggingface_hub lays it out) and its files decide the format; the file
    lists of evaluate.py's hub_kind say "lora" for a PEFT repository."""
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--jieliu--SD3.5M-FlowGRPO-PickScore" / "snapshots" / ("0" * 40)
    shutil.copytree(released["flowgrpo-lora-sd3"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    bb = backbone(tiny_models, "sd3")
    common.load_lora_into(bb, "jieliu/SD3.5M-FlowGRPO-PickScore", "eval_0")
    assert torch.allclose(output(bb), peft_reference(tiny_models, "sd3", released["flowgrpo-lora-sd3"]), atol=1e-5)
    monkeypatch.setattr("huggingface_hub.list_repo_files", lambda repo_id: ["README.md", "adapter_config.json",
                                                                            "adapter_model.safetensors"])
    assert evaluate.hub_kind("jieliu/SD3.5M-FlowGRPO-PickScore") == "lora"


def test_a_lora_that_fits_nothing_or_is_ambiguous_is_a_clear_error(released, tiny_models, tmp_path):
    import shutil

    sd15 = backbone(tiny_models, "sd15")
    with pytest.raises(common.UserError, match="does not fit this sd15 unet .*other backbone"):
        common.load_lora_into(sd15, str(released["flowgrpo-lora-sd3"]), "eval_0")
    sd3 = backbone(tiny_models, "sd3")
    with pytest.raises(common.UserError, match="other backbone"):
        common.load_lora_into(sd3, str(released["realalign-lora-sd15"]), "eval_0")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="holds no LoRA"):
        common.load_lora_into(sd3, str(tmp_path / "empty"), "eval_0")
    for sub in ("a", "b"):
        shutil.copytree(released["flowgrpo-lora-sd3"], tmp_path / "two" / sub)
    with pytest.raises(common.UserError, match=r"holds 2 LoRAs \(in a, b\)"):
        common.load_lora_into(sd3, str(tmp_path / "two"), "eval_0")
