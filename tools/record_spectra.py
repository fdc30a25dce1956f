"""Record a sparse clean set's class spectra in an existing denoiser (``purify --deblur auto`` reads them).

``eclipse-stream train`` records them itself when its shards carry labels; this is for a denoiser trained before
it did, such as the shipped one (recorded from the CPU protocol's sparse set, the set it was trained on):

    python -m tools.record_spectra runs/eval-cpu/clean/sparse eclipse_stream/assets/default-denoiser.safetensors
"""

from __future__ import annotations

import argparse

from eclipse_stream.checkpoint import load_denoiser, record_class_spectra
from eclipse_stream.deblur import ClassSpectra


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sparse", help="the clean sparse set's shards (labelled), as train read them")
    ap.add_argument("denoiser", help="denoiser checkpoint to update")
    ap.add_argument("--out", help="write here instead of replacing DENOISER")
    args = ap.parse_args(argv)
    spectra = ClassSpectra.from_shards(args.sparse)
    record_class_spectra(args.denoiser, args.out or args.denoiser, spectra)
    den = load_denoiser(args.out or args.denoiser)
    print(f"recorded {len(den.class_spectra.spectra)} classes "
          f"({', '.join(f'{c}: {n}' for c, n in den.class_spectra.images.items())} images); sha256 {den.sha256}")


if __name__ == "__main__":
    main()
