"""Poison generators: small functions ``generate(images, labels, seed, ...) -> delta``.

``images`` are uint8 NHWC clean pixels, ``labels`` int64, and the returned delta is a
float32 NHWC perturbation in [0, 1] pixel units; each module's ``BUDGET`` is the norm
bound that :func:`tools.poisons.base.quantize` enforces when the poisoned images are
stored. :mod:`tools.poisons.driver` reads clean shards and writes poisoned ones. URP, LSP, AR
and OPS take seconds on a CPU for all of CIFAR-10; EM and TAP train models (run them on a GPU).
"""

from . import ar, em, lsp, ops, tap, urp

POISONS = {"urp": urp, "lsp": lsp, "ar": ar, "ops": ops, "em": em, "tap": tap}
