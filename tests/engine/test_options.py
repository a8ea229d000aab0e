"""`engine synthesize` flags come from the config dataclasses: every field has one flag, every
default is the dataclass's, every flag name the CLI ever had still works, and parsed flags become
the SynthesizeConfig the dataclasses describe."""

import dataclasses
from pathlib import Path

import pytest
import typer

import engine.cli as cli
from engine.options import NESTED, SYNTHESIZE_FLAGS, TARGETS
from pipelines.captioners import CaptionerConfig
from pipelines.maskers import MaskerConfig
from pipelines.quality import QualityConfig
from pipelines.sources import SourceConfig
from pipelines.synthesize import SynthesizeConfig

# the flags of `engine synthesize` before they were generated (README and tests use them)
OLD_FLAGS = """--source --out --root --annotations --split --bbox-format --masker --captioner
--unit-size --workers --executor --ray-address --limit --remask --no-remask --overwrite
--no-overwrite --sam-checkpoint --sam-model --mask-model --caption-model --captions-per-object
--device --dtype --multimask --no-multimask --min-region-area --box-chunk --caption-batch-size
--caption-max-tokens --min-box-iou --min-box-fill --max-components --min-pred-iou
--min-stability --verbose -v""".split()


def synthesize_params() -> dict[str, object]:
    """The click parameters of the real `engine synthesize` command, by parameter name."""
    group = typer.main.get_command(cli.app)
    command = group.commands["synthesize"]
    return {p.name: p for p in command.params if p.name != "help"}


def test_every_config_field_has_exactly_one_flag():
    filled: dict[tuple[str, str], str] = {}
    for flag in SYNTHESIZE_FLAGS:
        for target in flag.targets:
            assert (target, flag.field) not in filled, (target, flag.field)
            filled[(target, flag.field)] = flag.param
    for target, cls in TARGETS.items():
        for f in dataclasses.fields(cls):
            if target == "run" and f.name in NESTED:
                continue  # the nested configs themselves
            assert (target, f.name) in filled, f"{cls.__name__}.{f.name} has no flag"


def test_each_cli_default_is_the_dataclass_default():
    params = synthesize_params()
    checked = 0
    for target, cls in TARGETS.items():
        instance_defaults = {f.name: f.default for f in dataclasses.fields(cls)
                             if f.default is not dataclasses.MISSING}
        for flag in SYNTHESIZE_FLAGS:
            if target in flag.targets and flag.field in instance_defaults:
                assert params[flag.param].default == instance_defaults[flag.field], flag.param
                checked += 1
    assert checked >= 30
    # the fields their dataclasses leave open get the CLI's documented defaults
    assert params["source"].default == "demo" and params["out"].default == Path("runs/demo")
    # one flag fills both stages: their dataclass defaults agree
    assert MaskerConfig().device == CaptionerConfig().device == params["device"].default
    assert MaskerConfig().dtype == CaptionerConfig().dtype == params["dtype"].default


def test_old_flag_names_still_work_and_help_has_panels():
    names = {opt for p in synthesize_params().values() for opt in (*p.opts, *p.secondary_opts)}
    assert set(OLD_FLAGS) <= names
    assert {"--keep-fallback", "--grabcut-iterations", "--caption-beams"} <= names
    panels = {p.rich_help_panel for p in synthesize_params().values()}
    assert panels == {"Source", "Models", "Quality", "Execution"}


@pytest.fixture
def parsed(monkeypatch):
    """Run `engine synthesize FLAGS` up to the config it would run; return that config."""
    seen = []
    monkeypatch.setattr(cli, "_run_with_progress", lambda cfg: seen.append(cfg) or _Stop())
    monkeypatch.setattr(cli, "_print_summary", lambda summary: None)

    def parse(*flags: str) -> SynthesizeConfig:
        assert cli.main(["synthesize", *flags]) == 0
        return seen[-1]

    return parse


class _Stop:
    pass


def test_no_flags_give_the_dataclass_config(parsed):
    assert parsed() == SynthesizeConfig(source=SourceConfig("demo"), out=Path("runs/demo"))


def test_flags_reach_their_fields(parsed):
    cfg = parsed("--keep-fallback", "--min-pred-iou", "0.7", "--device", "cpu", "--no-multimask",
                 "--source", "coco", "--root", "/data", "--unit-size", "9", "--caption-beams", "4")
    assert cfg.quality == QualityConfig(min_pred_iou=0.7, keep_fallback=True)
    assert cfg.masker == MaskerConfig(device="cpu", multimask=False)
    assert cfg.captioner == CaptionerConfig(device="cpu", caption_beams=4)
    assert cfg.source == SourceConfig("coco", root=Path("/data"))
    assert cfg.unit_size == 9
