"""Text sources, the train/eval split and window packing."""

from __future__ import annotations

import json
from itertools import islice

import pytest
import torch

from sae_train.data import DataConfig, TextConfig, TokenSpec, iter_documents, iter_windows
from sae_train.data.sources import stdlib_root
from sae_train.errors import UserError


def test_stdlib_train_and_eval_split_share_no_file():
    train = set(islice(iter_documents(DataConfig(split="train", eval_fraction=0.2)), 400))
    eval_ = list(iter_documents(DataConfig(split="eval", eval_fraction=0.2)))
    assert train and eval_
    assert not train & set(eval_)
    n_files = sum(1 for p in stdlib_root().rglob("*.py") if "site-packages" not in p.parts)
    assert 0.15 < len(eval_) / n_files < 0.25
    # Deterministic: the same documents in the same order every time.
    assert list(islice(iter_documents(DataConfig(split="eval", eval_fraction=0.2)), 20)) == eval_[:20]


def _write_corpus(tmp_path):
    docs = {f"doc {i}: " + "word " * (i + 1) for i in range(40)}
    rows = sorted(docs)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(rows[:20])))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(rows[20:])))
    for i in range(6):
        (tmp_path / f"note{i}.txt").write_text(f"plain text file number {i}\n" * 3)
    return rows


def test_local_files_file_level_split(tmp_path):
    rows = _write_corpus(tmp_path)
    train = list(iter_documents(DataConfig(source="files", path=str(tmp_path), eval_fraction=0.3)))
    eval_ = list(iter_documents(DataConfig(source="files", path=str(tmp_path), split="eval", eval_fraction=0.3)))
    assert len(train) + len(eval_) == 46
    assert not set(train) & set(eval_)
    # Whole files go one way: every document of a.jsonl (and of b.jsonl) is on the same side.
    for file_rows in (rows[:20], rows[20:]):
        sides = {doc in train for doc in file_rows}
        assert len(sides) == 1 and all((doc in train) != (doc in eval_) for doc in file_rows)


def test_single_file_needs_document_split(tmp_path):
    rows = _write_corpus(tmp_path)
    with pytest.raises(UserError, match="single file.*split_by=document"):
        list(iter_documents(DataConfig(source="files", path=str(tmp_path / "a.jsonl"))))
    train = list(iter_documents(DataConfig(source="files", path=str(tmp_path / "a.jsonl"), split_by="document")))
    eval_ = list(
        iter_documents(DataConfig(source="files", path=str(tmp_path / "a.jsonl"), split_by="document", split="eval"))
    )
    assert sorted(train + eval_) == rows[:20]


def test_parquet_and_bad_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i in range(3):
        pq.write_table(pa.table({"body": [f"parquet doc {i}-{j}" for j in range(5)]}), tmp_path / f"p{i}.parquet")
    both = [
        d
        for s in ("train", "eval")
        for d in iter_documents(
            DataConfig(source="files", path=str(tmp_path / "*.parquet"), text_column="body", split=s)
        )
    ]
    assert sorted(both) == sorted(f"parquet doc {i}-{j}" for i in range(3) for j in range(5))
    with pytest.raises(UserError, match="no column 'text'.*body"):
        list(iter_documents(DataConfig(source="files", path=str(tmp_path / "*.parquet"), split_by="document")))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="matches no file"):
        list(iter_documents(DataConfig(source="files", path=str(tmp_path / "nothing-*.jsonl"))))
    with pytest.raises(UserError, match="needs data.path"):
        DataConfig(source="hf")


def test_hf_source_reads_a_dataset_directory(tmp_path):
    """The `datasets` code path, offline: a dataset directory with train and validation splits."""
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"train {i}"}) + "\n" for i in range(30)))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps({"text": f"val {i}"}) + "\n" for i in range(5)))
    held_out = DataConfig(source="hf", path=str(tmp_path), split="eval", eval_fraction=0.3)
    kept = DataConfig(source="hf", path=str(tmp_path), split="train", eval_fraction=0.3)
    a, b = list(iter_documents(kept)), list(iter_documents(held_out))
    assert sorted(a + b) == sorted(f"train {i}" for i in range(30)) and not set(a) & set(b) and b
    real = DataConfig(source="hf", path=str(tmp_path), split="eval", hf_eval_split="validation")
    assert list(iter_documents(real)) == [f"val {i}" for i in range(5)]
    with pytest.raises(UserError, match="Could not open dataset"):
        list(iter_documents(DataConfig(source="hf", path=str(tmp_path / "absent"))))


def test_windows_pack_the_token_stream(tiny_tokenizer):
    docs = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n" * 5, "import os\n" * 7]
    text = TextConfig(context_size=16, prepend_bos=True)
    spec = TokenSpec.from_tokenizer(tiny_tokenizer, text)
    windows = list(iter_windows(docs, tiny_tokenizer, text, spec))
    assert windows and all(w.shape == (16,) and w.dtype == torch.int64 for w in windows)
    assert all(w[0] == tiny_tokenizer.bos_token_id for w in windows)
    stream = [
        t
        for d in docs
        for t in tiny_tokenizer(d, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    ]
    body = torch.cat([w[1:] for w in windows]).tolist()
    assert body == stream[: len(body)] and len(stream) - len(body) < 15
    no_bos = list(
        iter_windows(
            docs,
            tiny_tokenizer,
            TextConfig(context_size=16, prepend_bos=False),
            TokenSpec.from_tokenizer(tiny_tokenizer, TextConfig(context_size=16, prepend_bos=False)),
        )
    )
    assert torch.cat(no_bos).tolist() == stream[: 16 * len(no_bos)]
    assert set(spec.special) >= {tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id}
