"""Calibration data: spec parsing, loading local files, chat templating, packing and errors."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import datasets
import pytest
import torch

from reap_fast import data
from reap_fast.data import (
    CalibrationDataError,
    CalibrationSet,
    CategorySpec,
    PackingOptions,
    build_calibration_set,
    calibration_texts,
    load_documents,
    parse_dataset_spec,
)
from reap_lab.tiny import byte_tokenizer

EOS, PAD = 256, 257  # byte_tokenizer: <|endoftext|>, <|pad|>; byte b has id b
# The documented document order for seed 42 (the default), upstream's sampler: random.Random(42).randint(0, n - 1)
# drawn again on repeats, written out by hand (independent of reap_fast.data) for 5 and 3 documents.
SEED_42_ORDER = {5: [0, 2, 1, 4, 3], 3: [2, 0, 1]}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def ids(text: str) -> list[int]:
    return list(text.encode())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def texts_file(tmp_path: Path, texts: list[str], name: str = "docs.jsonl") -> str:
    return str(write_jsonl(tmp_path / name, [{"text": t} for t in texts]))


def category(name: str, **kwargs) -> CategorySpec:
    return CategorySpec(name=name, **kwargs)


# --- spec parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("org/data", [("org/data", None, "train", None)]),
        ("org/data:16", [("org/data", None, "train", 16)]),
        ("org/data[code]", [("org/data", "code", "train", None)]),
        ("org/data(tool)", [("org/data", None, "tool", None)]),
        ("org/data[code](test):8", [("org/data", "code", "test", 8)]),
        ("./local/my-data_v1.2.jsonl:3", [("./local/my-data_v1.2.jsonl", None, "train", 3)]),
        (
            "theblackcat102/evol-codealpaca-v1:8, open-r1/Mixture-of-Thoughts[math]:4 ,SWE-bench/SWE-smith-trajectories(tool)",
            [
                ("theblackcat102/evol-codealpaca-v1", None, "train", 8),
                ("open-r1/Mixture-of-Thoughts", "math", "train", 4),
                ("SWE-bench/SWE-smith-trajectories", None, "tool", None),
            ],
        ),
        ("/abs/path with space/x.parquet : 2", [("/abs/path with space/x.parquet", None, "train", 2)]),
    ],
)
def test_parse_spec_forms(spec, expected):
    got = [(c.name, c.subset, c.split, c.num_samples) for c in parse_dataset_spec(spec)]
    assert got == expected


def test_parse_spec_default_split_and_label():
    (cat,) = parse_dataset_spec("d[s]:2", default_split="validation")
    assert cat.split == "validation" and cat.label == "d[s](validation)"
    assert parse_dataset_spec("d(train)")[0].label == "d"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty dataset spec"),
        ("   ", "empty dataset spec"),
        ("a,,b", "entry 2 is empty"),
        ("a,", "entry 2 is empty"),
        ("a:0", "must be > 0"),
        ("a:-1", "not a positive integer"),
        ("a:x", "not a positive integer"),
        ("a:", "not a positive integer"),
        ("a:1:2", "':' may appear only once"),
        ("c:/data/x.jsonl", "'/data/x.jsonl' is not a positive integer (':' only separates the sample count)"),
        ("a[]", "empty [subset]"),
        ("a()", "empty (split)"),
        ("a[b", "expected name[subset](split):N"),
        ("a(b", "expected name[subset](split):N"),
        ("a[b](c)d", "expected name[subset](split):N"),
        ("a(c)[b]", "expected name[subset](split):N"),
        ("[b]:3", "expected name[subset](split):N"),
        ("  [b]", "expected name[subset](split):N"),
    ],
)
def test_parse_spec_errors(spec, message):
    with pytest.raises(CalibrationDataError) as info:
        parse_dataset_spec(spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# --- loading each file type ----------------------------------------------------------------------


def test_load_jsonl_json_parquet_txt(tmp_path, tok):
    rows = ["alpha", "beta", "gamma"]
    jsonl = texts_file(tmp_path, rows)
    (tmp_path / "arr.json").write_text(json.dumps([{"text": t} for t in rows]))
    datasets.Dataset.from_dict({"text": rows}).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "lines.txt").write_text("alpha\n\nbeta\n   \ngamma\n")
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps({"text": t}) + "\n" for t in rows))
    for name in (jsonl, "arr.json", "d.parquet", "lines.txt", "z.jsonl.gz"):
        path = name if os.path.isabs(name) else str(tmp_path / name)
        assert sorted(load_documents(category(path), tok)) == sorted(rows), name


def test_load_folder_of_txt_is_one_document_per_file(tmp_path, tok):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first line\nsecond line\n\nthird")
    (folder / "sub" / "b.txt").write_text("another file")
    (folder / ".hidden.txt").write_text("skipped")
    (folder / "notes.md").write_text("not a data file")
    docs = load_documents(category(str(folder)), tok)
    assert sorted(docs) == ["another file", "first line\nsecond line\n\nthird"]


def test_load_folder_splits_and_subsets(tmp_path, tok):
    folder = tmp_path / "ds"
    folder.mkdir()
    texts_file(folder, ["train doc"], "train.jsonl")
    texts_file(folder, ["test doc"], "test-00000.jsonl")
    assert load_documents(category(str(folder)), tok) == ["train doc"]
    assert load_documents(category(str(folder), split="test"), tok) == ["test doc"]
    with pytest.raises(CalibrationDataError, match="no files for split 'validation'"):
        load_documents(category(str(folder), split="validation"), tok)

    plain = tmp_path / "plain"
    (plain / "code").mkdir(parents=True)
    (plain / "math").mkdir()
    texts_file(plain / "code", ["def f(): pass"], "part1.jsonl")
    texts_file(plain / "math", ["1 + 1 = 2"], "part1.jsonl")
    texts_file(plain, ["top"], "top.jsonl")
    (cat,) = parse_dataset_spec(f"{plain}[math]")
    assert load_documents(cat, tok) == ["1 + 1 = 2"]
    assert sorted(load_documents(category(str(plain)), tok)) == ["1 + 1 = 2", "def f(): pass", "top"]
    with pytest.raises(CalibrationDataError, match="no sub-folder 'bio'"):
        load_documents(category(str(plain), subset="bio"), tok)


def test_load_saved_dataset_folder(tmp_path, tok):
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}), "eval": datasets.Dataset.from_dict({"text": ["e1"]})}
    ).save_to_disk(str(saved))
    assert sorted(load_documents(category(str(saved)), tok)) == ["t1", "t2"]
    assert load_documents(category(str(saved), split="eval"), tok) == ["e1"]
    with pytest.raises(CalibrationDataError, match=r"no split 'dev'; splits are \['eval', 'train'\]"):
        load_documents(category(str(saved), split="dev"), tok)


def test_hub_name_goes_to_load_dataset(monkeypatch, tok):
    calls = []

    def fake_load_dataset(name, subset=None, split=None, **kwargs):
        calls.append((name, subset, split))
        return datasets.Dataset.from_dict({"text": ["from the hub"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (cat,) = parse_dataset_spec("org/name[cfg](validation):1")
    assert load_documents(cat, tok) == ["from the hub"]
    assert calls == [("org/name", "cfg", "validation")]


def test_hub_failure_is_one_line(monkeypatch, tok):
    def failing(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(CalibrationDataError) as info:
        build_calibration_set("org/name:1", byte_tokenizer(), model_max_length=16)
    message = str(info.value)
    assert "cannot load dataset 'org/name'" in message and "ConnectionError: Couldn't reach" in message
    assert "\n" not in message and info.value.__cause__ is None


# --- columns and chat templating -----------------------------------------------------------------

CHAT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"


def test_messages_column_goes_through_chat_template(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "text": "ignored"}],
    )
    assert load_documents(category(str(path)), tok) == [CHAT]


def test_sharegpt_conversations_pairs_and_multipart_content(tmp_path, tok):
    sharegpt = write_jsonl(
        tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    )
    assert load_documents(category(str(sharegpt)), tok) == [CHAT]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"instruction": "hi", "output": "hello"}])
    assert load_documents(category(str(pairs)), tok) == [CHAT]
    parts = write_jsonl(
        tmp_path / "parts.jsonl",
        [{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "hello"}]}],
    )
    assert load_documents(category(str(parts)), tok) == [CHAT]
    as_string = write_jsonl(
        tmp_path / "str.jsonl", [{"messages": json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])}]
    )
    assert load_documents(category(str(as_string)), tok) == [CHAT]


def test_explicit_and_fallback_columns(tmp_path, tok):
    path = write_jsonl(tmp_path / "cols.jsonl", [{"body": "the body", "prompt": "the prompt", "n": 1}])
    assert load_documents(category(str(path)), tok) == ["the prompt"]  # prompt comes before body
    assert load_documents(category(str(path), column="body"), tok) == ["the body"]
    texts = calibration_texts(str(path), tok, 1, column="body")
    assert texts == ["the body"]
    with pytest.raises(CalibrationDataError, match=r"no column 'missing'; columns are \['body', 'prompt', 'n'\]"):
        build_calibration_set(str(path), tok, 1, model_max_length=8, column="missing")


def test_no_usable_column_and_missing_chat_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "numbers.jsonl", [{"a": 1, "b": 2}])
    with pytest.raises(CalibrationDataError, match=r"no text or chat column found; columns are \['a', 'b'\]"):
        load_documents(category(str(path)), tok)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    plain = byte_tokenizer()
    plain.chat_template = None
    with pytest.raises(CalibrationDataError, match="'messages' holds chats but the tokenizer has no chat template"):
        load_documents(category(str(chat)), plain)


def _bos_tokenizer():
    from tokenizers import processors

    tokenizer = byte_tokenizer()
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")  # stands in for a BOS token here
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", start)]
    )
    return tokenizer, start


def test_bos_added_as_upstream_and_not_doubled_with_dedupe_bos(tmp_path):
    tokenizer, start = _bos_tokenizer()
    plain = texts_file(tmp_path, ["ab"], "plain.jsonl")
    templated = texts_file(tmp_path, ["<|im_start|>cd"], "templated.jsonl")
    spec = f"{plain}:1,{templated}:1"
    upstream = build_calibration_set(spec, tokenizer, model_max_length=4, pack=False)
    assert upstream.input_ids.tolist() == [[start, 97, 98, PAD], [start, start, 99, 100]]  # tokenizer(text), as upstream
    deduped = build_calibration_set(spec, tokenizer, model_max_length=4, pack=False, options=PackingOptions(dedupe_bos=True))
    assert deduped.input_ids.tolist() == [[start, 97, 98], [start, 99, 100]]


# --- packing -------------------------------------------------------------------------------------


def upstream_rows(docs: list[list[int]], rows: int, length: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Upstream's packed sampler written out by hand: randint without repeats, token 0 / mask 0 gaps."""
    rng = random.Random(seed)
    sampled, out_ids, out_mask = [], [], []
    while len(out_ids) < rows and len(sampled) < len(docs):
        ids, mask, at = [0] * length, [0] * length, 0
        while at < length and len(sampled) < len(docs):
            index = rng.randint(0, len(docs) - 1)
            if index in sampled:
                continue
            sampled.append(index)
            doc = docs[index][: length - at]
            ids[at : at + len(doc)] = doc
            mask[at : at + len(doc)] = [1] * len(doc)
            at += len(doc) + 1
        out_ids.append(ids)
        out_mask.append(mask)
    return out_ids, out_mask


