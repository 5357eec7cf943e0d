"""Tests of easy_context.assets: the R serialization reader (on hand-built bytes), the missing-asset error, and
the real fetched assets (Jane Austen's novels and SmolLM2-135M-Instruct; skipped until scripts/setup.sh ran)."""

import gzip
import math
import struct
import zlib

import pytest

from easy_context import assets
from easy_context.assets import ENV_VAR, NOVELS, fetch
from easy_context.assets.rdata import RFormatError, RVector, iter_rdb_records, read_lazyload_db, unserialize

# ---------------------------------------------------------------------------------------------------------------
# Hand-built R serialization bytes (XDR, big-endian), following R's serialize.c layout.
# ---------------------------------------------------------------------------------------------------------------

HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10
UTF8, LATIN1 = 1 << 3, 1 << 2


def i32(*values):
    return struct.pack(f">{len(values)}i", *values)


def header(version=3):
    out = b"X\n" + i32(version, 0x040201, 0x020300 if version == 2 else 0x030500)
    return out + (i32(5) + b"UTF-8" if version == 3 else b"")


def charsxp(text, levels=UTF8, encoding="utf-8"):
    if text is None:
        return i32(9, -1)  # NA_character_
    raw = text.encode(encoding)
    return i32(9 | (levels << 12), len(raw)) + raw


def strsxp(items, attrs=b""):
    flags = 16 | (HAS_ATTR if attrs else 0)
    return i32(flags, len(items)) + b"".join(charsxp(s) for s in items) + attrs


def symbol(name):
    return i32(1) + charsxp(name, levels=0)


def ref(index):
    return i32(255 | (index << 8))


def attributes(*pairs):
    """A tagged pairlist of (tag bytes, value bytes) terminated by NULL."""
    return b"".join(i32(2 | HAS_TAG) + tag + value for tag, value in pairs) + i32(254)


def test_reader_character_vector_with_names_and_na():
    names = strsxp(["title", "missing", "accent"])
    body = strsxp(["PRIDE AND PREJUDICE", None, "café"], attrs=attributes((symbol("names"), names)))
    value = unserialize(header(3) + body)
    assert isinstance(value, RVector) and value.rtype == 16
    assert value == ["PRIDE AND PREJUDICE", None, "café"]
    assert value.named() == {"title": "PRIDE AND PREJUDICE", "missing": None, "accent": "café"}


def test_reader_version2_latin1_ints_logicals_and_symbol_refs():
    # list(a = 1:2, b = c(TRUE, NA)) whose elements carry a "names" attribute reusing the symbol by reference.
    a = i32(13 | HAS_ATTR, 2, 1, 2) + attributes((symbol("names"), strsxp(["x", "y"])))
    b = i32(10 | HAS_ATTR, 2, 1, -(2**31)) + attributes((ref(1), strsxp(["p", "q"])))
    lst = i32(19 | HAS_ATTR, 2) + a + b + attributes((ref(1), strsxp(["a", "b"])))
    latin = i32(16, 1) + charsxp("Émile", levels=LATIN1, encoding="latin-1")
    value = unserialize(header(2) + lst)
    assert value.named()["a"] == [1, 2] and value[0].named() == {"x": 1, "y": 2}
    assert value.named()["b"] == [True, None] and value[1].attrs["names"] == ["p", "q"]
    assert unserialize(header(2) + latin) == ["Émile"]


def test_reader_rejects_bad_input():
    with pytest.raises(RFormatError):
        unserialize(b"A\n" + header(3)[2:] + strsxp(["x"]))  # ASCII format is not supported
    with pytest.raises(RFormatError):
        unserialize(header(3) + strsxp(["x", "y"])[:-3])  # truncated
    with pytest.raises(RFormatError):
        unserialize(header(3) + i32(3))  # a closure


def _record(payload):
    return struct.pack(">I", len(payload)) + zlib.compress(payload)


