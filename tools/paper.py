"""The ECLIPSE paper's published numbers (CIFAR-10, ResNet18, test accuracy %), for side-by-side tables.

Table 1 (poisoned training sets) and Table 3 (clean accuracy: the defense applied to
clean training data), as transcribed in /work/shared/paper/NOTES.md and the paper text.
Our defense names map to the paper's rows: none = "w/o", iss-gray = ISS-G,
iss-jpeg10 = ISS-J, eclipse = ECLIPSE.
"""

from __future__ import annotations

PAPER_POISONS = ("em", "tap", "rem", "sep", "efp", "urp", "lsp", "ar")

TABLE1 = {
    "none":       {"em": 17.58, "tap": 26.16, "rem": 27.34, "sep": 9.01, "efp": 86.64, "urp": 16.80,
                   "lsp": 24.48, "ar": 10.59},
    "iss-gray":   {"em": 88.42, "tap": 21.88, "rem": 65.29, "sep": 7.57, "efp": 86.54, "urp": 60.64,
                   "lsp": 65.89, "ar": 38.64},
    "iss-jpeg10": {"em": 78.35, "tap": 80.77, "rem": 81.54, "sep": 80.93, "efp": 70.54, "urp": 81.27,
                   "lsp": 79.55, "ar": 81.39},
    "eclipse":    {"em": 82.80, "tap": 86.13, "rem": 82.72, "sep": 82.85, "efp": 77.20, "urp": 86.98,
                   "lsp": 84.58, "ar": 87.32},
}

# Row averages as printed in Table 1; they include the paper's adaptive attack (ADP) column.
TABLE1_AVG = {"none": 27.17, "iss-gray": 52.14, "iss-jpeg10": 79.48, "eclipse": 83.69}

# Table 3, ResNet18: clean accuracy (defense applied to the clean training set).
TABLE3_CLEAN = {"none": 94.95, "iss-jpeg10": 85.23, "eclipse": 90.43}


def paper_value(poison: str, defense: str) -> float | None:
    """The paper's number for a cell, or None where the paper has none (e.g. OPS, or corruption alone)."""
    if poison == "clean":
        return TABLE3_CLEAN.get(defense)
    return TABLE1.get(defense, {}).get(poison)
