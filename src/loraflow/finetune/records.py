"""Reading a user's record files for ``loraflow finetune``: CSV and JSON Lines rows, and where each row sits.

Every problem is a ValueError (or FileNotFoundError) naming the file, the line or row, the problem and
the fix.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

ROW_SUFFIXES = (".jsonl", ".json", ".csv")
JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


class Rows(list):
    """The records of a file, with ``where[i]`` naming record i's place in it: "line 7" or "row 3".

    A plain ``list[dict]`` to its callers; the places let later checks (``classification_examples``)
    name the true line of a JSONL record even when blank lines were skipped before it.
    """

    def __init__(self, rows: list[dict], where: list[str]):
        super().__init__(rows)
        self.where = where


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The records of a ``.csv`` (header row first) or ``.jsonl``/``.json`` (one object per line) file."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise ValueError(f"{path} is a folder: name a .csv, .jsonl or .json file in it")
        raise FileNotFoundError(f"{path} does not exist: check the path")
    suffix = path.suffix.lower()
    if suffix not in ROW_SUFFIXES:
        raise ValueError(f"{path} has the extension '{suffix}'; accepted: .csv, .jsonl, .json (one object per line)")
    try:
        rows = _read_csv(path) if suffix == ".csv" else _read_jsonl(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start} cannot be decoded): save it as UTF-8") from None
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def _read_csv(path: Path) -> Rows:
    csv.field_size_limit(2**31 - 1)  # the default 128 KiB refuses long documents; a C long holds this everywhere
    rows, where = [], []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            for number, row in enumerate(reader, start=2):  # the header is row 1
                if None in row:
                    raise ValueError(
                        f"{path} row {number} has {len(reader.fieldnames) + len(row[None])} fields but the header "
                        f"has {len(reader.fieldnames)}: put fields that contain commas in double quotes"
                    )
                rows.append(row)
                where.append(f"row {number}")
        except csv.Error as e:
            raise ValueError(
                f"{path} near line {reader.line_num} is not valid CSV ({e}): fix or re-export it"
            ) from None
    return Rows(rows, where)


def _read_jsonl(path: Path) -> Rows:
    rows, where = [], []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path} line {number} is not valid JSON ({e.msg} at column {e.colno}): write one complete "
                    "JSON object per line (JSON Lines; a pretty-printed file or one JSON array must be rewritten)"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path} line {number} is {JSON_TYPES.get(type(record), 'null')}, not a JSON object: "
                    'write one object per line, such as {"prompt": "...", "completion": "..."}'
                )
            rows.append(record)
            where.append(f"line {number}")
    return Rows(rows, where)


def places(rows: list[dict], source: str) -> list[str]:
    """Where each row sits in its file: kept by read_rows, else counted (CSV: the header is row 1)."""
    if isinstance(rows, Rows) and len(rows.where) == len(rows):
        return rows.where
    first = 2 if str(source).lower().endswith(".csv") else 1
    return [f"row {i + first}" for i in range(len(rows))]
