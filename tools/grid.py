"""Poisons x defenses grid: the harness behind our version of Tables 1 and 3.

Each cell trains one victim on one (poisoned or clean) training set under one defense and
records its test accuracy with the settings, device, torch version, git commit and time.
The results JSON is rewritten after every cell; cells already in it are skipped, and a
cell cut short by ``max_seconds`` continues from its per-epoch checkpoint on the next
call, so the grid can be filled by repeated 10-minute calls on a GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from eclipse_stream.fsutil import file_sha256

from .common import DEFAULT_WORK, ToolError, provenance, read_json, write_json
from .defenses import PurifyTimeout, get_defense, purify
from .paper import PAPER_POISONS, TABLE1_AVG, paper_value
from .poisons import POISONS
from .poisons.driver import NORMS, is_poisoned, poison_split
from .poisons.pgd import PoisonIncomplete
from .prepare import prepare
from .victim import VictimConfig, train_victim

SAFETY_SECONDS = 20  # left for writing results after the last epoch of a call


@dataclass
class GridConfig:
    """One grid: which cells, with which victim settings, where. Settings are fixed per results file."""

    poisons: list[str]
    defenses: list[str]
    work_dir: Path = DEFAULT_WORK
    results: Path | None = None
    data_dir: str | None = None
    limit_per_class: int | None = None
    recipe: str = "fast"
    epochs: int | None = None
    width: float = 1.0
    seed: int = 0
    device: str = "auto"
    denoiser: Path | None = None
    purify_batch_size: int | None = None
    purify_args: tuple[str, ...] = ()
    poison_options: dict = field(default_factory=dict)
    max_seconds: float | None = None

    def results_path(self) -> Path:
        return Path(self.results) if self.results else Path(self.work_dir) / f"results-{self.recipe}.json"

    def settings(self) -> dict:
        """What must agree between calls that fill the same results file."""
        return {"recipe": self.recipe, "epochs": self.epochs, "width": self.width, "seed": self.seed,
                "limit_per_class": self.limit_per_class, "poison_options": self.poison_options,
                "denoiser_sha256": file_sha256(self.denoiser) if self.denoiser and Path(self.denoiser).is_file()
                else None,
                "purify_args": list(self.purify_args)}


def cell_key(poison: str, defense: str) -> str:
    return f"{poison}/{defense}"


def _validate(cfg: GridConfig) -> None:
    """Fail before any work on a name typo or a missing denoiser, not hours into the grid."""
    for p in cfg.poisons:
        if p != "clean" and p not in POISONS:
            raise ToolError(f"unknown poison {p!r}; choose clean or one of {', '.join(POISONS)}")
    defenses = [get_defense(d) for d in cfg.defenses]
    if any(d.purify for d in defenses) and (cfg.denoiser is None or not Path(cfg.denoiser).is_file()):
        raise ToolError(f"ECLIPSE cells need --denoiser CKPT (an `eclipse-stream train` checkpoint); "
                        f"got {cfg.denoiser}")


def load_results(path: Path, settings: dict) -> dict:
    """Existing results (to resume) or a fresh record; refuse to mix different victim settings."""
    if path.is_file():
        results = read_json(path)
        if results.get("settings") != settings:
            raise ToolError(f"{path} was filled with settings {results.get('settings')}, not {settings}; "
                            "use another --results file")
        return results
    return {"settings": settings, "cells": {}}


class Clock:
    """Seconds left of this call's budget (None = unlimited)."""

    def __init__(self, max_seconds: float | None):
        self.t0, self.max_seconds = time.time(), max_seconds

    def left(self) -> float | None:
        return None if self.max_seconds is None else self.max_seconds - (time.time() - self.t0)

    def spent(self) -> bool:
        left = self.left()
        return left is not None and left <= SAFETY_SECONDS


def training_set(cfg: GridConfig, poison: str, defense_name: str, clock: Clock, log) -> tuple[Path, dict | None]:
    """The shard folder the victim trains on for a cell, producing poisons and purifications as needed."""
    work = Path(cfg.work_dir)
    clean = work / "clean" / "train"
    source, norms = clean, None
    if poison != "clean":
        source = work / "poisoned" / poison
        left = clock.left()
        if not is_poisoned(source):
            opts = dict(cfg.poison_options.get(poison, {}))
            if poison in ("em", "tap") and left is not None:
                opts["max_seconds"] = max(1.0, left - SAFETY_SECONDS)
            poison_split(poison, clean, source, seed=cfg.seed, device=cfg.device, options=opts, log=log)
        norms = read_json(source / NORMS)
    defense = get_defense(defense_name)
    if not defense.purify:
        return source, norms
    tag = poison if defense.purify_steps is None else f"{poison}-steps{defense.purify_steps}"
    left = clock.left()
    out = purify(source, work / "purified" / tag, cfg.denoiser, steps=defense.purify_steps,
                 device=None if cfg.device == "auto" else cfg.device, batch_size=cfg.purify_batch_size,
                 timeout=None if left is None else max(1.0, left - SAFETY_SECONDS),
                 extra_args=tuple(cfg.purify_args))
    return out, norms


def run_cell(cfg: GridConfig, poison: str, defense: str, clock: Clock, log) -> dict | None:
    """Train and evaluate one cell; None when the time budget stopped it (rerun to continue)."""
    t0 = time.time()
    train, norms = training_set(cfg, poison, defense, clock, log)
    left = clock.left()
    ckpt = Path(cfg.work_dir) / "checkpoints" / cfg.recipe / f"{poison}__{defense}.pt"
    result = train_victim(VictimConfig(
        train=str(train), test=str(Path(cfg.work_dir) / "clean" / "test"), recipe=cfg.recipe, defense=defense,
        epochs=cfg.epochs, width=cfg.width, device=cfg.device, seed=cfg.seed, checkpoint=str(ckpt), resume=True,
        max_seconds=None if left is None else max(1.0, left - SAFETY_SECONDS)), log=log)
    if not result["complete"]:
        return None
    result.pop("history", None)
    return {"poison": poison, "defense": defense, "accuracy": result["test_accuracy"],
            "paper": paper_value(poison, defense), "poison_norms": norms, "cell_seconds": round(time.time() - t0, 2),
            **result}


