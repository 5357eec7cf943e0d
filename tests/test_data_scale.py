"""Corpora of any size (easy_context.training.corpus): the samples read from disk are exactly the in-memory
pipeline's, the tokenization cache is reused and invalidated by content, a pre-tokenized dataset is read in place
without being materialised, and ``prepare`` -> ``train.py`` gives the same run as training on the source."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from easy_context import training as T
from easy_context.training import corpus as C

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "assets" / "smollm2-135m"
EOS, PAD = 99, 0

needs_tokenizer = pytest.mark.skipif(not (TOKENIZER / "tokenizer.json").exists(),
                                     reason="needs the SmolLM2 tokenizer fetched by scripts/setup.sh")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A cache of this test's own."""
    path = tmp_path / "cache"
    monkeypatch.setenv("EASY_CONTEXT_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def _documents(docs, segments=1):
    """In-memory TokenDocuments over ``docs``, the flat tokens split into ``segments`` arrays."""
    flat = np.array([t for d in docs for t in d], dtype=np.int32)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return C.TokenDocuments(np.array_split(flat, segments), lengths, starts, "test")


def _assert_same(reference, samples):
    got = samples.to_dict()
    assert set(got) == set(reference)
    for key in reference:
        assert got[key].dtype == reference[key].dtype, key
        assert torch.equal(got[key], reference[key]), key


def test_lazy_samples_are_exactly_pack_documents():
    rng = np.random.default_rng(0)
    for _ in range(300):  # empty, short and long documents; every packing option; 1 to 3 segments
        docs = [rng.integers(1, 50, size=rng.integers(0, 25)).tolist() for _ in range(rng.integers(1, 8))]
        if not any(docs):
            continue
        seq, pack, reset = int(rng.integers(1, 13)), bool(rng.integers(2)), bool(rng.integers(2))
        reference = T.pack_documents(docs, seq, EOS, PAD, pack=pack, reset_position_ids=reset)
        _assert_same(reference, C.PackedSamples(_documents(docs, int(rng.integers(1, 4))), seq, EOS, PAD, pack=pack,
                                                reset_position_ids=reset))


def test_rows_read_like_a_tensor_and_fingerprints_follow_the_options():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]]
    reference = T.pack_documents(docs, 4, EOS, PAD)
    samples = C.PackedSamples(_documents(docs), 4, EOS, PAD)
    assert len(samples) == len(samples["input_ids"]) == len(reference["input_ids"])
    rows = torch.tensor([2, 0, 2])
    for key in ("input_ids", "target_ids", "position_ids", "doc_start"):
        assert torch.equal(samples[key][rows], reference[key][rows])
        assert torch.equal(samples[key][1], reference[key][1])
        assert torch.equal(samples[key][rows[1:]], reference[key][rows[1:]])
    with pytest.raises(IndexError):
        samples.rows([len(samples)])
    prints = {C.PackedSamples(_documents(docs), seq, EOS, PAD, pack=pack, reset_position_ids=reset).fingerprint
              for seq in (4, 5) for pack in (True, False) for reset in (True, False)}
    assert len(prints) == 8
    assert T.padding_fraction(samples, len(samples), 4) == T.padding_fraction(docs, len(samples), 4)


@needs_tokenizer
def test_every_source_gives_todays_samples(tmp_path, tokenizer, dataset):
    """A .jsonl of text, the same text as a saved dataset, and its tokens as a pre-tokenized saved dataset and
    .arrow file: each gives exactly what load_documents -> tokenize_documents -> pack_documents gave."""
    import datasets

    texts = [json.loads(line)["text"] for line in Path(dataset).read_text().splitlines()]
    tokens = T.tokenize_documents(texts, tokenizer)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "text_ds"))
    pretokenized = datasets.Dataset.from_dict({"input_ids": tokens})
    pretokenized.save_to_disk(str(tmp_path / "tok_ds"))
    arrow = next((tmp_path / "tok_ds").glob("*.arrow"))
    for spec in (dataset, tmp_path / "text_ds", tmp_path / "tok_ds", arrow):
        for options in (dict(pack=True), dict(pack=False), dict(reset_position_ids=True)):
            reference = T.pack_documents(tokens, 128, tokenizer.eos_token_id, PAD, **options)
            _assert_same(reference, T.open_samples(str(spec), tokenizer, 128, PAD, **options))
            if spec != dataset:
                break  # the packing options are covered by the first source
    prepared = C.prepare(str(tmp_path / "tok_ds"), tokenizer, tmp_path / "prepared", progress=False)
    assert C.open_store(prepared).meta["dtype"] == "uint16"
    direct = T.open_samples(str(tmp_path / "tok_ds"), tokenizer, 128, PAD)
    _assert_same(direct.to_dict(), T.open_samples(str(prepared), tokenizer, 128, PAD))
    assert T.open_samples(str(prepared), tokenizer, 128, PAD).fingerprint == direct.fingerprint
    text_fp = T.open_samples(dataset, tokenizer, 128, PAD).fingerprint
    assert T.open_samples(str(tmp_path / "text_ds"), tokenizer, 128, PAD).fingerprint != text_fp  # other files