@pytest.mark.parametrize("seed", [0, 7, 42])
@pytest.mark.parametrize("length", [8, 13])
def test_packing_matches_upstreams_sampler_and_layout(tmp_path, tok, seed, length):
    texts = [("abcdefghijklmnopqrstuvwxyz"[i % 26]) * (1 + (i * 7) % 11) for i in range(30)]
    path = texts_file(tmp_path, texts)
    result = build_calibration_set(path, tok, samples_per_category=5, model_max_length=length, seed=seed)
    expected_ids, expected_mask = upstream_rows([ids(t) for t in texts], 5, length, seed)
    assert result.input_ids.tolist() == expected_ids
    assert result.attention_mask.tolist() == expected_mask
    assert result.stats_mask.tolist() == [[bool(m) for m in row] for row in expected_mask]


def test_one_random_stream_across_categories_as_upstream(tmp_path, tok):
    first = [ids(t) for t in ("aaa", "bbbb", "cc", "ddddd", "e")]
    second = [ids(t) for t in ("ff", "ggg", "hhhh")]
    a = texts_file(tmp_path, ["aaa", "bbbb", "cc", "ddddd", "e"], "a.jsonl")
    b = texts_file(tmp_path, ["ff", "ggg", "hhhh"], "b.jsonl")
    result = build_calibration_set(f"{a}:1,{b}:1", tok, model_max_length=8, seed=3)
    rng = random.Random(3)
    expected = []
    for docs in (first, second):  # the second category continues the first one's random stream
        row, at, taken = [0] * 8, 0, []
        while at < 8 and len(taken) < len(docs):
            index = rng.randint(0, len(docs) - 1)
            if index not in taken:
                taken.append(index)
                doc = docs[index][: 8 - at]
                row[at : at + len(doc)] = doc
                at += len(doc) + 1
        expected.append(row)
    assert result.input_ids.tolist() == expected


