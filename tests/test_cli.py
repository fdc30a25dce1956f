"""The command line: --help everywhere, version, info."""

import json

import pytest
from click.testing import CliRunner

from eclipse_stream import __version__
from eclipse_stream.cli import main
from eclipse_stream.defaults import DEFAULT_RECIPE, RECIPES


@pytest.mark.parametrize("command", [[], ["train"], ["purify"], ["preview"], ["scan"], ["info"], ["convert"]])
def test_help_on_every_subcommand(command):
    r = CliRunner().invoke(main, [*command, "--help"])
    assert r.exit_code == 0 and "Usage: " in r.output


@pytest.mark.parametrize("command", ["purify", "preview"])
def test_help_states_each_recipes_own_t_star(command):
    # the help once said "robust 200" after the default had moved to 300: it now reads the recipe table
    r = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
    text = " ".join(r.output.split())
    for name, recipe in RECIPES.items():
        assert f"{name} {recipe['t_star']}" in text


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
    assert r.exit_code == 2 and "steps must be between 1 and t_star=300" in r.output
    r = CliRunner().invoke(main, ["purify", str(shard_dir), str(tmp_path / "o"), "-d", str(tiny_ckpt),
                                  "--jpeg-quality", "0"])
    assert r.exit_code == 2 and "JPEG quality" in r.output
    r = CliRunner().invoke(main, ["purify", str(shard_dir), str(tmp_path / "o"), "-d", str(tiny_ckpt),
                                  "--max-pixels", "0"])  # not silently the default
    assert r.exit_code == 2 and "max pixels must be >= 1" in r.output
    r = CliRunner().invoke(main, ["purify", str(shard_dir), str(tmp_path / "o"), "-d", str(tiny_ckpt),
                                  "--tile-batch-pixels", "0"])
    assert r.exit_code == 2 and "tile batch pixels must be an integer in 1.." in r.output


# --- one source of defaults: every option takes its default from its command's config -------------------------

def _sources(command: str) -> list:
    """Where each command's defaults are written: its config dataclasses (preview: its Python function)."""
    from eclipse_stream.config import PurifierConfig, PurifyConfig
    from eclipse_stream.convert import ConvertConfig
    from eclipse_stream.deblur import fit_kernels_from_shards
    from eclipse_stream.preview import preview
    from eclipse_stream.scan import ScanConfig
    from eclipse_stream.train import TrainConfig

    return {"purify": [PurifyConfig, PurifierConfig], "preview": [preview, PurifierConfig],
            "train": [TrainConfig], "scan": [ScanConfig], "convert": [ConvertConfig], "info": [],
            "fit-kernels": [fit_kernels_from_shards]}[command]


#: Options that are no field of their command's config, each for a reason (None: click's "not given").
NOT_A_FIELD = {
    "storage_options": None,  # sets fsspec options as it is parsed, no value
    "quiet": False,  # the progress bar, not a setting of the run
    "denoiser": None,  # None: the shipped denoiser
    "recipe": DEFAULT_RECIPE,  # the name of a set of PurifierConfig values
    "steps": None, "prefilter": None, "t_star": None,  # None: the recipe's (PurifierConfig.from_recipe)
    "deblur": None,  # None: the recipe's (defaults.RECIPE_DEBLUR: off for paper); PurifyConfig.deblur is "auto"
    "reference": (),  # scan: clean shards to compare with
    "report": None, "plot": None,  # scan's output files: none unless asked for
    "clean": (), "out": None,  # fit-kernels: the clean set's shards and the output file (both required)
}


def _default(source, name):
    """The default of field ``name`` of a dataclass (its factory called) or of keyword ``name`` of a function;
    MISSING when it has none."""
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(source):
        f = next(f for f in dataclasses.fields(source) if f.name == name)
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    default = inspect.signature(source).parameters[name].default
    return dataclasses.MISSING if default is inspect.Parameter.empty else default


def _defaults_received(command) -> dict:
    """What ``command``'s function receives for each option that is not given: click's own processing of the
    defaults (factories called, types and choices converted, flags off), without running the command."""
    ctx = command.make_context(command.name or "cmd", [], resilient_parsing=True)  # missing arguments: None
    return ctx.params


