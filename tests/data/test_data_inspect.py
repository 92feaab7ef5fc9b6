"""`vpmoe preprocess inspect --show 1` prints the first 2000 characters of a long document with a note; --full prints it all."""

from megatron_vpmoe.cli import main
from megatron_vpmoe.tokenizers.train import train_tokenizer


def test_inspect_truncates_a_long_document_unless_full(tmp_path, capsys):
    novel = "".join(f"Chapter {i}. It was a dark and stormy night; the rain fell in torrents.\n" for i in range(300))
    (tmp_path / "novel.txt").write_text(novel)
    train_tokenizer("bpe", [str(tmp_path / "novel.txt")], 300).save(tmp_path / "tok")
    assert main(["preprocess", "--input", str(tmp_path / "novel.txt"), "--output-prefix", str(tmp_path / "s"),
                 "--tokenizer", str(tmp_path / "tok"), "--no-progress"]) == 0
    prefix = next(tmp_path.glob("s*_text_document.idx")).with_suffix("")
    capsys.readouterr()
    assert main(["preprocess", "inspect", str(prefix), "--tokenizer", str(tmp_path / "tok"), "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert novel[:2000] in out and novel[:2001] not in out
    note = [line for line in out.splitlines() if line.startswith("[... first 2000 of ")]
    assert len(note) == 1 and note[0].endswith(" characters; --full prints the whole document]")
    assert int(note[0].split()[4]) >= len(novel)  # the decoded document (its end-of-document token included)
    assert main(["preprocess", "inspect", str(prefix), "--tokenizer", str(tmp_path / "tok"), "--full"]) == 0
    out = capsys.readouterr().out
    assert novel.rstrip("\n") in out and "--full prints" not in out
