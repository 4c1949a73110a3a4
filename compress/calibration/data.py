"""Calibration data: text from a local file or a ``datasets`` dataset, tokenized and packed into N x L samples.

Packing is deterministic for a given seed: documents are shuffled (a plain file is one document), joined
with the tokenizer's EOS token, cut into consecutive windows of ``seq_len`` tokens, and ``samples`` windows
are drawn without replacement.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import DataError
from compress.hub import cache_only, hub_unreachable
from compress.model import is_local_reference

log = logging.getLogger(__name__)

FILE_KINDS = (".txt", ".jsonl", ".parquet")
MAX_TEXT_BYTES = 256 * 2**20  # read at most this much of a plain text file


@dataclass(frozen=True)
class CalibrationSet:
    """Token ids [samples, seq_len] and where they came from; for training on examples (instruction data),
    also the labels (-100 where no loss is taken: prompts, padding) and the attention mask (0 at padding)."""

    input_ids: torch.Tensor
    source: str
    labels: torch.Tensor | None = None  # None: every token is a label
    attention_mask: torch.Tensor | None = None  # None: no padding

    @property
    def samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        return list(self.input_ids.split(batch_size))

    def take(self, rows: slice | list[int] | torch.Tensor) -> CalibrationSet:
        """The samples at ``rows``, with their labels and mask."""
        pick = (lambda t: None if t is None else t[rows])  # noqa: E731
        return CalibrationSet(self.input_ids[rows], self.source, pick(self.labels), pick(self.attention_mask))

    def model_inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``labels`` (and ``attention_mask`` where there is padding) for a causal LM's loss."""
        inputs = {"input_ids": self.input_ids,
                  "labels": self.input_ids.clone() if self.labels is None else self.labels}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        return {k: v.to(device) for k, v in inputs.items()} if device is not None else inputs

    def input_batches(self, batch_size: int, device: torch.device | str | None = None
                      ) -> Iterator[dict[str, torch.Tensor]]:
        """:meth:`model_inputs` of ``batch_size`` samples at a time, in order."""
        for first in range(0, self.samples, batch_size):
            yield self.take(slice(first, first + batch_size)).model_inputs(device)


def check_source(dataset: str) -> str | None:
    """A problem with a local data path (missing, unsupported kind), found without reading it; else None."""
    if not is_local_reference(dataset):
        return None
    path = Path(dataset).expanduser()
    if not path.exists():
        return f"data file not found: {path}"
    if path.is_dir():
        return f"{path} is a directory; give a .txt, .jsonl or .parquet file, or a datasets id"
    if path.suffix not in FILE_KINDS:
        return f"{path}: unsupported file kind {path.suffix!r}; use one of {', '.join(FILE_KINDS)}"
    return None


HEAD_BYTES = 2**16  # what validation reads of a data file at least (for UTF-8), when its size settles nothing


def check_contents(dataset: str, samples: int, seq_len: int | None, column: str = "text") -> str | None:
    """A problem with a local data file found by reading its head, without a tokenizer: empty, not UTF-8 text,
    rows that cannot be read, or too little text for ``samples`` windows of ``seq_len`` tokens (with ``seq_len``
    None, only the others). Else None; also None for a ``datasets`` id or a path :func:`check_source` refuses.

    The size test needs no tokenizer: a token stands for at least one byte of text (byte-level BPE, and
    SentencePiece with byte fallback), and the packing adds at most two per document (an EOS between documents,
    a SentencePiece word start). So a file with fewer bytes of text than that cannot fill the samples; one with
    more may still fall short, which :func:`pack` says once the text is tokenized."""
    if not is_local_reference(dataset) or check_source(dataset):
        return None
    path = Path(dataset).expanduser()
    needed = samples * seq_len if seq_len else None
    try:
        size = path.stat().st_size
        if size == 0:
            return f"{path} is empty (0 bytes); give a file with text"
        if path.suffix == ".txt":
            text_bytes, docs, problem = _txt_head(path, needed)
        elif path.suffix == ".jsonl":
            text_bytes, docs, problem = _jsonl_head(path, column, needed)
        else:
            text_bytes, docs, problem = _parquet_head(path, column, needed)
    except OSError as exc:
        return f"cannot read data file {path}: {exc.strerror or exc}"
    if problem:
        return problem
    if text_bytes == 0:
        return f"{path} holds no text ({docs} documents, all empty, in {size} bytes); give a file with text"
    if needed is not None and text_bytes + 2 * docs < needed:
        held = f"{text_bytes} bytes of text" if path.suffix == ".txt" else \
            f"{text_bytes} bytes of text in {docs} document{'s' if docs != 1 else ''} (file: {size} bytes)"
        return (f"{path} holds {held}; {samples} samples of {seq_len} tokens need {needed} tokens (a token takes at "
                "least one byte of text); lower calibration.samples or calibration.seq_len, or give more text")
    return None


