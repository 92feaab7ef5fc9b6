"""`vpmoe tokenizer train --input DIR` reads the directory's text files (as preprocess does) and says how much it read."""

from pathlib import Path

import pytest

from megatron_vpmoe.cli import main
from megatron_vpmoe.tokenizers.corpus import load_documents
from megatron_vpmoe.utils.errors import InputError


def _corpus(root: Path) -> int:
    (root / "sub").mkdir(parents=True)
    texts = {"a.txt": "the quick brown fox jumps over the lazy dog\n" * 40,
             "sub/b.md": "a second document, with other words in it\n" * 30,
             "sub/c.rst": "Title\n=====\n\nrestructured text body\n" * 20}
    for name, text in texts.items():
        (root / name).write_text(text)
    (root / "sub" / "skip.bin").write_bytes(b"\xff\xfe not text")  # not a text file: not read
    return sum(len(t.encode()) for t in texts.values())


def test_train_accepts_a_directory_and_reports_files_and_bytes(tmp_path, capsys):
    nbytes = _corpus(tmp_path / "corpus")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "300",
                 "--input", str(tmp_path / "corpus"), "--output", str(out)]) == 0
    line = capsys.readouterr().out
    assert f"from 3 file(s), {nbytes:,} bytes" in line
    assert (out / "vpmoe_tokenizer.json").is_file()


def test_load_documents_counts_files_and_bytes_read(tmp_path):
    nbytes = _corpus(tmp_path / "corpus")
    docs = load_documents([str(tmp_path / "corpus")])
    assert (len(docs), docs.files, docs.nbytes) == (3, 3, nbytes)
    first = load_documents([str(tmp_path / "corpus")], max_bytes=100)
    assert (first.files, first.nbytes) == (1, 100)


def test_empty_directory_and_missing_path_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: directory has no input files"):
        load_documents([str(tmp_path / "empty")])
    with pytest.raises(InputError, match="nope: no input files"):
        load_documents([str(tmp_path / "nope")])
