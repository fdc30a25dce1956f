"""What ``purify --deblur auto`` decides on each set: the fit it runs before purifying, without purifying.

    python -m tools.deblur_decisions runs/eval-cpu/clean/train runs/eval-cpu/poisoned/cuda ... [--json out.json]

Per set and class: decision, largest gain (dB) and share of the spectral difference explained (the gate: over
``deblur.GATE_DB`` and at least ``deblur.MIN_EXPLAINED``; a class the 3x3 fit explains poorly is refitted 5x5 and
takes it only above ``deblur.WIDE_MIN_EXPLAINED`` and ``WIDE_MARGIN`` more), fitted against the denoiser's
recorded class spectra (default: the shipped denoiser).
"""

from __future__ import annotations

import argparse
import json
import time

from eclipse_stream.checkpoint import load_denoiser
from eclipse_stream.deblur import GATE_DB, MIN_EXPLAINED, fit_kernels_from_shards
from eclipse_stream.defaults import default_denoiser_path


def decide(sets, denoiser=None) -> dict:
    den = load_denoiser(denoiser or default_denoiser_path())
    if den.class_spectra is None:
        raise SystemExit(f"{den.path}: records no class spectra; --deblur auto would not deblur with it")
    out = {"denoiser_sha256": den.sha256, "gate_db": GATE_DB, "min_explained": MIN_EXPLAINED, "sets": {}}
    for path in sets:
        t0 = time.perf_counter()
        k = fit_kernels_from_shards(path, reference=den.class_spectra)
        out["sets"][str(path)] = {"deblurred": sorted(k.kernels), "classes": k.classes,
                                  "seconds": round(time.perf_counter() - t0, 1)}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="+", help="shard folders")
    ap.add_argument("--denoiser", help="default: the shipped one")
    ap.add_argument("--json", help="write the decisions here too")
    args = ap.parse_args(argv)
    res = decide(args.sets, args.denoiser)
    print("| set | classes deblurred (of them 5x5) | largest gain (dB) | largest share explained (3x3) | "
          "largest share explained by a wide (5x5) refit | fit seconds |")
    print("|---|---|---|---|---|---|")
    for path, r in res["sets"].items():
        cls = r["classes"].values()
        gain = max((c.get("gain_db", 0) for c in cls), default=0)
        expl = max((c.get("explained", 0) for c in cls), default=0)
        wide = [c["wide"]["explained"] for c in cls if "wide" in c]
        n_wide = sum(c.get("decision", "").startswith("deblurred (") for c in cls)
        print(f"| {path} | {len(r['deblurred'])} of {len(r['classes'])} ({n_wide}) | {gain:.2f} | {expl:.0%} | "
              f"{f'{max(wide):.0%} ({len(wide)} refitted)' if wide else 'none refitted'} | {r['seconds']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