def _txt_head(path: Path, needed: int | None) -> tuple[int, int, str | None]:
    """(bytes of text read, documents, problem) for a plain text file: one document."""
    limit = max(needed or 0, HEAD_BYTES) + 4
    with open(path, "rb") as fh:
        head = fh.read(limit)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        cut = len(head) == limit and exc.reason == "unexpected end of data"  # a character cut by the read
        if not cut:
            return 0, 1, f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); give a text file"
    return len(head), 1, None


def _jsonl_head(path: Path, column: str, needed: int | None) -> tuple[int, int, str | None]:
    """(bytes of text in the rows read, non-empty documents, problem), reading rows until they may hold enough."""
    text_bytes = docs = rows = offset = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return 0, 0, f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {start + exc.start}); give a text file"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                return 0, 0, f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object"
            if not isinstance(row, dict) or column not in row:
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                return 0, 0, f"{path}:{lineno}: no field {column!r} (found: {keys}); set calibration.column"
            rows += 1
            text = str(row[column]).encode()
            text_bytes += len(text)
            docs += bool(text)
            if offset >= HEAD_BYTES and text_bytes + 2 * docs >= (needed or 1):
                break
    if rows == 0:
        return 0, 0, f"{path} holds no JSON rows, only blank lines; give one JSON object a line"
    return text_bytes, docs if text_bytes else rows, None


def _parquet_head(path: Path, column: str, needed: int | None) -> tuple[int, int, str | None]:
    """(bytes of text in the rows read, non-empty documents, problem), reading batches until they may hold enough."""
    import pyarrow.parquet as pq

    text_bytes = docs = rows = 0
    try:
        file = pq.ParquetFile(path)
        names = file.schema_arrow.names
        if column not in names:
            return 0, 0, f"{path}: no column {column!r} (columns: {', '.join(names)}); set calibration.column"
        for batch in file.iter_batches(batch_size=1024, columns=[column]):
            for value in batch.column(0).to_pylist():
                rows += 1
                text = str(value).encode()
                text_bytes += len(text)
                docs += bool(text)
            if text_bytes + 2 * docs >= (needed or 1):
                break
    except Exception as exc:  # pyarrow raises its own types for corrupt files
        return 0, 0, f"cannot read data file {path}: {exc}"
    return text_bytes, docs if text_bytes else rows, None


def read_documents(dataset: str, config: str | None = None, split: str = "train", column: str = "text") -> list[str]:
    """The documents of a local .txt / .jsonl / .parquet file or of a ``datasets`` split."""
    return [row[0] for row in read_columns(dataset, config, split, (column,))]


def read_columns(dataset: str, config: str | None = None, split: str = "train",
                 columns: tuple[str, ...] = ("text",)) -> list[tuple[str, ...]]:
    """Each row's ``columns`` of a local .jsonl / .parquet file or of a ``datasets`` split, read once (a .txt file
    is one row holding its text in every column)."""
    problem = check_source(dataset)
    if problem:
        raise DataError(problem)
    if is_local_reference(dataset):
        return _read_file(Path(dataset).expanduser(), columns)
    return _read_hub_dataset(dataset, config, split, columns)


def _read_file(path: Path, columns: tuple[str, ...]) -> list[tuple[str, ...]]:
    try:
        if path.suffix == ".txt":
            with open(path, encoding="utf-8") as fh:  # universal newlines, as evaluation text is read
                return [(fh.read(MAX_TEXT_BYTES),) * len(columns)]
        if path.suffix == ".jsonl":
            docs = []
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from exc
                    missing = [c for c in columns if not isinstance(row, dict) or c not in row]
                    if missing:
                        keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                        raise DataError(f"{path}:{lineno}: no field {missing[0]!r} (found: {keys}); set "
                                        "calibration.column")
                    docs.append(tuple(str(row[c]) for c in columns))
            return docs
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for column in columns:
            if column not in table.column_names:
                raise DataError(f"{path}: no column {column!r} (columns: {', '.join(table.column_names)}); set the "
                                "column")
        return list(zip(*([str(v) for v in table.column(c).to_pylist()] for c in columns)))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); give a text file") from exc
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from exc
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises its own types for corrupt files
        raise DataError(f"cannot read data file {path}: {exc}") from exc


class NotCached(DataError):
    """A ``datasets`` dataset that is not in the local cache, on a machine that cannot reach the Hub."""

    def __init__(self, message: str, offline: str):
        super().__init__(message)
        self.offline = offline  # why the Hub cannot be reached


def _read_hub_dataset(name: str, config: str | None, split: str, columns: tuple[str, ...]) -> list[tuple[str, ...]]:
    import datasets

    offline = hub_unreachable()
    try:
        with cache_only(offline is not None):
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        if offline is not None and isinstance(exc, ConnectionError):
            raise NotCached(f"dataset {name!r} (config {config!r}, split {split!r}) is not in the local cache and "
                            f"cannot be downloaded ({offline}); use a local .txt/.jsonl/.parquet file", offline) from exc
        raise DataError(
            f"could not load dataset {name!r} (config {config!r}, split {split!r}): {exc}. This machine may be "
            "offline: use a local .txt/.jsonl/.parquet file instead"
        ) from exc
    for column in columns:
        if column not in ds.column_names:
            raise DataError(f"dataset {name!r} has no column {column!r} (columns: {', '.join(ds.column_names)})")
    return list(zip(*([str(t) for t in ds[c]] for c in columns)))


