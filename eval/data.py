"""Evaluation text: a local file read as it is, or a ``datasets`` split joined with blank lines.

The standard perplexity protocol of the GPTQ / AWQ papers joins the WikiText-2 raw test split with
``"\\n\\n"`` and tokenizes the result once; that is the default here. A plain local file (any extension,
e.g. ``wiki.test.raw`` or ``valid.txt``) is read exactly as it is, so that the numbers match those measured
on the same file elsewhere. ``.jsonl`` / ``.parquet`` files hold one document per row and are joined like a
dataset split.

A reference is a local path when it names one (see :func:`compress.model.is_local_reference`) or looks
like a file name (it has an extension and no ``:``); otherwise it is ``DATASET_ID[:CONFIG[:SPLIT]]``.

A dataset is looked for on the Hub only when the Hub can be reached (:mod:`compress.hub`): in offline mode
(``HF_HUB_OFFLINE``) or with no route to it, only the local cache is read, so a machine without network gets its
error at once rather than after ``datasets``' retries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.calibration.data import NotCached, read_documents
from compress.errors import DataError
from compress.model import is_local_reference

DEFAULT_DATA = "Salesforce/wikitext:wikitext-2-raw-v1:test"
WIKITEXT_FILE_HINT = "wikitext-2-raw/wiki.test.raw"
DOCUMENT_JOIN = "\n\n"
MULTI_DOCUMENT_FILES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class EvalText:
    """The evaluation text and what a report must say about it."""

    text: str
    name: str  # a file name or DATASET_ID:CONFIG:SPLIT
    join: str  # how documents were joined: "" for a file read as is

    @property
    def sha256(self) -> str:
        """The text's digest: two perplexities are comparable only on the same text."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def is_file_reference(ref: str) -> bool:
    return is_local_reference(ref) or (":" not in ref and Path(ref).suffix != "")


def load_eval_text(ref: str | None = None, column: str = "text") -> EvalText:
    """The evaluation text named by ``ref`` (default: the WikiText-2 raw test split)."""
    ref = ref or DEFAULT_DATA
    if is_file_reference(ref):
        return _read_file(Path(ref).expanduser(), column)
    dataset, _, rest = ref.partition(":")
    config, _, split = rest.partition(":")
    name = f"{dataset}:{config}:{split or 'test'}"
    try:
        docs = read_documents(dataset, config or None, split or "test", column)
    except NotCached as exc:
        what = f"the default evaluation text, {name} (WikiText-2 raw test)," if ref == DEFAULT_DATA else f"dataset {name}"
        raise DataError(f"{what} is not in the local cache and cannot be downloaded ({exc.offline}); pass the "
                        f"evaluation text as a file: --data FILE (for the standard protocol, {WIKITEXT_FILE_HINT})") from exc
    except DataError as exc:
        raise DataError(f"{exc}. For the standard protocol offline, pass the same split as a file: "
                        f"--data path/to/{WIKITEXT_FILE_HINT}") from exc
    return EvalText(DOCUMENT_JOIN.join(docs), name, DOCUMENT_JOIN)


def _read_file(path: Path, column: str) -> EvalText:
    if not path.exists():
        raise DataError(f"evaluation data file not found: {path}; give a text file, a .jsonl/.parquet "
                        f"file, or a datasets id such as {DEFAULT_DATA}")
    if path.is_dir():
        raise DataError(f"evaluation data {path} is a directory; give a text file or a datasets id")
    if path.suffix in MULTI_DOCUMENT_FILES:
        return EvalText(DOCUMENT_JOIN.join(read_documents(str(path), column=column)), path.name, DOCUMENT_JOIN)
    try:
        # Text mode (universal newlines: "\r\n" and "\r" read as "\n"), as the papers' code and ANCHORS.md do
        # (open(path).read()); valid.txt has 410 carriage returns, which move ref-a's bf16 perplexity from
        # 5.5105 to 5.5053 when kept.
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); give a text file") from exc
    except OSError as exc:
        raise DataError(f"cannot read evaluation data {path}: {exc.strerror or exc}") from exc
    if not text.strip():
        raise DataError(f"evaluation data {path} is empty; give a file with text")
    return EvalText(text, path.name, "")


def tokenize(tokenizer, text: EvalText) -> torch.Tensor:
    """The whole text tokenized once, as the papers' code does (``tokenizer(text)``: special tokens as the
    tokenizer adds them), as a 1-D tensor of token ids."""
    return torch.tensor(tokenizer(text.text, verbose=False)["input_ids"], dtype=torch.long)


def read_prompts(path: str | None) -> list[str] | None:
    """Prompts from a file, one a line (blank lines skipped); None when no file is given."""
    if path is None:
        return None
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"prompts file not found: {file}; give a text file with one prompt a line") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read prompts file {file}: {exc}") from exc
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise DataError(f"prompts file {file} has no prompts; write one prompt a line")
    return prompts
