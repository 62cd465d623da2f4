"""Where dataset rows come from: a `.jsonl` or `.parquet` file, a `datasets` `save_to_disk` folder, or a hub name.

`read_records` yields each record as (where, row) or (where, RowError), `where` naming the file and line
(or row) for error messages. Hub datasets take a subset (e.g. "main" of openai/gsm8k) and a split; a
`save_to_disk` folder of a DatasetDict takes the split. Nothing else is read: no loading scripts run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from rlhf_ray.prompts import RowError

Record = tuple[str, dict[str, Any] | RowError]  # (where, row or why it is not one)


class DataError(ValueError):
    """A dataset that cannot be trained on; the message names the file, row, field and the fix."""


def read_records(path: str, split: str = "train", subset: str = "") -> Iterator[Record]:
    """Every record of a source as (where, row) or (where, RowError); blank JSONL lines are not records."""
    if not path:
        raise DataError("dataset path is empty (fix: set `path` of this dataset to a .jsonl/.parquet file, a "
                        "save_to_disk folder or a hub dataset name)")
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix == ".jsonl":
            return _read_jsonl(p)
        if p.suffix == ".parquet":
            return _read_parquet(p)
        raise DataError(f"{path}: unsupported file type {p.suffix!r} (fix: convert it to .jsonl or .parquet)")
    if p.is_dir():
        return _read_disk(p, split)
    if p.suffix in (".jsonl", ".parquet", ".json") or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: no such file (fix: check the path; it is read relative to {Path.cwd()})")
    return _read_hub(path, split, subset)


def _read_jsonl(path: Path) -> Iterator[Record]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            if b"\x00" in raw:
                yield where, RowError("", "NUL byte in the line",
                                      "remove it; a file full of NUL bytes is likely UTF-16: re-encode it as UTF-8",
                                      "nul_byte")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, RowError("", f"invalid UTF-8 at byte offset {err.start}", "re-encode the file as UTF-8",
                                      "invalid_utf8")
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                yield where, RowError("", f"invalid JSON: {err.msg} at column {err.colno}",
                                      "write one JSON object per line", "invalid_json")
                continue
            if not isinstance(row, dict):
                yield where, RowError("", f"expected a JSON object, got {type(row).__name__}",
                                      "write one JSON object per line", "wrong_type")
                continue
            yield where, row


def _read_parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow, which is not installed "
            "(fix: `pip install pyarrow`, or convert the file to .jsonl)"
        ) from None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file: {err} (fix: rewrite it, or convert it to .jsonl)") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", row


def _import_datasets(source: str, why: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source}: {why} needs `datasets`, which is not installed (fix: `pip install datasets`, "
            "or point `path` to a local .jsonl/.parquet file)"
        ) from None
    return datasets


def _read_disk(folder: Path, split: str) -> Iterator[Record]:
    """A folder written by `Dataset.save_to_disk` (one dataset) or `DatasetDict.save_to_disk` (one per split)."""
    if not ((folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()):
        raise DataError(
            f"{folder}: a folder, but not one written by `datasets` save_to_disk (no state.json or "
            "dataset_dict.json) (fix: point `path` to a .jsonl/.parquet file or to a save_to_disk folder)"
        )
    datasets = _import_datasets(str(folder), "reading a save_to_disk folder")
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as err:  # a damaged folder: datasets raises several types
        raise DataError(f"{folder}: not a readable save_to_disk folder: {type(err).__name__}: {err} "
                        "(fix: save it again, or export it to .jsonl)") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{folder}: split {split!r} not in this DatasetDict (it has {sorted(ds)}) "
                            f"(fix: set `split` of this dataset to one of {sorted(ds)})")
        ds, where = ds[split], f"{folder}[{split}]"
    else:
        where = str(folder)
    for i, row in enumerate(ds):
        yield f"{where}:row {i}", row


def _read_hub(name: str, split: str, subset: str) -> Iterator[Record]:
    datasets = _import_datasets(name, "not a local file, and reading it as a hub dataset")
    which = f"subset {subset!r}, split {split!r}" if subset else f"split {split!r}"
    try:
        ds = datasets.load_dataset(name, subset or None, split=split)
    except Exception as err:  # offline, unknown name, subset or split: datasets raises many types
        raise DataError(
            f"{name}: not a local file and could not be loaded as a hub dataset ({which}): "
            f"{type(err).__name__}: {err} (fix: check the name, `subset` and `split`, or download it to a "
            "local .jsonl/.parquet file or save_to_disk folder)"
        ) from None
    label = f"{name}/{subset}" if subset else name
    for i, row in enumerate(ds):
        yield f"{label}[{split}]:row {i}", row
