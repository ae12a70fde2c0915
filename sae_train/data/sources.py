"""Text sources: Hugging Face datasets, local files, and the Python standard library.

Every source serves a `train` or an `eval` split, and the two never share a document: a
dataset's own eval split when it has one, else a deterministic hash split by document text,
or by file path for local files and `python-stdlib` (so a file is wholly train or wholly eval).
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sae_train.errors import UserError

SOURCES = ("python-stdlib", "hf", "files")
_FILE_SUFFIXES = {
    ".txt": "text",
    ".md": "text",
    ".py": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}


@dataclass
class DataConfig:
    """Where text comes from and which split of it to read."""

    source: str = "python-stdlib"
    """python-stdlib (the running Python's standard-library sources; offline default) | hf (a
    Hugging Face dataset) | files (local .txt/.md/.py, .jsonl/.json or .parquet files)."""
    path: str = ""
    """hf: the dataset id (HuggingFaceFW/fineweb). files: a file, directory or glob."""
    name: str = ""
    """hf: the dataset configuration (sample-10BT)."""
    split: str = "train"
    """Which split to serve: train | eval."""
    hf_split: str = "train"
    """hf: the dataset split the train side reads (and the held-out slice comes from)."""
    hf_eval_split: str = ""
    """hf: a dataset split reserved for eval (validation); empty = hold out a hashed slice of hf_split."""
    text_column: str = "text"
    """hf, jsonl and parquet: the column holding the text."""
    streaming: bool = True
    """hf: stream instead of downloading the whole dataset first."""
    eval_fraction: float = 0.05
    """Share of documents (files, for file sources) held out for eval when there is no eval split."""
    split_by: str = "auto"
    """Unit of the held-out split: file | document | auto (file for files/python-stdlib, document for hf)."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise UserError(f"data.source='{self.source}' is unknown; use one of {', '.join(SOURCES)}.")
        if self.split not in ("train", "eval"):
            raise UserError(f"data.split='{self.split}' must be 'train' or 'eval'.")
        if self.split_by not in ("auto", "file", "document"):
            raise UserError(f"data.split_by='{self.split_by}' must be auto, file or document.")
        if not 0.0 < self.eval_fraction < 1.0:
            raise UserError(f"data.eval_fraction={self.eval_fraction} must be strictly between 0 and 1.")
        if self.source in ("hf", "files") and not self.path:
            raise UserError(f"data.source={self.source} needs data.path (a dataset id or a file/dir/glob).")

    def describe(self) -> dict:
        """What determines the text served, for manifests and checkpoints."""
        described = {
            "source": self.source,
            "split": self.split,
            "eval_fraction": self.eval_fraction,
            "split_by": self._split_unit(),
        }
        if self.source == "hf":
            described |= {
                "path": self.path,
                "name": self.name,
                "hf_split": self.hf_split,
                "hf_eval_split": self.hf_eval_split,
                "text_column": self.text_column,
            }
        elif self.source == "files":
            described |= {"path": self.path, "text_column": self.text_column}
        return described

    def _split_unit(self) -> str:
        if self.split_by != "auto":
            return self.split_by
        return "document" if self.source == "hf" else "file"


def is_eval(key: str, eval_fraction: float) -> bool:
    """Deterministic hash split: the same key always lands on the same side, on any machine."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def _want(cfg: DataConfig, key: str) -> bool:
    return is_eval(key, cfg.eval_fraction) == (cfg.split == "eval")


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """The documents of cfg's split, in a deterministic order."""
    if cfg.source == "python-stdlib":
        yield from _stdlib_documents(cfg)
    elif cfg.source == "files":
        yield from _file_documents(cfg)
    else:
        yield from _hf_documents(cfg)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_documents(cfg: DataConfig) -> Iterator[str]:
    # Each file is one document, split by its content so that identical files (there are
    # many identical stubs) land on the same side.
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip() and _want(cfg, text):
            yield text


def _local_files(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix in _FILE_SUFFIXES]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    if not files:
        raise UserError(
            f"data.path='{pattern}' matches no file. Give a file, a directory or a glob of .txt/.jsonl/.parquet files."
        )
    unknown = sorted({p.suffix for p in files} - set(_FILE_SUFFIXES))
    if unknown:
        raise UserError(
            f"data.path='{pattern}' holds files of unsupported type {unknown}; supported: {sorted(_FILE_SUFFIXES)}."
        )
    return sorted(files)


def _file_documents(cfg: DataConfig) -> Iterator[str]:
    files = _local_files(cfg.path)
    by_file = cfg._split_unit() == "file"
    if by_file and len(files) < 2:
        raise UserError(
            f"data.path='{cfg.path}' is a single file, so a file-level train/eval split would leave one side "
            "empty. Point data.path at several files, or set data.split_by=document."
        )
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    for path in files:
        if by_file and not _want(cfg, path.relative_to(root).as_posix()):
            continue
        for text in _read_file(path, cfg.text_column):
            if by_file or _want(cfg, text):
                yield text


def _read_file(path: Path, text_column: str) -> Iterator[str]:
    kind = _FILE_SUFFIXES[path.suffix]
    if kind == "text":
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    from datasets import load_dataset

    dataset = load_dataset(kind, data_files=str(path), split="train", streaming=True)
    yield from _texts(dataset, text_column, str(path))


def _texts(dataset, text_column: str, where: str) -> Iterator[str]:  # noqa: ANN001 - any datasets iterable
    for row in dataset:
        if text_column not in row:
            raise UserError(f"{where} has no column '{text_column}' (columns: {sorted(row)}). Set data.text_column.")
        text = row[text_column]
        if isinstance(text, str) and text:
            yield text


def _hf_documents(cfg: DataConfig) -> Iterator[str]:
    from datasets import load_dataset

    split = cfg.hf_eval_split if (cfg.split == "eval" and cfg.hf_eval_split) else cfg.hf_split
    try:
        dataset = load_dataset(cfg.path, cfg.name or None, split=split, streaming=cfg.streaming)
    except Exception as err:  # datasets raises many types for missing/unreachable datasets
        raise UserError(
            f"Could not open dataset '{cfg.path}' (config '{cfg.name}', split '{split}'): {err}. Check the id, "
            "config and split names and your network; for offline work use data.source=files."
        ) from err
    texts = _texts(dataset, cfg.text_column, cfg.path)
    if cfg.hf_eval_split:
        # A dedicated eval split: each side reads its own split whole.
        yield from texts
    else:
        yield from (text for text in texts if _want(cfg, text))
