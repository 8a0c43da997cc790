"""TokenDataset: every malformed directory gives a DataError naming the file; batches are pure."""

import json

import numpy as np
import pytest
import torch

from blockloop import data
from blockloop.data import DataError, TokenDataset
from blockloop.prepare.common import TokenDirWriter
from blockloop.tokenizers import CharTokenizer

TEXT = "to be, or not to be: that is the question.\n" * 20


def write_dir(path, train_ids, val_ids, vocab_size, tokenizer_meta):
    with TokenDirWriter(path, "test", vocab_size, tokenizer_meta, "test") as w:
        w.write("train", np.asarray(train_ids))
        w.write("val", np.asarray(val_ids))
        return w.commit()


@pytest.fixture
def char_dir(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    ids = tok.encode(TEXT)
    n = int(len(ids) * 0.9)
    write_dir(tmp_path / "char", ids[:n], ids[n:], tok.vocab_size, tok.to_meta())
    return tmp_path / "char"


@pytest.fixture
def position_dir(tmp_path):
    """gpt2-kind data whose token at position i is i, so a window shows where it was cut."""
    write_dir(tmp_path / "pos", np.arange(20_000), np.arange(3_000), 50257, {"kind": "gpt2"})
    return tmp_path / "pos"


def edit_meta(directory, **changes):
    path = directory / "meta.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def test_valid_dir_and_accessors(char_dir):
    ds = TokenDataset(char_dir)
    tok = CharTokenizer.from_text(TEXT)
    assert ds.vocab_size == tok.vocab_size
    assert ds.meta["tokenizer"]["itos"] == tok.itos
    ds.meta["vocab_size"] = -1  # a copy: the dataset is unaffected
    assert ds.vocab_size == tok.vocab_size
    assert ds.num_tokens("train") + ds.num_tokens("val") == len(TEXT)
    train = np.fromfile(char_dir / "train.bin", dtype="<u2")
    val = np.fromfile(char_dir / "val.bin", dtype="<u2")
    assert ds.tokenizer().decode(np.concatenate([train, val])) == TEXT


def test_missing_dir(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.*blockloop prepare"):
        TokenDataset(tmp_path / "nowhere")


def test_missing_meta(char_dir):
    (char_dir / "meta.json").unlink()
    with pytest.raises(DataError, match=r"meta\.json: missing"):
        TokenDataset(char_dir)


def test_bad_json(char_dir):
    (char_dir / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta\.json: not valid JSON"):
        TokenDataset(char_dir)


def test_meta_not_an_object(char_dir):
    (char_dir / "meta.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"meta\.json: expected a JSON object"):
        TokenDataset(char_dir)


@pytest.mark.parametrize("key", ["vocab_size", "dtype", "tokenizer", "train_tokens", "format"])
def test_missing_key(char_dir, key):
    edit_meta(char_dir, **{key: None})
    with pytest.raises(DataError, match=rf"meta\.json: missing key\(s\) {key}"):
        TokenDataset(char_dir)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dtype": "float32"}, "unknown dtype 'float32'"),
        ({"format": "nanogpt"}, "format is 'nanogpt'"),
        ({"vocab_size": "65"}, "vocab_size must be"),
        ({"vocab_size": 70000}, "does not fit dtype uint16"),
        ({"tokenizer": {"kind": "bpe"}}, "tokenizer must be an object with kind"),
        ({"tokenizer": {"kind": "char", "itos": ["a"]}}, "itos has 1 entries"),
        ({"tokenizer": {"kind": "gpt2"}}, "gpt2 tokenizer needs vocab_size 50257"),
    ],
)
def test_malformed_meta_values(char_dir, changes, message):
    edit_meta(char_dir, **changes)
    with pytest.raises(DataError, match=message) as info:
        TokenDataset(char_dir)
    assert "meta.json" in str(info.value)


def test_missing_bin(char_dir):
    (char_dir / "val.bin").unlink()
    with pytest.raises(DataError, match=r"val\.bin: missing"):
        TokenDataset(char_dir)


def test_bin_size_not_multiple_of_dtype(char_dir):
    with open(char_dir / "train.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(DataError, match=r"train\.bin: \d+ bytes is not a multiple of 2"):
        TokenDataset(char_dir)


def test_bin_length_disagrees_with_meta(char_dir):
    with open(char_dir / "train.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(DataError, match=r"train\.bin: holds \d+ tokens but meta\.json says train_tokens"):
        TokenDataset(char_dir)


def test_token_id_out_of_vocab(char_dir):
    ids = np.fromfile(char_dir / "val.bin", dtype="<u2")
    ids[7] = 999
    ids.tofile(char_dir / "val.bin")
    with pytest.raises(DataError, match=r"val\.bin: token id 999 at position 7 is >= vocab_size"):
        TokenDataset(char_dir)


def test_sampled_scan_of_large_files_still_checks_both_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_CHUNK_TOKENS", 16)
    ids = np.zeros(1000, dtype=np.int64)
    write_dir(tmp_path / "big", ids, ids[:50], 10, CharTokenizer(list("abcdefghij")).to_meta())
    TokenDataset(tmp_path / "big", scan_limit_tokens=64)
    for position in (0, 999):
        bad = ids.astype("<u2")
        bad[position] = 10
        bad.tofile(tmp_path / "big" / "train.bin")
        with pytest.raises(DataError, match=rf"train\.bin: token id 10 at position {position}"):
            TokenDataset(tmp_path / "big", scan_limit_tokens=64)


def test_check_block_size(char_dir):
    ds = TokenDataset(char_dir)
    n_val = ds.num_tokens("val")
    ds.check_block_size(n_val - 1)
    with pytest.raises(
        DataError, match=rf"val\.bin: {n_val} tokens, fewer than block_size \+ 1.*block_size <= {n_val - 1}"
    ):
        ds.check_block_size(n_val)
    with pytest.raises(DataError, match=r"val\.bin"):
        ds.get_batch("val", 2, n_val, seed=0, step=0)


def test_uint32_dir(tmp_path):
    write_dir(tmp_path / "u32", np.arange(100) * 700, np.arange(20) * 700, 70_000, {"kind": "gpt2"})
    meta = json.loads((tmp_path / "u32" / "meta.json").read_text())
    assert meta["dtype"] == "uint32"
    # gpt2 kind with vocab 70000 is rejected, so relabel as a 70000-entry char vocabulary.
    itos = [chr(c) for c in range(0x20, 0x20 + 70_000 + 2048) if not 0xD800 <= c < 0xE000][:70_000]
    edit_meta(tmp_path / "u32", tokenizer={"kind": "char", "itos": itos})
    x, y = TokenDataset(tmp_path / "u32").get_batch("train", 4, 5, seed=3, step=0)
    assert torch.all(x % 700 == 0) and torch.all(y - x == 700)


def test_batch_shape_dtype_and_shift(position_dir):
    ds = TokenDataset(position_dir)
    x, y = ds.get_batch("train", batch_size=8, block_size=32, seed=1, step=0)
    assert x.shape == y.shape == (8, 32)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    # Token == position, so each row must be a contiguous window inside the file.
    assert torch.equal(x - x[:, :1], torch.arange(32).expand(8, 32))
    assert torch.equal(y, x + 1)
    assert int(y.max()) <= 20_000 - 1 and int(x.min()) >= 0


def test_batches_are_pure_functions_of_their_arguments(position_dir):
    ds = TokenDataset(position_dir)
    base = dict(split="train", batch_size=16, block_size=8, seed=7, step=3)
    x0, y0 = ds.get_batch(**base)
    torch.manual_seed(123)
    np.random.seed(123)
    x1, y1 = TokenDataset(position_dir).get_batch(**base)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    for change in ({"step": 4}, {"seed": 8}, {"micro_step": 1}, {"rank": 1}, {"split": "val"}):
        other, _ = ds.get_batch(**{**base, **change})
        assert not torch.equal(other, x0), change
    # Global RNGs are neither used nor advanced.
    torch.manual_seed(0)
    np.random.seed(0)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    ds.get_batch(**base)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_batch_offsets_cover_the_file(position_dir):
    ds = TokenDataset(position_dir)
    starts = torch.cat([ds.get_batch("val", 64, 10, seed=0, step=s)[0][:, 0] for s in range(20)])
    # 1280 uniform draws over 2990 valid starts reach both ends' neighbourhoods.
    assert int(starts.min()) < 100 and int(starts.max()) > 3000 - 10 - 100
    assert int(starts.max()) <= 3000 - 10 - 1


def test_get_batch_argument_errors(position_dir):
    ds = TokenDataset(position_dir)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        ds.get_batch("train", 2, 4, seed=-1, step=0)
    with pytest.raises(ValueError, match="split must be one of"):
        ds.get_batch("test", 2, 4, seed=0, step=0)
    with pytest.raises(ValueError, match="batch_size and block_size"):
        ds.get_batch("train", 0, 4, seed=0, step=0)


def test_short_split_advice_is_one_that_works(tmp_path, char_dir):
    ds = TokenDataset(char_dir)
    # A char data set has no --val_fraction flag: the advice must not name one.
    with pytest.raises(DataError) as err:
        ds.check_block_size(ds.num_tokens("val"))
    assert "val_fraction" not in str(err.value)
    # A 1-token split cannot hold any window: "block_size <= 0" would be no advice at all.
    write_dir(tmp_path / "one", np.arange(50) % 5, np.array([1]), 5,
              CharTokenizer(list("abcde")).to_meta())
    with pytest.raises(DataError, match="prepare more data") as err:
        TokenDataset(tmp_path / "one").check_block_size(4)
    assert "block_size <=" not in str(err.value)