def _option_field_disagreements(command, sources: list) -> list[str]:
    """Every option of ``command`` whose default is not its config field's (or names no field and is not in
    NOT_A_FIELD with that default)."""
    import dataclasses

    import click

    received = _defaults_received(command)
    problems = []
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        name = param.name.rstrip("_")  # --compile is compile_ in Python
        option = f"--{name.replace('_', '-')}"
        if param.required:  # no default: train --out, preview --output
            continue
        got = received.get(param.name)  # an option that exposes no value (--storage-options): None
        if name in NOT_A_FIELD:
            if got != NOT_A_FIELD[name]:
                problems.append(f"{option}: {got!r}, not {NOT_A_FIELD[name]!r}")
            continue
        source = next((s for s in sources if name in _names(s)), None)
        if source is None:
            problems.append(f"{option} is no field of {[s.__name__ for s in sources]}")
            continue
        want = _default(source, name)
        if want is dataclasses.MISSING:
            problems.append(f"{option}: {source.__name__}.{name} has no default but the option is optional")
            continue
        if isinstance(want, int) and not isinstance(want, bool) and isinstance(got, str):  # Choice of numbers
            got = int(got)
        if got != want or type(got) is not type(want):
            problems.append(f"{option}: {got!r} != {source.__name__}.{name} = {want!r}")
    return problems


def _names(source) -> set:
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(source):
        return {f.name for f in dataclasses.fields(source)}
    return set(inspect.signature(source).parameters)


@pytest.mark.parametrize("command", ["purify", "preview", "train", "scan", "convert", "info", "fit-kernels"])
def test_every_option_default_is_its_config_fields_default(command):
    # a new command: add it
    assert set(main.commands) == {"purify", "preview", "train", "scan", "convert", "info", "fit-kernels"}
    assert _option_field_disagreements(main.commands[command], _sources(command)) == []


def test_a_disagreeing_option_is_caught():
    import click

    from eclipse_stream.config import PurifierConfig, PurifyConfig

    @click.command()
    @click.option("--batch-size", type=int, default=63)
    @click.option("--gray-p", type=float, default=0.4)
    @click.option("--noise-sigma", type=int, default=0)  # right value, wrong type
    @click.option("--not-a-setting", type=int, default=1)
    @click.option("--overwrite/--no-overwrite", default=True)
    def cmd(**kwargs):
        pass

    problems = _option_field_disagreements(cmd, [PurifyConfig, PurifierConfig])
    assert [p.split(":")[0].split()[0] for p in problems] == [
        "--batch-size", "--noise-sigma", "--not-a-setting", "--overwrite"], problems


@pytest.mark.parametrize("command", ["purify", "preview", "train", "scan", "convert"])
def test_help_shows_every_default(command):
    """An option with a default other than None / off says it in --help (the context's show_default)."""
    import click

    cmd = main.commands[command]
    received = _defaults_received(cmd)
    parent = click.Context(main, info_name="eclipse-stream", **main.context_settings)  # show_default=True
    ctx = click.Context(cmd, info_name=command, parent=parent)
    shown = 0
    for param in cmd.get_params(ctx):
        if not isinstance(param, click.Option) or received.get(param.name) in (None, False, ()):
            continue
        assert "[default: " in param.get_help_record(ctx)[1], f"{command} {param.opts}"
        shown += 1
    assert shown >= 3


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


def test_readme_command_lines_parse(tmp_path, monkeypatch):
    """Every line of README's Commands block names a real subcommand with real options and valid values
    (click parses it: an option renamed or a choice dropped fails here)."""
    import re
    import shlex
    from pathlib import Path

    import click

    from eclipse_stream.cli import main as cli_main

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- snippet: commands[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README has no commands snippet"
    for d in ("sparse", "shards"):
        (tmp_path / d).mkdir()
    for f in ("shards/train-000000.tar", "denoiser.safetensors", "ema_0.9999_250000.pt"):
        (tmp_path / f).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    seen = set()
    for line in block.group(1).strip().splitlines():
        words = shlex.split(line, comments=True)
        args = words[1:] if words[0] == "eclipse-stream" else words[words.index("eclipse_stream.cli") + 1:]
        command = cli_main.commands[args[0]]
        with click.Context(cli_main) as parent:
            command.make_context(args[0], args[1:], parent=parent)  # raises on an unknown option or bad value
        seen.add(args[0])
    assert {"train", "purify", "preview", "scan", "info", "convert"} <= seen
