"""Text for causal language models: a byte-level tokenizer, the standard-library corpus, a partner's folder.

Everything here is plain functions over strings, numpy arrays and torch datasets:
- `byte_tokenizer()`: a Hugging Face fast tokenizer whose token id is the byte value (vocab 256);
- `stdlib_corpus()`: the Python standard library's own source, grouped by top-level package. It is
  on every machine that runs weft, so the built-in `lm` task needs no download;
- `read_text_folder()`: a partner's own `*.txt` and `*.jsonl` documents;
- `token_blocks()` / `TokenBlocks`: documents tokenized, concatenated and cut into fixed-length blocks.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from federation.errors import TaskError

SKIPPED_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"})
"""Folders of the standard library that are not its own library code (tests, the IDE, installed packages)."""

DOCUMENT_SEPARATOR = "\n\n"
"""Put between documents when the tokenizer has no end-of-sequence token (a byte-level one has none)."""


# ---- tokenizer -------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character.

    Printable Latin-1 bytes map to themselves; the other 68 (control characters, space, ...) map to
    code points from 256 upwards, so no byte becomes whitespace that a pre-tokenizer would drop.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_tokenizer() -> Any:
    """A `transformers.PreTrainedTokenizerFast` with one token per byte and token id == byte value.

    A BPE model over the 256 byte characters with no merges, behind a byte-level pre-tokenizer (no
    prefix space, no regex split) and decoder: any UTF-8 text round-trips, and `save_pretrained` /
    `AutoTokenizer.from_pretrained` restore it. It has no special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def is_byte_level(tokenizer: Any) -> bool:
    """Whether `tokenizer` has 256 tokens and encodes text as its UTF-8 bytes (then loss / ln 2 is bits per byte)."""
    probe = "weft: Grüße, 東京 ✓\n\tend"
    return len(tokenizer) == 256 and encode(tokenizer, probe) == list(probe.encode("utf-8"))


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text`, without special tokens.

    `verbose=False` silences the "sequence longer than the model's maximum" warning: documents are
    cut into blocks of the model's length afterwards, so a long document is expected.
    """
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def separator_ids(tokenizer: Any) -> list[int]:
    """The ids put between two documents: the end-of-sequence token if the tokenizer has one, else a blank line."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        return [eos]
    return encode(tokenizer, DOCUMENT_SEPARATOR)


# ---- corpora ---------------------------------------------------------------------------------------


def stdlib_root() -> Path:
    """The folder of this Python's standard library (never site-packages)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """`(owner, path)` of every standard-library `.py` file in sorted order; the owner is its top-level name.

    `email/mime/text.py` belongs to `email`, `json/__init__.py` to `json`, `argparse.py` to `argparse`.
    Tests, idlelib, lib2to3 and any installed packages are skipped (pruned, never walked: site-packages
    may lie inside the standard library's folder and be large).
    """
    root = root or stdlib_root()
    found: list[tuple[tuple[str, ...], Path]] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        for name in names:
            if name.endswith(".py"):
                path = Path(folder) / name
                found.append((path.relative_to(root).parts, path))
    found.sort()
    return [(parts[0] if len(parts) > 1 else path.stem, path) for parts, path in found]


def stdlib_corpus(max_bytes_per_owner: int, owners: Collection[str] | None = None) -> dict[str, str]:
    """The standard library's source text by owner (top-level package or module), each capped in UTF-8 bytes.

    Files are read in sorted order and joined by a blank line; an owner's text stops at
    `max_bytes_per_owner` bytes (cut on a character boundary). `owners` selects some owners (all when
    None); an unknown one is an error. The result is deterministic for a given Python installation.
    """
    if max_bytes_per_owner < 1:
        raise ValueError("max_bytes_per_owner must be >= 1")
    wanted = None if owners is None else set(owners)
    parts: dict[str, list[bytes]] = {}
    sizes: dict[str, int] = {}
    for owner, path in stdlib_files():
        if (wanted is not None and owner not in wanted) or sizes.get(owner, 0) >= max_bytes_per_owner:
            continue
        data = path.read_bytes()
        if owner in parts:
            data = DOCUMENT_SEPARATOR.encode() + data
        parts.setdefault(owner, []).append(data)
        sizes[owner] = sizes.get(owner, 0) + len(data)
    missing = sorted((wanted or set()) - set(parts))
    if missing:
        raise TaskError(f"the standard library at {stdlib_root()} has no module or package {missing}")
    return {owner: _decode_prefix(b"".join(chunks), max_bytes_per_owner) for owner, chunks in sorted(parts.items())}


def _decode_prefix(data: bytes, limit: int) -> str:
    """The first `limit` bytes of UTF-8 `data` as text, dropping a character the cut splits.

    Undecodable bytes before the cut are still an error (`strict`): only the partial character at
    the very end is trimmed, by backing off over UTF-8 continuation bytes (0b10xxxxxx).
    """
    if len(data) <= limit:
        return data.decode("utf-8")
    end = limit
    while end > 0 and data[end] & 0xC0 == 0x80:
        end -= 1
    return data[:end].decode("utf-8")


def read_text_folder(data_dir: Path) -> list[str]:
    """A partner's documents: every `*.txt` file, and each line of every `*.jsonl` file, under `data_dir`.

    Files are found recursively and read in sorted order. A `.txt` file is one document; a `.jsonl`
    line is a JSON object whose `"text"` string is one document (blank lines are skipped). Empty
    documents are dropped. A file that is not UTF-8, a bad JSON line or a missing `"text"` raises a
    TaskError naming the file and line; so does a folder without any text.
    """
    files = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
    if not files:
        raise TaskError(f"data-dir {data_dir} holds no *.txt or *.jsonl file")
    documents: list[str] = []
    for path in files:
        text = _read_utf8(path, data_dir)
        documents.extend(_jsonl_texts(text, path.relative_to(data_dir)) if path.suffix == ".jsonl" else [text])
    documents = [doc for doc in documents if doc]
    if not documents:
        raise TaskError(f"data-dir {data_dir}: its *.txt and *.jsonl files hold no text")
    return documents


def _read_utf8(path: Path, data_dir: Path) -> str:
    """The file's text; a TaskError naming the file and the byte offset when it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path.relative_to(data_dir)}: not UTF-8 text (bad byte at offset {exc.start})") from None


def _jsonl_texts(content: str, name: Path) -> list[str]:
    """The `"text"` field of each non-blank line of a JSON-lines file; errors name the file and line."""
    texts: list[str] = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{name}, line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise TaskError(f'{name}, line {number}: expected a JSON object with a "text" string')
        texts.append(record["text"])
    return texts


# ---- blocks ----------------------------------------------------------------------------------------


def token_blocks(documents: Sequence[str], tokenizer: Any, block: int) -> np.ndarray:
    """`documents` tokenized, joined by `separator_ids` and cut into non-overlapping rows of `block` ids.

    Returns an int64 array of shape (n, block); the tail shorter than a block is dropped.
    """
    if block < 2:
        raise ValueError("a block needs at least 2 tokens (an input and a next-token target)")
    separator = separator_ids(tokenizer)
    ids: list[int] = []
    for i, doc in enumerate(documents):
        if i:
            ids.extend(separator)
        ids.extend(encode(tokenizer, doc))
    n = len(ids) // block
    return np.asarray(ids[: n * block], dtype=np.int64).reshape(n, block)


class TokenBlocks(Dataset):
    """A map-style dataset of fixed-length token blocks: item `i` is a LongTensor of shape (block,)."""

    def __init__(self, ids: np.ndarray) -> None:
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"token blocks must be a 2-D integer array, got {ids.dtype}{list(ids.shape)}")
        self.ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.ids[index]

    @property
    def block(self) -> int:
        """Tokens per block."""
        return int(self.ids.shape[1])