@needs_tokenizer
def test_the_cache_is_reused_and_invalidated_by_content(tmp_path, tokenizer, dataset, cache, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text(Path(dataset).read_text())
    first = T.open_samples(str(data), tokenizer, 128, PAD)
    stores = sorted(p.name for p in (cache / "tokens").iterdir() if C.is_store(p))
    assert len(stores) == 1 and not list((cache / "tokens").glob(".*.tmp"))

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as m:  # unchanged content, in another place: the cache is opened, not rebuilt
        m.setattr(C, "write_store", fail)
        moved = tmp_path / "moved.jsonl"
        moved.write_text(data.read_text())
        again = T.open_samples(str(moved), tokenizer, 128, PAD)
    assert again.fingerprint == first.fingerprint
    data.write_text(data.read_text().replace("the", "a"))  # changed content: tokenized again
    changed = T.open_samples(str(data), tokenizer, 128, PAD)
    assert changed.fingerprint != first.fingerprint
    assert len([p for p in (cache / "tokens").iterdir() if C.is_store(p)]) == 2
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    reference = T.pack_documents(T.tokenize_documents(texts, tokenizer), 128, tokenizer.eos_token_id, PAD)
    _assert_same(reference, changed)


def test_a_failed_build_leaves_no_store(tmp_path):
    def documents():
        yield [1, 2, 3]
        raise ValueError("broken source")

    with pytest.raises(ValueError, match="broken source"):
        C.write_store(tmp_path / "store", documents(), vocab_size=100, meta={"content": "x"}, progress=False)
    assert list(tmp_path.iterdir()) == []
    C.write_store(tmp_path / "store", iter([[1, 2], [], [3]]), vocab_size=100, meta={"content": "x"}, progress=False)
    docs = C.open_store(tmp_path / "store")
    assert docs.meta["dtype"] == "uint16" and docs.lengths.tolist() == [2, 1]
    assert docs.document(1).tolist() == [3]


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_pretokenized_dataset_is_read_in_place(tmp_path):
    """20M tokens (80 MB of int32 on disk): opening it and reading a step's samples keeps the resident memory
    far below the corpus, and only the samples asked for are read."""
    import datasets
    import pyarrow as pa

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 8192, size=5_000)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = pa.array(rng.integers(0, 49152, size=int(offsets[-1]), dtype=np.int32))
    table = pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), values)})
    datasets.Dataset(table).save_to_disk(str(tmp_path / "big"), max_shard_size="32MB")
    flat = values.to_numpy()
    del table, values
    import gc

    gc.collect()
    before = _rss()
    samples = T.PackedSamples(C.open_documents(str(tmp_path / "big"), tokenizer=None), 2048, 0, 0)
    assert len(samples.docs.segments) >= 2  # several Arrow shards, read in place
    batch = T.global_batch_indices(5, len(samples), 8, seed=0)
    rows = samples.rows(batch)
    grown = _rss() - before
    assert grown < 20 * 2**20, f"resident memory grew by {grown / 2**20:.0f} MB for an 80 MB corpus"
    stream = np.concatenate([np.append(flat[a:b], 0) for a, b in zip(offsets[:-1], offsets[1:])])
    for i, r in enumerate(batch.tolist()):
        assert rows["input_ids"][i].tolist() == stream[r * 2048:(r + 1) * 2048].tolist()


def _command(*args, timeout=300):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("ACCELERATE_USE_CPU", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _error_lines(proc):
    return [line for line in proc.stderr.splitlines() if ": error: " in line]


@needs_tokenizer
def test_prepare_then_train(tmp_path, dataset):
    out = tmp_path / "prepared"
    proc = _command("-m", "easy_context.training", "prepare", "--dataset", dataset, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prepared 4 documents" in proc.stdout and C.is_store(out)
    again = _command("-m", "easy_context.training", "prepare", "--dataset", dataset, "--out", str(out))
    assert again.returncode == 2 and len(_error_lines(again)) == 1 and "exists" in _error_lines(again)[0]
    assert "Traceback" not in again.stderr
    missing = _command("-m", "easy_context.training", "prepare", "--dataset", "/nonexistent.jsonl", "--out",
                       str(tmp_path / "x"))
    assert missing.returncode == 2 and "does not exist" in _error_lines(missing)[0]
    assert _command("-m", "easy_context.training", "prepare", "--help").returncode == 0
    # The prepared folder is the source's data: the same samples, the same fingerprint (a run resumes across them).
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    prepared, source = (T.open_samples(spec, tokenizer, 128, PAD) for spec in (str(out), dataset))
    assert prepared.fingerprint == source.fingerprint
    _assert_same(source.to_dict(), prepared)
    proc = _command("train.py", "--model", "tiny", "--seq-length", "128", "--steps", "2", "--dataset", str(out),
                    "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"data: {len(source)} samples of 128 tokens" in proc.stdout
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<a-token-of-another-tokenizer>"])
    with pytest.raises(ValueError, match="was prepared with the tokenizer"):
        T.open_samples(str(out), other, 128, PAD)
