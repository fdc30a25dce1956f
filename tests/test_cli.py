"""The command line: --help everywhere, version, info."""

import json

import pytest
from click.testing import CliRunner

from eclipse_stream import __version__
from eclipse_stream.cli import main


@pytest.mark.parametrize("command", [[], ["train"], ["purify"], ["preview"], ["info"]])
def test_help_on_every_subcommand(command):
    r = CliRunner().invoke(main, [*command, "--help"])
    assert r.exit_code == 0 and "Usage: " in r.output


def test_version_and_info(tiny_ckpt):
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(main, ["info", str(tiny_ckpt)])
    assert r.exit_code == 0
    meta = json.loads(r.output)
    assert meta["kind"] == "denoiser" and meta["unet"]["model_channels"] == 32 and len(meta["sha256"]) == 64


def test_bad_option_values_are_usage_errors(tmp_path, tiny_ckpt, shard_dir):
    r = CliRunner().invoke(main, ["purify", str(shard_dir), str(tmp_path / "o"), "-d", str(tiny_ckpt),
                                  "--steps", "500"])
    assert r.exit_code == 2 and "steps must be between 1 and t_star=100" in r.output
    r = CliRunner().invoke(main, ["purify", str(shard_dir), str(tmp_path / "o"), "-d", str(tiny_ckpt),
                                  "--jpeg-quality", "0"])
    assert r.exit_code == 2 and "JPEG quality" in r.output
    r = CliRunner().invoke(main, ["purify", str(shard_dir), str(tmp_path / "o"), "-d", str(tiny_ckpt),
                                  "--max-pixels", "0"])  # not silently the default
    assert r.exit_code == 2 and "max pixels must be >= 1" in r.output
    r = CliRunner().invoke(main, ["purify", str(shard_dir), str(tmp_path / "o"), "-d", str(tiny_ckpt),
                                  "--tile-batch-pixels", "0"])
    assert r.exit_code == 2 and "tile batch pixels must be an integer in 1.." in r.output


# --- one source of defaults: every option that names a config field has that field's default -----------------

def _config_classes(command: str) -> list:
    from eclipse_stream.config import PurifierConfig, PurifyConfig
    from eclipse_stream.scan import ScanConfig
    from eclipse_stream.train import TrainConfig

    return {"purify": [PurifyConfig, PurifierConfig], "preview": [PurifierConfig, PurifyConfig],
            "train": [TrainConfig], "scan": [ScanConfig]}[command]


@pytest.mark.parametrize("command", ["purify", "preview", "train", "scan"])
def test_every_option_default_is_its_config_fields_default(command):
    import dataclasses

    from eclipse_stream.config import default_of

    checked = 0
    for param in main.commands[command].params:
        for cls in _config_classes(command):
            names = {f.name for f in dataclasses.fields(cls)}
            if param.name not in names:
                continue
            want = default_of(cls, param.name)
            if want is dataclasses.MISSING:
                break  # a required field (train's --out)
            if param.default is None and param.name in ("workers", "steps", "prefilter", "threshold", "clean_below"):
                break  # None: "the config's own default" (one per core, the recipe's, ...), said in the help
            got = param.default
            if getattr(param, "is_flag", False) and not isinstance(got, bool):  # click's unset flag: off
                got = False
            if isinstance(want, int) and isinstance(got, str):  # Choice of numbers, e.g. --image-size
                got = int(got)
            assert got == want, f"{command} --{param.name.replace('_', '-')}: {got!r} != {cls.__name__}.{want!r}"
            checked += 1
            break
    assert checked >= 3


def test_choices_come_from_the_one_list_of_each():
    from eclipse_stream import defaults
    from eclipse_stream.purifier import PRECISIONS
    from eclipse_stream.unet import CHANNEL_MULT, PRESETS

    choices = {p.name: tuple(p.type.choices) for c in main.commands.values() for p in c.params
               if hasattr(p.type, "choices")}
    assert choices["resolution"] == defaults.RESOLUTIONS and choices["preset"] == defaults.PRESETS
    assert tuple(PRECISIONS) == defaults.PRECISIONS and tuple(PRESETS) == defaults.PRESETS
    assert tuple(CHANNEL_MULT) == defaults.IMAGE_SIZES


def test_one_list_of_image_fields_everywhere():
    from eclipse_stream import imageio, transform
    from eclipse_stream.defaults import IMAGE_EXTENSIONS

    assert imageio.IMAGE_EXTENSIONS is IMAGE_EXTENSIONS
    assert transform.DEFAULT_IMAGE_KEYS.split(";") == list(IMAGE_EXTENSIONS)
    assert imageio.image_fields({"a.gif": b"", "b.TIFF": b"", "cls": b""}) == ["a.gif", "b.TIFF"]