def test_packing_eos_separator_option(tmp_path, tok):
    path = texts_file(tmp_path, ["aaa", "bbb", "ccc", "ddd", "eee"])
    order = [ids(d) for d in load_documents(category(path), tok, seed=42)]
    result = build_calibration_set(
        path, tok, samples_per_category=3, model_max_length=8, seed=42, options=PackingOptions(separator="eos")
    )
    d0, d1, d2, d3, d4 = order
    assert result.input_ids.tolist() == [d0 + [EOS] + d1 + [EOS], d2 + [EOS] + d3 + [EOS], d4 + [EOS] + [PAD] * 4]
    assert result.attention_mask.tolist() == [[1] * 8, [1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]]
    assert result.stats_mask.tolist() == [
        [True, True, True, False, True, True, True, False],
        [True, True, True, False, True, True, True, False],
        [True, True, True, False, False, False, False, False],
    ]
    assert result.num_stat_tokens() == 15 and len(result) == 3 and result.seq_len == 8


def test_packing_cuts_a_document_and_drops_its_tail(tmp_path, tok):
    texts = ["abcde", "fghij", "klmno"]
    path = texts_file(tmp_path, texts)
    d0, d1, d2 = (ids(texts[i]) for i in SEED_42_ORDER[3])
    result = build_calibration_set(f"{path}:2", tok, model_max_length=8)
    assert result.input_ids.tolist() == [d0 + [0] + d1[:2], d2 + [0] * 3]
    assert result.stats_mask.tolist() == [[True] * 5 + [False, True, True], [True] * 5 + [False] * 3]
    assert torch.equal(result.attention_mask.bool(), result.stats_mask)
    with pytest.raises(CalibrationDataError) as info:
        build_calibration_set(f"{path}:3", tok, model_max_length=8)
    assert "asked for 3 samples but its 3 documents give only 2 packed sequences of 8 tokens" in str(info.value)
    fewer = build_calibration_set(f"{path}:3", tok, model_max_length=8, options=PackingOptions(allow_fewer=True))
    assert torch.equal(fewer.input_ids, result.input_ids)  # upstream: a warning and the sequences there are