def run_grid(cfg: GridConfig, log=print) -> dict:
    """Fill every missing cell (poison-major, so each poisoned set is made once); returns the results."""
    _validate(cfg)
    clock = Clock(cfg.max_seconds)
    path = cfg.results_path()
    results = load_results(path, cfg.settings())
    prepare(cfg.data_dir, Path(cfg.work_dir) / "clean", limit_per_class=cfg.limit_per_class, beton=False)
    pending = [(p, d) for p in cfg.poisons for d in cfg.defenses if cell_key(p, d) not in results["cells"]]
    results["complete"] = False
    for poison, defense in pending:
        if clock.spent():
            break
        log(f"== cell {poison} x {defense}")
        try:
            record = run_cell(cfg, poison, defense, clock, log)
        except (PoisonIncomplete, PurifyTimeout) as exc:
            log(str(exc))
            break
        if record is None:
            break
        results["cells"][cell_key(poison, defense)] = record
        results["updated_by"] = provenance(record["settings"]["device"])
        write_json(path, results)
        write_reports(results, path)
    results["complete"] = all(cell_key(p, d) in results["cells"] for p in cfg.poisons for d in cfg.defenses)
    write_json(path, results)
    write_reports(results, path)
    missing = len(cfg.poisons) * len(cfg.defenses) - sum(
        cell_key(p, d) in results["cells"] for p in cfg.poisons for d in cfg.defenses)
    log(f"{path}: {missing} cell(s) left" + ("; rerun the same command to continue" if missing else ""))
    return results


# ---- reports ---------------------------------------------------------------------------------------

def _columns(results: dict) -> tuple[list[str], list[str]]:
    """Poison columns in the paper's order (then ours, then clean) and defense rows, for all cells present."""
    cells = results["cells"].values()
    poisons = {c["poison"] for c in cells}
    order = list(PAPER_POISONS) + [p for p in POISONS if p not in PAPER_POISONS]
    cols = [p for p in order if p in poisons or p in PAPER_POISONS] + ["clean"]
    rows = list(dict.fromkeys(["none", "iss-gray", "iss-jpeg10", "corruption", "eclipse",
                               *[c["defense"] for c in cells]]))
    return cols, rows


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_table(results: dict) -> str:
    """Table 1 + Table 3 side by side: each cell is ``ours (paper)``; — where not measured / not reported."""
    cols, rows = _columns(results)
    cells = results["cells"]
    head = "| defense | " + " | ".join(c.upper() if c != "clean" else "clean (Table 3)" for c in cols)
    lines = [head + " | paper avg (Table 1) |", "|---" * (len(cols) + 2) + "|"]
    for d in rows:
        vals = []
        for p in cols:
            ours = cells.get(cell_key(p, d), {}).get("accuracy")
            vals.append(f"{_fmt(ours)} ({_fmt(paper_value(p, d))})")
        lines.append(f"| {d} | " + " | ".join(vals) + f" | {_fmt(TABLE1_AVG.get(d))} |")
    settings = results.get("settings", {})
    devices = sorted({c.get("device", "?") for c in cells.values()})
    commits = sorted({c.get("git_commit", "?") for c in cells.values()})
    note = (f"\nCells: ours (paper), CIFAR-10 test accuracy %, ResNet18. Recipe {settings.get('recipe')}, "
            f"epochs {settings.get('epochs') or 'recipe default'}, width {settings.get('width')}, "
            f"seed {settings.get('seed')}, limit per class {settings.get('limit_per_class')}. "
            f"Measured on: {', '.join(devices) or 'nothing yet'}; commits: {', '.join(commits) or '—'}. "
            "Paper averages include its adaptive attack column.\n")
    return "\n".join(lines) + "\n" + note


def bar_plot(results: dict, path: Path) -> None:
    """Grouped bars of our accuracies per poison and defense, with the paper's values as black ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cols, rows = _columns(results)
    cells = results["cells"]
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(cols)), 4.2))
    width = 0.8 / max(1, len(rows))
    colors = plt.get_cmap("tab10").colors
    for i, d in enumerate(rows):
        color = colors[i % len(colors)]
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(cols))]
        ours = [(x, cells.get(cell_key(p, d), {}).get("accuracy")) for x, p in zip(xs, cols)]
        ours = [(x, v) for x, v in ours if v is not None]
        ax.bar([x for x, _ in ours], [v for _, v in ours], width=width, color=color)
        paper = [(x, paper_value(p, d)) for x, p in zip(xs, cols) if paper_value(p, d) is not None]
        if paper:
            ax.scatter(*zip(*paper), marker="_", s=140, linewidths=2.5, color=color, zorder=3)
    ax.set_xticks(range(len(cols)), [c.upper() if c != "clean" else "clean" for c in cols])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    handles = [Patch(color=colors[i % len(colors)], label=d) for i, d in enumerate(rows)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="defense",
              title_fontsize=7)
    ax.set_title("CIFAR-10 ResNet18 test accuracy: ours (bars) vs paper (ticks, same colour)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(results: dict, results_path: Path) -> tuple[Path, Path]:
    """``<results>.md`` and ``<results>.png`` beside the JSON."""
    md, png = results_path.with_suffix(".md"), results_path.with_suffix(".png")
    md.write_text(markdown_table(results))
    bar_plot(results, png)
    return md, png

