"""Split the medical abstracts into train/dev and few-shot training subsets, seeded and stratified.

    python examples/medical_abstracts/split.py

Reads ../data/medical_abstracts/abstracts.csv (2,310 abstracts, 5 condition classes) and writes,
next to this script, CSV files with the columns ``text,label`` where ``label`` is the condition's
name from labels.csv (so that the files read on their own):

- ``train.csv`` / ``dev.csv``: 80% / 20%, stratified by class, seed 0;
- ``train_64_seed{0,1,2}.csv`` and ``train_256_seed{0,1,2}.csv``: stratified samples of train.csv
  of 64 and 256 rows, one per seed, for the few-shot comparisons.

The outputs are committed; running the script again rewrites them byte for byte.
"""

from __future__ import annotations

import csv
from pathlib import Path

from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data" / "medical_abstracts"
SEED = 0
DEV_FRACTION = 0.2
FEW_SHOT_SIZES = (64, 256)
FEW_SHOT_SEEDS = (0, 1, 2)


def read_labels(path: Path) -> dict[str, str]:
    """``condition_label`` (as written in abstracts.csv, "1".."5") -> condition name."""
    with open(path, newline="", encoding="utf-8") as f:
        return {row["condition_label"]: row["condition_name"] for row in csv.DictReader(f)}


def read_abstracts(path: Path, names: dict[str, str]) -> list[tuple[str, str]]:
    """The corpus as ``(text, condition name)`` rows, in file order."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    unknown = sorted({row["condition_label"] for row in rows} - set(names))
    if unknown:
        raise ValueError(f"{path} uses condition labels {unknown} that labels.csv does not name: fix labels.csv")
    return [(row["medical_abstract"], names[row["condition_label"]]) for row in rows]


def write_rows(path: Path, rows: list[tuple[str, str]]) -> None:
    """Write ``text,label`` rows; the csv module quotes texts holding commas, quotes or newlines."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def stratified_sample(rows: list[tuple[str, str]], size: int | float, seed: int) -> tuple[list, list]:
    """``(sample, rest)``: ``size`` rows (a count, or a fraction) drawn with the class mix of ``rows``."""
    sample, rest = train_test_split(rows, train_size=size, stratify=[label for _, label in rows], random_state=seed)
    return sample, rest


def main() -> None:
    names = read_labels(DATA / "labels.csv")
    rows = read_abstracts(DATA / "abstracts.csv", names)
    train, dev = stratified_sample(rows, 1 - DEV_FRACTION, SEED)
    write_rows(HERE / "train.csv", train)
    write_rows(HERE / "dev.csv", dev)
    print(f"train.csv: {len(train)} rows, dev.csv: {len(dev)} rows")
    for size in FEW_SHOT_SIZES:
        for seed in FEW_SHOT_SEEDS:
            subset, _ = stratified_sample(train, size, seed)
            write_rows(HERE / f"train_{size}_seed{seed}.csv", subset)
            print(f"train_{size}_seed{seed}.csv: {len(subset)} rows")


if __name__ == "__main__":
    main()