def test_batches_count_as_upstream_with_sequences_per_count(tmp_path, tok):
    path = texts_file(tmp_path, [f"d{i}" for i in range(40)])
    result = build_calibration_set(f"{path}:3", tok, model_max_length=8, options=PackingOptions(sequences_per_count=4))
    assert len(result) == 12


def test_long_document_fills_a_sequence_alone(tmp_path, tok):
    path = texts_file(tmp_path, ["x" * 20])
    result = build_calibration_set(f"{path}:1", tok, model_max_length=6)
    assert result.input_ids.tolist() == [ids("x" * 6)] and bool(result.stats_mask.all())


def test_unpacked_documents_truncated_and_right_padded(tmp_path, tok):
    texts = ["a", "bbbb", "cccccccccc"]
    path = texts_file(tmp_path, texts)
    order = [ids(texts[i])[:6] for i in SEED_42_ORDER[3]]
    result = build_calibration_set(path, tok, samples_per_category=3, model_max_length=6, pack=False)
    assert result.input_ids.tolist() == [doc + [PAD] * (6 - len(doc)) for doc in order]
    assert result.attention_mask.tolist() == [[1] * len(doc) + [0] * (6 - len(doc)) for doc in order]
    assert torch.equal(result.stats_mask, result.attention_mask.bool())
    with pytest.raises(CalibrationDataError, match="its 3 documents give only 3 documents; ask for at most 3"):
        build_calibration_set(path, tok, samples_per_category=4, model_max_length=6, pack=False)