def test_lazyload_db_records_and_index(tmp_path):
    first = header(3) + strsxp(["EMMA", "", "By Jane Austen"])
    second = header(3) + strsxp(["Persuasion"])
    rdb = _record(first) + _record(second)
    assert [payload for _, payload in iter_rdb_records(rdb)] == [first, second]
    offsets = [offset for offset, _ in iter_rdb_records(rdb)]
    assert offsets == [0, len(_record(first))]

    # The .rdx index: list(variables = list(persuasion = c(off, len), emma = ...), ...), gzip-compressed.
    pairs = i32(13, 2, offsets[1], 1) + i32(13, 2, 0, 1)  # integer vectors c(offset, length)
    variables = i32(19 | HAS_ATTR, 2) + pairs
    variables += attributes((symbol("names"), strsxp(["persuasion", "emma"])))
    index = i32(19 | HAS_ATTR, 1) + variables + attributes((ref(1), strsxp(["variables"])))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(header(3) + index))
    objects = read_lazyload_db(tmp_path / "Rdata.rdb")
    assert objects == {"persuasion": ["Persuasion"], "emma": ["EMMA", "", "By Jane Austen"]}

    with pytest.raises(RFormatError):
        list(iter_rdb_records(rdb[:-5]))  # truncated zlib stream


# ---------------------------------------------------------------------------------------------------------------
# Locations and the missing-asset error
# ---------------------------------------------------------------------------------------------------------------


def test_missing_assets_give_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nothing-here"))
    assert assets.assets_dir() == tmp_path / "nothing-here"
    assert assets.austen_dir() == tmp_path / "nothing-here" / "austen"
    assert not assets.have_assets()
    for loader in (assets.austen_texts, assets.austen_text, assets.load_tokenizer, assets.load_smollm2):
        with pytest.raises(FileNotFoundError, match=r"bash scripts/setup\.sh.*python -m easy_context\.assets fetch"):
            loader()


def test_cli_prints_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert fetch.main(["path"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# The real assets
# ---------------------------------------------------------------------------------------------------------------

needs_assets = pytest.mark.skipif(not assets.have_assets(), reason=f"assets missing: {assets.SETUP_HINT}")


@pytest.fixture(scope="module")
def tokenizer():
    return assets.load_tokenizer()


@pytest.fixture(scope="module")
def model():
    model, _ = assets.load_smollm2()
    return model


@needs_assets
@pytest.mark.real_model
def test_austen_novels():
    texts = assets.austen_texts()
    assert list(texts) == [slug for slug, _, _ in NOVELS]
    sizes = {slug: len(text) for slug, text in texts.items()}
    assert all(380_000 < n < 950_000 for n in sizes.values()), sizes
    assert 3_500_000 < sum(sizes.values()) < 4_500_000, sizes
    assert texts["pride_prejudice"].startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in texts["pride_prejudice"][:2000]
    assert texts["sense_sensibility"].startswith("SENSE AND SENSIBILITY")
    assert texts["emma"].startswith("EMMA")
    assert "Captain Wentworth" in texts["persuasion"]
    assert "\ufffd" not in "".join(texts.values())  # every string decoded cleanly
    assert sorted(p.name for p in assets.austen_dir().glob("*.txt")) == sorted(f"{s}.txt" for s in texts)


@needs_assets
@pytest.mark.real_model
def test_austen_is_about_a_million_tokens(tokenizer):
    n_tokens = len(tokenizer(assets.austen_text()).input_ids)
    assert 900_000 < n_tokens < 1_100_000, n_tokens


@needs_assets
@pytest.mark.real_model
def test_converted_model_architecture(model, tokenizer):
    import torch

    assert type(model).__name__ == "LlamaForCausalLM"
    assets.check_smollm2_config(model.config)  # 30 layers, hidden 576, 9/3 heads, vocab 49152, rope_theta 1e5
    assert getattr(model.config, "quantization_config", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert not list(assets.smollm2_path().glob("*.gguf"))


@needs_assets
@pytest.mark.real_model
def test_perplexity_on_austen_excerpt(model, tokenizer):
    import torch

    text = assets.austen_texts()["pride_prejudice"]
    start = text.index("It is a truth universally acknowledged")
    ids = tokenizer(text[start : start + 20_000], return_tensors="pt").input_ids[:, :1024]
    assert ids.shape[1] == 1024
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    ppl = math.exp(loss)
    print(f"SmolLM2-135M perplexity on 1,024 tokens of Pride and Prejudice: {ppl:.2f}")
    assert 10 < ppl < 80, ppl