def _token_stream(docs: list[str], tokenizer, needed: int, seed: int) -> Iterator[list[int]]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    eos = getattr(tokenizer, "eos_token_id", None)
    total = 0
    for i in order:
        if not docs[i]:
            continue
        ids = tokenizer(docs[i], add_special_tokens=False, verbose=False)["input_ids"]
        if eos is not None and len(docs) > 1:
            ids = ids + [eos]
        yield ids
        total += len(ids)
        if total >= needed:
            return


def _windows(stream: list[int], seq_len: int) -> torch.Tensor:
    windows = len(stream) // seq_len
    return torch.tensor(stream[: windows * seq_len], dtype=torch.long).view(windows, seq_len)


def token_windows(docs: list[str], tokenizer, seq_len: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """The first ``tokens`` tokens of ``docs`` (shuffled by ``seed``, joined with EOS), or all of them when there
    are fewer, as consecutive windows [windows, seq_len] (a partial last window is dropped)."""
    return _windows([t for ids in _token_stream(docs, tokenizer, tokens, seed) for t in ids], seq_len)


def instruction_examples(prompts: list[str], responses: list[str], tokenizer, seq_len: int, chat_template: bool,
                         source: str = "") -> CalibrationSet:
    """Each (prompt, response) pair as one sample of ``seq_len`` tokens with the loss on the response only: the
    prompt (as a user turn of the tokenizer's chat template, with the assistant's turn opened, when
    ``chat_template``; else as the tokenizer reads it), then the response and the end of the turn (EOS without
    a template). Longer samples are cut, shorter ones padded (masked out); a pair whose prompt fills the window
    is left out, and how many were cut or left out is logged."""
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    rows, labels, lengths, cut, dropped = [], [], [], 0, 0
    for prompt, response in zip(prompts, responses):
        if chat_template:
            turn = [{"role": "user", "content": prompt}]
            head = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
            whole = tokenizer.apply_chat_template(turn + [{"role": "assistant", "content": response}], tokenize=False)
            tail = whole[len(head):] if whole.startswith(head) else response
            first = tokenizer(head, add_special_tokens=False, verbose=False)["input_ids"]
            second = tokenizer(tail, add_special_tokens=False, verbose=False)["input_ids"]
        else:
            first = tokenizer(prompt, verbose=False)["input_ids"]
            second = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]
            second = second + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        if len(first) >= seq_len:
            dropped += 1
            continue
        ids = (first + second)[:seq_len]
        cut += len(first) + len(second) > seq_len
        rows.append(ids + [pad] * (seq_len - len(ids)))
        lengths.append(len(ids))
        labels.append([-100] * len(first) + ids[len(first):] + [-100] * (seq_len - len(ids)))
    if cut or dropped:
        log.info("instruction data %s: %d of %d examples cut to %d tokens, %d left out (the prompt fills the window)",
                 source, cut, len(prompts), seq_len, dropped)
    if not rows:
        raise DataError(f"instruction data {source}: every prompt is at least {seq_len} tokens long, so no response "
                        "would be trained on; raise training.seq_len")
    input_ids, label_ids = torch.tensor(rows, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
    mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()
    return CalibrationSet(input_ids, source, label_ids, mask)


def pack(docs: list[str], tokenizer, samples: int, seq_len: int, seed: int = 0, source: str = "") -> CalibrationSet:
    """Tokenize ``docs`` and draw ``samples`` windows of ``seq_len`` tokens (deterministic for ``seed``)."""
    needed = samples * seq_len * 4  # a pool four times the need, so windows come from across the data
    stream = [t for ids in _token_stream(docs, tokenizer, needed, seed) for t in ids]
    ids = _windows(stream, seq_len)
    windows = ids.shape[0]
    if windows < samples:
        raise DataError(
            f"calibration data {source or '(given)'} has {len(stream)} tokens: {windows} windows of {seq_len}, "
            f"fewer than the {samples} samples asked for; lower samples or seq_len, or give more text"
        )
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(windows, generator=gen)[:samples]
    log.info("calibration: %d x %d tokens from %s", samples, seq_len, source or "given text")
    return CalibrationSet(ids[pick], source)


def calibration_set(tokenizer, dataset: str, samples: int, seq_len: int, seed: int = 0,
                    config: str | None = None, split: str = "train", column: str = "text") -> CalibrationSet:
    """Read ``dataset`` (a file or a datasets id) and pack it."""
    return pack(read_documents(dataset, config, split, column), tokenizer, samples, seq_len, seed, source=dataset)