def test_composite_spec_and_default_samples(tmp_path, tok):
    first = texts_file(tmp_path, [f"doc {i}" for i in range(6)], "first.jsonl")
    second = tmp_path / "second.txt"
    second.write_text("line one\nline two\n")
    result = build_calibration_set(f"{first}:2,{second}", tok, samples_per_category=1, model_max_length=16)
    assert result.categories == [first, first, str(second)]
    assert result.input_ids.shape == (3, 16)
    with pytest.raises(CalibrationDataError, match="asked for 1024 samples"):
        build_calibration_set(first, tok, model_max_length=16)


def test_deterministic_under_seed(tmp_path, tok):
    path = texts_file(tmp_path, [f"document number {i:02d}" for i in range(40)])
    one = build_calibration_set(path, tok, samples_per_category=4, model_max_length=32, seed=42)
    two = build_calibration_set(path, tok, samples_per_category=4, model_max_length=32, seed=42)
    other = build_calibration_set(path, tok, samples_per_category=4, model_max_length=32, seed=7)
    assert torch.equal(one.input_ids, two.input_ids) and torch.equal(one.stats_mask, two.stats_mask)
    assert not torch.equal(one.input_ids, other.input_ids)
    assert calibration_texts(path, tok, 5, seed=1) == calibration_texts(path, tok, 5, seed=1)
    assert calibration_texts(path, tok, 5, seed=1) != calibration_texts(path, tok, 5, seed=2)


def test_calibration_texts_counts_and_interleaving(tmp_path, tok):
    a = texts_file(tmp_path, [f"a{i}" for i in range(5)], "a.jsonl")
    b = texts_file(tmp_path, [f"b{i}" for i in range(5)], "b.jsonl")
    texts = calibration_texts(f"{a}:3,{b}", tok, 2)
    assert [t[0] for t in texts] == ["a", "b", "a", "b", "a"]
    assert len(set(texts)) == 5
    with pytest.raises(CalibrationDataError, match="asked for 9 samples but it has only 5 non-empty documents"):
        calibration_texts(a, tok, 9)
    with pytest.raises(CalibrationDataError, match="num_samples must be an integer >= 1"):
        calibration_texts(a, tok, 0)


# --- batches and shards --------------------------------------------------------------------------


def make_set(n: int = 5, length: int = 4) -> CalibrationSet:
    input_ids = torch.arange(n * length).reshape(n, length)
    attention = torch.ones(n, length, dtype=torch.long)
    return CalibrationSet(input_ids, attention, attention.bool(), [f"c{i % 2}" for i in range(n)])


def test_batches_and_resume():
    calib = make_set()
    sizes = [b.input_ids.shape[0] for b in calib.batches(2)]
    assert sizes == [2, 2, 1]
    resumed = list(calib.batches(2, start=3))
    assert [b.input_ids.tolist() for b in resumed] == [calib.input_ids[3:5].tolist()]
    assert list(calib.batches(2, start=5)) == []
    assert torch.equal(torch.cat([b.stats_mask for b in calib.batches(3, start=1)]), calib.stats_mask[1:])
    with pytest.raises(CalibrationDataError, match=r"start must be in \[0, 5\]"):
        list(calib.batches(2, start=6))
    with pytest.raises(CalibrationDataError, match="batch_size must be a positive integer"):
        list(calib.batches(0))


def test_shard_is_strided():
    calib = make_set()
    shards = [calib.shard(rank, 2) for rank in range(2)]
    assert shards[0].input_ids.tolist() == calib.input_ids[[0, 2, 4]].tolist()
    assert shards[1].input_ids.tolist() == calib.input_ids[[1, 3]].tolist()
    assert shards[0].categories == ["c0", "c0", "c0"] and shards[1].categories == ["c1", "c1"]
    assert sum(s.num_stat_tokens() for s in shards) == calib.num_stat_tokens()
    assert len(calib.shard(0, 1)) == 5 and len(make_set(1).shard(1, 2)) == 0
    with pytest.raises(CalibrationDataError, match=r"rank must be in \[0, 1\]"):
        calib.shard(2, 2)
    with pytest.raises(CalibrationDataError, match="world_size must be a positive integer"):
        calib.shard(0, 0)


