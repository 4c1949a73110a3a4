"""Evaluation text: a local file read as it is, or a ``datasets`` split joined with blank lines.

The standard perplexity protocol of the GPTQ / AWQ papers joins the WikiText-2 raw test split with
``"\\n\\n"`` and tokenizes the result once; that is the default here. A plain local file (any extension,
e.g. ``wiki.test.raw`` or ``valid.txt``) is read exactly as it is, so that the numbers match those measured
on the same file elsewhere. ``.jsonl`` / ``.parquet`` files hold one document per row and are joined like a
dataset split.

A reference is a local path when it names one (see :func:`compress.model.is_local_reference`) or looks
like a file name (it has an extension and no ``:``); otherwise it is ``DATASET_ID[:CONFIG[:SPLIT]]``.

A dataset is looked for on the Hub only when the Hub can be reached: in offline mode (``HF_HUB_OFFLINE``) or with
no route to it, only the local cache is read, so a machine without network gets its error at once rather than
after ``datasets``' retries.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from compress.calibration.data import read_documents
from compress.errors import DataError
from compress.model import is_local_reference

DEFAULT_DATA = "Salesforce/wikitext:wikitext-2-raw-v1:test"
WIKITEXT_FILE_HINT = "wikitext-2-raw/wiki.test.raw"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
HUB_PROBE_SECONDS = 2.0
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
    offline = hub_unreachable()
    try:
        with _cache_only(offline is not None):
            docs = read_documents(dataset, config or None, split or "test", column)
    except DataError as exc:
        if offline is None or not isinstance(exc.__cause__, ConnectionError):  # not a matter of the cache
            raise DataError(f"{exc}. For the standard protocol offline, pass the same split as a file: "
                            f"--data path/to/{WIKITEXT_FILE_HINT}") from exc
        what = f"the default evaluation text, {name} (WikiText-2 raw test)," if ref == DEFAULT_DATA else f"dataset {name}"
        raise DataError(f"{what} is not in the local cache and cannot be downloaded ({offline}); pass the evaluation "
                        f"text as a file: --data FILE (for the standard protocol, {WIKITEXT_FILE_HINT})") from exc
    return EvalText(DOCUMENT_JOIN.join(docs), name, DOCUMENT_JOIN)


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hugging Face Hub cannot be reached now, or None: offline mode is set (read from the environment now,
    not when ``huggingface_hub`` was imported), or no connection to the Hub (or to the HTTPS proxy) opens within
    ``timeout`` seconds, name lookup included."""
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{variable} is set"
    from huggingface_hub import constants

    hub = urlparse(constants.ENDPOINT)
    host, port = hub.hostname or "huggingface.co", hub.port or (443 if hub.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(hub.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        via = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname or host, via.port or 80
    outcome: list[str | None] = []

    def connect() -> None:  # in a thread: a name lookup that hangs does not honour the socket's timeout
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"cannot connect to {host}: {exc}")

    thread = threading.Thread(target=connect, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no connection to {host} within {timeout:g} s"


@contextlib.contextmanager
def _cache_only(offline: bool) -> Iterator[None]:
    """While active (when ``offline``), ``datasets`` and ``huggingface_hub`` read their caches and never try the
    network, as with ``HF_HUB_OFFLINE=1`` set before they were imported."""
    if not offline:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = before


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
