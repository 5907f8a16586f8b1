"""mmcore index / search / read DIR: a folder as an index of passage vectors."""
import json
import os
import random

import pytest
import torch

from mmcore import cli, indexing, reading
from mmcore.indexing import BadIndexError, Index, PassageEncoder

FACTS = {  # file -> (planted sentence, query)
    "a/minutes.txt": ("The treasurer of the rowing club is Philippa Quist.",
                      "Who is the treasurer of the rowing club?"),
    "b/long.txt": ("The lighthouse keeper keeps his spare keys inside a blue teapot.",
                   "Where does the lighthouse keeper keep his spare keys?"),
    "notes07.txt": ("Our wifi password was changed to marmalade sandwich.",
                    "What is the new wifi password?"),
}
_W = ("town river market bridge farmer barley mill road winter harvest church school "
      "sheep wool canal baker").split()


def _filler(rng, sentences):
    return " ".join(" ".join(rng.choice(_W) for _ in range(rng.randint(9, 14))).capitalize()
                    + "." for _ in range(sentences))


def _folder(root, n=10, seed=0, long_sentences=150):
    """n short files (about 30-250 tokens), a short file and a long file (~1.5k tokens: the
    long-document path when long_tokens is small), the planted facts of the files made."""
    rng = random.Random(seed)
    files = {f"notes{i:02d}.txt": _filler(rng, rng.randint(3, 25)) for i in range(n)}
    files["a/minutes.txt"] = _filler(rng, 12)
    files["b/long.txt"] = _filler(rng, long_sentences)
    for f, (fact, _) in FACTS.items():
        if f not in files:
            continue
        words = files[f].split(". ")
        words.insert(len(words) * 2 // 3, fact[:-1])
        files[f] = ". ".join(words)
    for f, t in files.items():
        p = root / f
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(t)
    return root


@pytest.fixture(scope="module")
def pe():
    # small batches and a small long-document threshold: both paths, several batches
    return PassageEncoder(window=(64, 64), batch_tokens=1024, long_tokens=1000)


def _passages(out):
    """Every live passage of an index: sorted [(file, start, end, text)], vectors by key."""
    idx = Index.open(out)
    _, rows = idx._load()
    got, vec = [], {}
    for sh, live in rows:
        for r in live.tolist():
            key = (sh.files[int(sh.t["file"][r])], int(sh.t["start"][r]), int(sh.t["end"][r]))
            got.append(key + (sh.text(r),))
            vec[key] = sh.t["vectors"][r]
    return sorted(got), vec


def test_index_search_planted_facts_rank_1(tmp_path, pe):
    src = _folder(tmp_path / "docs")
    res = indexing.index(src, tmp_path / "idx", encoder=pe, batch_files=6)
    assert res["encoded"] == res["files"] == 12 and not res["skipped"]
    assert res["passages"] > 60 and res["tokens"] > 2500
    for f, (fact, q) in FACTS.items():
        top = indexing.search(tmp_path / "idx", q, top_k=3, encoder=pe)
        assert top[0]["file"] == f and top[0]["text"] == fact, (q, top)
        text = (src / f).read_text()
        assert text[top[0]["start"]:top[0]["end"]] == fact
    # the index's score of a passage == mmcore.read of its file (batched varlen / long path
    # == the reader's encode_long)
    for f, (fact, q) in FACTS.items():
        r = reading.read((src / f).read_text(), q, encoder=pe.enc, tokenizer=pe.tok,
                         window=(64, 64), progress=False, top_k=1)
        hit = indexing.search(tmp_path / "idx", q, top_k=1, encoder=pe)[0]
        assert r["passages"][0]["start"] == hit["start"]
        assert abs(r["passages"][0]["score"] - hit["score"]) <= 2e-4


def test_reindex_touches_only_changed_files(tmp_path, pe):
    src = _folder(tmp_path / "docs")
    out = tmp_path / "idx"
    indexing.index(src, out, encoder=pe, batch_files=6)
    (src / "notes03.txt").write_text("The ferry to the island leaves at seven sharp. " * 3)
    (src / "notes04.txt").write_text((src / "notes04.txt").read_text() + " One more line.")
    (src / "notes05.txt").unlink()
    (src / "new.txt").write_text("A brand new file about the annual cheese festival. " * 2)
    res = indexing.index(src, out, encoder=pe, batch_files=6)
    assert (res["encoded"], res["removed"], res["unchanged"]) == (3, 1, 9)
    assert res["files"] == 12
    top = indexing.search(out, "When does the ferry leave?", top_k=1, encoder=pe)[0]
    assert top["file"] == "notes03.txt"
    assert all(h["file"] != "notes05.txt" for h in
               indexing.search(out, "barley mill", top_k=200, encoder=pe))
    for f in ("notes06.txt", "notes07.txt", "notes08.txt"):  # their shard: 1 file left live
        (src / f).write_text(f"The {f} file now talks about the harbour wall. " * 2)
    assert indexing.index(src, out, encoder=pe, batch_files=6)["encoded"] == 3
    again = indexing.index(src, out, encoder=pe)
    assert again["encoded"] == 0 and again["unchanged"] == 12
    # shards no file maps to any more are gone; the same content as a fresh index
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(os.listdir(out / "shards")) == sorted(m["shards"])
    _, rows = Index.open(out)._load()  # no shard is more than half dead rows
    assert all(2 * len(live) >= sh.t["vectors"].shape[0] for sh, live in rows)
    fresh = indexing.index(src, tmp_path / "fresh", encoder=pe)
    assert fresh["passages"] == again["passages"]
    assert _passages(out)[0] == _passages(tmp_path / "fresh")[0]


def test_killed_run_resumes_to_the_same_index(tmp_path, pe):
    src = _folder(tmp_path / "docs")
    out = tmp_path / "idx"

    class Killed(BaseException):
        pass

    def kill(n):
        if n == 2:
            raise Killed()

    with pytest.raises(Killed):
        indexing.index(src, out, encoder=pe, batch_files=4, _after_commit=kill)
    m = json.loads((out / "manifest.json").read_text())
    assert 0 < len(m["files"]) < 12  # two batches committed
    (out / "shards" / "999999.safetensors.tmp123").write_bytes(b"half a shard")  # a torn write
    res = indexing.index(src, out, encoder=pe, batch_files=4)
    assert res["encoded"] == 12 - len(m["files"]) and res["files"] == 12
    assert "999999.safetensors.tmp123" not in os.listdir(out / "shards")
    fresh = tmp_path / "fresh"
    indexing.index(src, fresh, encoder=pe, batch_files=4)
    (a, va), (b, vb) = _passages(out), _passages(fresh)
    assert a == b
    for k in va:
        torch.testing.assert_close(va[k], vb[k], rtol=0, atol=1e-5)


def test_bad_files_are_skipped_and_counted(tmp_path, pe, capsys):
    src = _folder(tmp_path / "docs", n=3, long_sentences=20)
    (src / "blob.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (src / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (src / "empty.txt").write_text("")
    (src / "blank.txt").write_text("  \n\n ")
    os.symlink("loop_b", src / "loop_a")
    os.symlink("loop_a", src / "loop_b")
    os.symlink("nowhere.txt", src / "dangling.txt")
    os.symlink("..", src / "a" / "up")  # a directory loop
    res = indexing.index(src, tmp_path / "idx", encoder=pe)
    assert res["files"] == 5
    assert res["skipped"] == {
        "blob.bin": "binary (NUL byte at offset 8)",
        "latin1.txt": "not UTF-8 (byte 0xe9 at offset 3)", "empty.txt": "empty",
        "blank.txt": "empty", "loop_a": "symlink loop", "loop_b": "symlink loop",
        "dangling.txt": "dangling symlink",
        "a/up": "symlink loop (a link to a directory already visited)"}
    # the CLI prints the count and one line per skipped file, exit 0
    assert cli.main(["index", str(src), "--out", str(tmp_path / "idx2"), "--window", "64",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "8 skipped" in out and "skipped latin1.txt: not UTF-8" in out


def test_refused_indexes_one_line_exit_2(tmp_path, pe, capsys):
    src = _folder(tmp_path / "docs", n=2, long_sentences=20)
    out = tmp_path / "idx"
    indexing.index(src, out, encoder=pe)
    man = out / "manifest.json"
    m = json.loads(man.read_text())
    # another model
    m2 = dict(m, model=dict(m["model"], fingerprint="0123456789abcdef"))
    man.write_text(json.dumps(m2))
    with pytest.raises(BadIndexError, match="another model"):
        indexing.index(src, out, encoder=pe)
    with pytest.raises(BadIndexError, match="written by model"):
        indexing.search(out, "x", encoder=pe)
    # another format version
    man.write_text(json.dumps(dict(m, version=99)))
    assert cli.main(["search", str(out), "-q", "barley"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "index format version 99" in err
    # another window, not an index, no such dir, empty query
    man.write_text(json.dumps(m))
    assert cli.main(["index", str(src), "--out", str(out), "--window", "32"]) == 2
    assert "another window" in capsys.readouterr().err
    assert cli.main(["search", str(src), "-q", "barley"]) == 2
    assert "not an mmcore index" in capsys.readouterr().err
    assert cli.main(["index", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert cli.main(["search", str(out), "-q", "  "]) == 2
    assert "--query is empty" in capsys.readouterr().err
    assert cli.main(["read", str(src), "-q", "x", "--image", "fig.png"]) == 2
    assert "--image is not supported when reading a folder" in capsys.readouterr().err


def test_cli_search_json_and_read_folder(tmp_path, capsys):
    src = _folder(tmp_path / "docs", n=4, long_sentences=20)
    out = tmp_path / "idx"
    assert cli.main(["index", str(src), "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["files"] == 6 and res["encoded"] == 6
    fact, q = FACTS["a/minutes.txt"]
    assert cli.main(["search", str(out), "-q", q, "--top-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["passages"]
    assert len(hits) == 2 and fact in hits[0]["text"] and hits[0]["file"] == "a/minutes.txt"
    assert cli.main(["read", str(src), "-q", q, "--top-k", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert fact in r["passages"][0]["text"] and r["files"] == 6