def test_shard_by_whole_batches():
    calib = make_set()
    shards = [calib.shard(rank, 2, unit=2) for rank in range(2)]
    assert shards[0].input_ids.tolist() == calib.input_ids[[0, 1, 4]].tolist()
    assert shards[1].input_ids.tolist() == calib.input_ids[[2, 3]].tolist()
    with pytest.raises(CalibrationDataError, match="unit must be a positive integer"):
        calib.shard(0, 2, unit=0)


# --- bad input -----------------------------------------------------------------------------------


def test_bad_arguments(tmp_path, tok):
    path = texts_file(tmp_path, ["abc"])
    with pytest.raises(CalibrationDataError, match="model_max_length must be an integer >= 2, got 1"):
        build_calibration_set(path, tok, 1, model_max_length=1)
    for bad in (0, -3):
        with pytest.raises(CalibrationDataError, match="samples_per_category must be an integer >= 1"):
            build_calibration_set(path, tok, bad, model_max_length=8)
    twice = build_calibration_set(f"{path}:1,{path}:1", tok, model_max_length=8)  # allowed, as upstream
    assert twice.input_ids.tolist() == [ids("abc") + [0] * 5] * 2
    with pytest.raises(CalibrationDataError, match="separator must be"):
        PackingOptions(separator="space")


def test_missing_unreadable_and_empty_inputs(tmp_path, tok):
    with pytest.raises(CalibrationDataError, match="no such file or folder"):
        build_calibration_set(str(tmp_path / "nope.jsonl"), tok, 1)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(CalibrationDataError) as info:
        load_documents(category(str(broken)), tok)
    assert f"cannot read '{broken}'" in str(info.value) and "\n" not in str(info.value)
    assert info.value.__cause__ is None
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CalibrationDataError, match="is empty"):
        load_documents(category(str(empty)), tok)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    with pytest.raises(CalibrationDataError, match="no non-empty documents"):
        build_calibration_set(f"{blank}:1", tok, model_max_length=8)
    no_rows = tmp_path / "none.parquet"
    datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})).to_parquet(
        str(no_rows)
    )
    with pytest.raises(CalibrationDataError, match="the dataset is empty"):
        load_documents(category(str(no_rows)), tok)


def test_local_source_errors(tmp_path, tok):
    path = texts_file(tmp_path, ["abc"])
    with pytest.raises(CalibrationDataError, match="a local file has no subsets"):
        build_calibration_set(f"{path}[x]:1", tok, model_max_length=8)
    with pytest.raises(CalibrationDataError, match="has only the 'train' split"):
        build_calibration_set(f"{path}(test):1", tok, model_max_length=8)
    odd = tmp_path / "data.xml"
    odd.write_text("<x/>")
    with pytest.raises(CalibrationDataError, match="unsupported file type 'data.xml'"):
        load_documents(category(str(odd)), tok)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    texts_file(mixed, ["a"], "a.jsonl")
    (mixed / "b.txt").write_text("b")
    with pytest.raises(CalibrationDataError, match=r"mixes file formats \(json, text\)"):
        load_documents(category(str(mixed)), tok)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "readme.md").write_text("nothing")
    with pytest.raises(CalibrationDataError, match="no data files"):
        load_documents(category(str(bare)), tok)


def test_without_the_datasets_package_reading_data_is_a_one_line_error(tmp_path, tok, monkeypatch):
    """The GPU images lack `datasets`: everything but reading a calibration source must still work."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['datasets'] = None\n"
            "import reap_fast.data, reap_fast.observe, reap_fast.prune\n"
            "assert 'reap_fast.data' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    path = write_jsonl(tmp_path / "calib.jsonl", [{"text": "some calibration text"}] * 4)
    with pytest.raises(CalibrationDataError, match="reading calibration data needs the 'datasets' package") as info:
        build_calibration_set(f"{path}:2", tok, model_max_length=8)
    assert "\n" not in str(info.value)
