"""`--help` answers: every flag of every script states its default, once."""
import re

import pytest

import common
import curate
import evaluate
import train_dpo
import train_dro

SCRIPTS = {
    "curate.py": (curate.parse_args, []),
    "train_dro.py": (train_dro.parse_args, []),
    "train_dpo.py": (train_dpo.parse_args, []),
    "evaluate.py": (evaluate.parse_args, []),
    "evaluate.py score": (evaluate.parse_args, ["score"]),
    "evaluate.py userstudy": (evaluate.parse_args, ["userstudy"]),
}


def help_text(parse_args, prefix, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(prefix + ["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def option_blocks(text):
    """{'--flag': its help text} from argparse's --help output: an option's
    block starts with two spaces and a dash and runs until the next one or
    the next unindented line (a group heading)."""
    blocks, current = {}, None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            current = line.split()[0].rstrip(",")
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {flag: " ".join(block.split()) for flag, block in blocks.items()}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_flag_states_its_default_once(script, capsys):
    parse_args, prefix = SCRIPTS[script]
    blocks = option_blocks(help_text(parse_args, prefix, capsys))
    assert len(blocks) > 5  # the parser was read
    for flag, block in blocks.items():
        if flag == "-h":
            continue
        defaults = len(re.findall("default", block, flags=re.IGNORECASE))
        if "(required)" in block:
            assert defaults == 0, f"{script} {flag}: a required flag shows a default: {block}"
        else:
            assert defaults == 1, f"{script} {flag} shows {defaults} defaults: {block}"


@pytest.mark.parametrize("script", ["train_dro.py", "train_dpo.py"])
def test_backbone_dependent_defaults_show_both_values(script, capsys):
    parse_args, prefix = SCRIPTS[script]
    blocks = option_blocks(help_text(parse_args, prefix, capsys))
    stage = "dro" if script == "train_dro.py" else "dpo"
    # read from the same tables apply_backbone_defaults uses, so the help cannot drift from the code
    assert common.STAGE_DEFAULTS["dro"]["sd15"]["learning_rate"] == 1e-4
    if stage == "dro":
        assert "(default: SD-1.5: 1e-4, SD-3.5-M: 2e-4)" in blocks["--learning_rate"]
        assert "(default: SD-1.5: 20, SD-3.5-M: 10)" in blocks["--sampler_steps"]
    else:
        assert "(default: 2.56e-6 for both backbones)" in blocks["--learning_rate"]
        assert "(default: SD-1.5: 2000, SD-3.5-M: 100)" in blocks["--beta"]
    assert "(default: SD-1.5: 4, SD-3.5-M: 32)" in blocks["--lora_rank"]
    assert "(default: SD-1.5: 7.5, SD-3.5-M: 4.5)" in blocks["--guidance_scale"]
    assert "(default: None)" not in " ".join(blocks.values())


def test_backbone_default_help_follows_the_tables(monkeypatch):
    monkeypatch.setitem(common.STAGE_DEFAULTS["dpo"]["sd3"], "beta", 250.0)
    assert common.backbone_default_help("beta", "dpo") == "default: SD-1.5: 2000, SD-3.5-M: 250"
    assert common.backbone_default_help("max_train_steps", "dro") == "default: 3200 for both backbones"
