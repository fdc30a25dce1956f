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
