import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from indextts.manifest import CleanConfig, Columns, DataConfig, ManifestError, ManifestSpec, clean_manifest, probe_audio
from indextts.text import TextConfig

SR = 16000
TEXT = "ሰላም ነው። እንዴት ነህ፧"


def wav(path, seconds, channels=1, sr=SR):
    n = int(seconds * sr)
    data = (np.random.default_rng(0).standard_normal((n, channels)) * 0.1).astype("float32")
    sf.write(path, data if channels > 1 else data[:, 0], sr, subtype="PCM_16")
    return path


def good_rows(tmp_path, n=6):
    rows = []
    for i in range(n):
        wav(tmp_path / f"u{i}.wav", 1.0 + 0.25 * i, channels=2 if i == 0 else 1)
        rows.append({"id": f"u{i}", "audio": f"u{i}.wav", "text": TEXT, "speaker": f"s{i % 2}", "emotion": "neutral"})
    return rows


def run(tmp_path, manifests, data=None, clean=None, text=None):
    data = data or DataConfig(manifests=tuple(str(m) for m in manifests))
    out = clean_manifest(data, text or TextConfig(), clean or CleanConfig(val_fraction=0.3), tmp_path / "out", progress=False)
    return pd.read_parquet(out.clean), pd.read_parquet(out.rejects), json.loads(out.summary.read_text())


def write_jsonl(path, rows, extra_lines=()):
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_every_reason_lands_in_rejects_and_counts_reconcile(tmp_path):
    rows = good_rows(tmp_path)
    wav(tmp_path / "short.wav", 0.1)
    wav(tmp_path / "long.wav", 4.0)
    raw = (tmp_path / "u5.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(raw[: int(len(raw) * 0.6)])
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEjunk")
    wav(tmp_path / "fast.wav", 1.0)
    dirty = [
        {"id": "e", "audio": "u1.wav", "text": "   ", "speaker": "s"},  # empty after normalisation
        {"id": "u0", "audio": "u0.wav", "text": TEXT, "speaker": "s0"},  # duplicate id
        {"id": "m", "audio": "gone.wav", "text": TEXT, "speaker": "s"},
        {"id": "sh", "audio": "short.wav", "text": "ሰ", "speaker": "s"},
        {"id": "lo", "audio": "long.wav", "text": TEXT, "speaker": "s"},
        {"id": "tr", "audio": "cut.wav", "text": TEXT, "speaker": "s"},
        {"id": "un", "audio": "junk.wav", "text": TEXT, "speaker": "s"},
        {"id": "nf", "audio": "u2.wav", "text": TEXT},  # no speaker
        {"id": "enc", "audio": "u3.wav", "text": "bad \ufffd", "speaker": "s"},
        {"id": "cps", "audio": "fast.wav", "text": "ሀ" * 80, "speaker": "s"},
    ]
    m = write_jsonl(tmp_path / "m.jsonl", rows + dirty, extra_lines=['{"id": "x", "audio": ', "", "[1, 2]"])
    clean, rejects, summary = run(tmp_path, [m], clean=CleanConfig(max_duration=3.0, val_fraction=0.3))
    by_id = dict(zip(rejects["utt_id"].fillna("<none>"), rejects["reason"]))
    assert by_id["e"] == "empty_text" and by_id["u0"] == "duplicate" and by_id["m"] == "missing_file"
    assert by_id["sh"] == "too_short" and by_id["lo"] == "too_long" and by_id["tr"] == "truncated"
    assert by_id["un"] == "unreadable" and by_id["nf"] == "missing_field" and by_id["enc"] == "bad_encoding"
    assert by_id["cps"] == "chars_per_second"
    malformed = rejects[rejects.reason == "malformed"]
    assert sorted(malformed["row"]) == [17, 19]  # the blank line 18 is not a row
    assert "line:" in malformed["detail"].iloc[0]
    assert summary["input_rows"] == len(rows) + len(dirty) + 2 == len(clean) + len(rejects)
    assert summary["reconciled"] and sum(summary["rejected_by_reason"].values()) == len(rejects)
    assert sorted(clean["utt_id"]) == [f"u{i}" for i in range(6)]
    first = clean.set_index("utt_id").loc["u0"]
    assert first.channels == 2 and first.sample_rate == SR and first.duration == pytest.approx(1.0)
    assert clean["audio_path"].str.startswith(str(tmp_path)).all()


def test_csv_tsv_parquet_with_mapped_columns_concatenate(tmp_path):
    rows = good_rows(tmp_path)
    df = pd.DataFrame(rows).rename(columns={"audio": "wav", "text": "transcript"})
    df.iloc[:2].to_csv(tmp_path / "a.csv", index=False)
    df.iloc[2:4].to_csv(tmp_path / "b.tsv", index=False, sep="\t")
    pq.write_table(pa.Table.from_pandas(df.iloc[4:], preserve_index=False), tmp_path / "c.parquet")
    (tmp_path / "a.csv").write_text((tmp_path / "a.csv").read_text() + "too,many,fields,here,now,really\n")
    data = DataConfig(manifests=(str(tmp_path / "a.csv"), str(tmp_path / "b.tsv"), str(tmp_path / "c.parquet")), columns=Columns(audio="wav", text="transcript"))
    clean, rejects, summary = run(tmp_path, [], data=data)
    assert sorted(clean["utt_id"]) == [f"u{i}" for i in range(6)]
    assert list(rejects["reason"]) == ["malformed"] and rejects["row"].iloc[0] == 3
    assert [m["rows"] for m in summary["manifests"]] == [3, 2, 2]


def test_per_manifest_column_override_and_language(tmp_path):
    rows = good_rows(tmp_path, 2)
    write_jsonl(tmp_path / "a.jsonl", [{**r, "wav": r.pop("audio")} for r in rows])
    data = DataConfig(manifests=(ManifestSpec(path=str(tmp_path / "a.jsonl"), columns={"audio": "wav"}, language="ti"),))
    clean, _, _ = run(tmp_path, [], data=data)
    assert len(clean) == 2 and set(clean["language"]) == {"ti"}


def test_replay_manifests_are_cleaned_alike_and_flagged_with_their_language(tmp_path):
    main = write_jsonl(tmp_path / "main.jsonl", good_rows(tmp_path))
    base = tmp_path / "base"
    base.mkdir()
    rows = [{"id": f"b{i}", "audio": f"b{i}.wav", "text": "The HOUSE is good.", "speaker": "en0"} for i in range(3)]
    for i in range(3):
        wav(base / f"b{i}.wav", 1.0 + 0.5 * i)
    rows.append({"id": "b3", "audio": "gone.wav", "text": "gone", "speaker": "en0"})  # the same rules apply
    replay = write_jsonl(base / "en.jsonl", rows)
    data = DataConfig(manifests=(str(main),), replay=(ManifestSpec(str(replay), language="en"),))
    clean, rejects, summary = run(tmp_path, [], data=data)
    assert clean["replay"].tolist() == [False] * 6 + [True] * 3
    assert set(clean.loc[clean["replay"], "language"]) == {"en"} and set(clean.loc[~clean["replay"], "language"]) == {"am"}
    assert clean.loc[clean["replay"], "text"].tolist() == ["the house is good."] * 3  # normalised alike
    assert rejects["reason"].tolist() == ["missing_file"] and summary["kept"] == 9
    with pytest.raises(ManifestError, match="data.replay entries need their language"):
        run(tmp_path, [], data=DataConfig(manifests=(str(main),), replay=(str(replay),)))


def test_missing_required_column_is_an_error_naming_file_and_key(tmp_path):
    rows = good_rows(tmp_path, 2)
    m = write_jsonl(tmp_path / "m.jsonl", [{k: v for k, v in r.items() if k != "speaker"} for r in rows])
    with pytest.raises(ManifestError, match=r"m\.jsonl.*speaker.*data\.columns\.speaker"):
        run(tmp_path, [m])
    with pytest.raises(ManifestError, match="nothere.jsonl"):
        run(tmp_path, [tmp_path / "nothere.jsonl"])


def test_trusted_durations_skip_probing(tmp_path):
    rows = [{"id": f"t{i}", "audio": f"nowhere/t{i}.wav", "text": TEXT, "speaker": "s", "duration": 2.0} for i in range(5)]
    rows[0]["duration"] = 0.2
    m = write_jsonl(tmp_path / "m.jsonl", rows)
    clean, rejects, summary = run(tmp_path, [m], clean=CleanConfig(trust_durations=True))
    assert len(clean) == 4 and clean["sample_rate"].isna().all()
    assert list(rejects["reason"]) == ["too_short"]
    assert summary["durations_from_manifest"] == 4


def test_split_is_deterministic_by_utt_id_and_salt(tmp_path):
    rows = good_rows(tmp_path)
    m = write_jsonl(tmp_path / "m.jsonl", rows)
    a, _, _ = run(tmp_path, [m], clean=CleanConfig(val_fraction=0.5))
    m2 = write_jsonl(tmp_path / "m2.jsonl", list(reversed(rows)))
    b, _, _ = run(tmp_path, [m2], clean=CleanConfig(val_fraction=0.5))
    assert dict(zip(a.utt_id, a.split)) == dict(zip(b.utt_id, b.split))
    assert "val" in set(a.split)


def test_held_out_texts_land_in_val_with_all_their_utterances(tmp_path):
    # 8 texts x 3 speakers; val_fraction 0: only whole held-out texts are in val
    texts = [f"ሰላም {k} ጤና" for k in "ሀለሐመሠረሰቀ"]
    rows = []
    for i in range(24):
        wav(tmp_path / f"v{i}.wav", 1.0 + 0.1 * (i % 5))
        rows.append({"id": f"v{i}", "audio": f"v{i}.wav", "text": texts[i % 8], "speaker": f"s{i % 3}"})
    m = write_jsonl(tmp_path / "m.jsonl", rows)
    clean, _, summary = run(tmp_path, [m], clean=CleanConfig(val_fraction=0.0, val_text_fraction=0.4))
    per_text = clean.groupby("text")["split"].agg(lambda s: set(s))
    assert all(s in ({"val"}, {"train"}) for s in per_text), per_text  # a text is held out whole or not at all
    held = sum(s == {"val"} for s in per_text)
    assert 0 < held < len(texts) and (clean["split"] == "val").sum() == 3 * held
    reversed_, _, _ = run(tmp_path, [write_jsonl(tmp_path / "r.jsonl", rows[::-1])],
                          clean=CleanConfig(val_fraction=0.0, val_text_fraction=0.4))
    assert dict(zip(clean.utt_id, clean.split)) == dict(zip(reversed_.utt_id, reversed_.split))  # by hash
    # off (the default): the split is the utterance hash alone, as before
    plain, _, _ = run(tmp_path, [m], clean=CleanConfig(val_fraction=0.3))
    again, _, _ = run(tmp_path, [m], clean=CleanConfig(val_fraction=0.3, val_text_fraction=0.0))
    assert plain["split"].tolist() == again["split"].tolist()


def test_probe_reports_missing_file(tmp_path):
    info = probe_audio(str(tmp_path / "none.wav"))
    assert info.reason == "missing_file"


def test_stable_hash_is_xxh64_of_salt_and_key():
    import pyarrow as pa

    from indextts.manifest import stable_fraction, stable_hash64

    # Published XXH64 (seed 0) values: "" and "a".
    assert stable_hash64(["", "a"]).tolist() == [0xEF46DB3751D8E999, 0xD24EC4F1A98C6E5B]
    assert stable_hash64(pa.array(["b"]), salt="a").tolist() == stable_hash64(["ab"]).tolist()
    f = stable_fraction([f"utt{i}" for i in range(1000)])
    assert ((f >= 0) & (f < 1)).all() and 0.4 < (f < 0.5).mean() < 0.6  # roughly uniform


def test_vectorised_xxh64_equals_the_xxhash_package():
    # Every length from 0 to 200 bytes (all stripe/word/byte tails), multi-byte characters, a
    # sliced array (non-zero offset), a chunked array and a salt.
    import random

    import pyarrow as pa
    import xxhash

    from indextts.manifest import stable_hash64

    rnd = random.Random(7)
    alphabet = "ab0 \x00\u1200\u1361\uac00\u00e9\U0001f600"
    keys = [""] + ["".join(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 80))) for _ in range(3000)]
    keys += ["x" * n for n in range(201)]
    want = [xxhash.xxh64_intdigest(k.encode()) for k in keys]
    assert stable_hash64(keys).tolist() == want
    arr = pa.array(["pad"] + keys)
    assert stable_hash64(arr.slice(1)).tolist() == want
    assert stable_hash64(pa.chunked_array([arr.slice(1, 100), arr.slice(101)])).tolist() == want
    assert stable_hash64(keys[:50], salt="s\u1200").tolist() == [xxhash.xxh64_intdigest(("s\u1200" + k).encode()) for k in keys[:50]]


def test_duplicates_compare_resolved_paths_and_keep_paths_as_written(tmp_path):
    # One file listed four ways: plainly, through "..", through a symlink to the file and through
    # a symlinked folder. Only the first listing survives; clean.parquet keeps each kept path as
    # the user wrote it (made absolute), not resolved.
    (tmp_path / "a").mkdir()
    wav(tmp_path / "a" / "b.wav", 1.0)
    wav(tmp_path / "a" / "c.wav", 1.5)
    (tmp_path / "link.wav").symlink_to(tmp_path / "a" / "b.wav")
    (tmp_path / "dirlink").symlink_to(tmp_path / "a", target_is_directory=True)
    rows = [
        {"id": "u1", "audio": "a/b.wav", "text": TEXT, "speaker": "s"},
        {"id": "u2", "audio": "a/../a/b.wav", "text": TEXT, "speaker": "s"},
        {"id": "u3", "audio": "link.wav", "text": TEXT, "speaker": "s"},
        {"id": "u4", "audio": str(tmp_path / "dirlink" / "b.wav"), "text": TEXT, "speaker": "s"},
        {"id": "u5", "audio": "dirlink/c.wav", "text": TEXT, "speaker": "s"},  # another file: kept
        {"id": "u6", "audio": "a//./c.wav", "text": TEXT, "speaker": "s"},  # c.wav again
    ]
    m = write_jsonl(tmp_path / "m.jsonl", rows)
    clean, rejects, summary = run(tmp_path, [m])
    assert sorted(clean["utt_id"]) == ["u1", "u5"]
    assert dict(zip(clean["utt_id"], clean["audio_path"])) == {"u1": str(tmp_path / "a/b.wav"), "u5": str(tmp_path / "dirlink/c.wav")}
    assert list(rejects["utt_id"]) == ["u2", "u3", "u4", "u6"] and set(rejects["reason"]) == {"duplicate"}
    detail = dict(zip(rejects["utt_id"], rejects["detail"]))
    assert f"row 1 of {m}" in detail["u3"] and str(tmp_path / "a/b.wav") in detail["u3"]
    assert f"row 5 of {m}" in detail["u6"]
    assert summary["rejected_by_reason"]["duplicate"] == 4


def test_resolve_paths_is_realpath(tmp_path, monkeypatch):
    from indextts import manifest as M
    from indextts.manifest import resolve_paths

    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "f.wav").write_bytes(b"")
    (tmp_path / "real" / "sub" / "g.wav").write_bytes(b"")
    (tmp_path / "up").symlink_to(tmp_path / "real" / "sub", target_is_directory=True)  # up/.. is real/, not tmp_path
    (tmp_path / "real" / "rel.wav").symlink_to("sub/g.wav")  # a relative link
    (tmp_path / "chain.wav").symlink_to(tmp_path / "real" / "rel.wav")
    paths = [
        "real/f.wav", "real/./f.wav", "real//f.wav", "up/../f.wav", "up/g.wav", "real/rel.wav", "chain.wav",
        "missing/x.wav", "real/missing/../f.wav", "up/../sub/../../real/f.wav", "real/", "real/sub/..",
    ]
    arr = pa.chunked_array([[str(tmp_path / p) for p in paths[:5]], [str(tmp_path / p) for p in paths[5:]]])
    want = [os.path.realpath(tmp_path / p) for p in paths]
    assert resolve_paths(arr).to_pylist() == want
    plain = pa.chunked_array([[str(tmp_path / "real" / "sub" / "g.wav")]])  # a folder without links
    assert resolve_paths(plain) is plain  # nothing to resolve: the same array back
    # Rows are resolved in slices; slices across chunk ends, some with nothing to change, give the same.
    for rows in (1, 2, 3):
        monkeypatch.setattr(M, "_RESOLVE_ROWS", rows)
        assert resolve_paths(arr).to_pylist() == want
        got = resolve_paths(arr.combine_chunks())
        assert isinstance(got, pa.Array) and got.to_pylist() == want
        tidy = pa.chunked_array([[str(tmp_path / "real" / "sub" / "g.wav")] * 2, [str(tmp_path / "real" / "sub" / "g.wav")]])
        assert resolve_paths(tidy) is tidy


def test_spans_give_the_same_outputs_as_one_pass(tmp_path, monkeypatch):
    # Cleaning runs span by span (normalise ahead, check in order, write row groups). Tiny spans
    # must give exactly what one span gives: duplicates across spans, the val guarantee, rejects.
    from indextts import manifest as M

    rows = good_rows(tmp_path, 6)
    rows += [dict(rows[1], id="dup-file"), dict(rows[2]), {"id": "e", "audio": "u3.wav", "text": " ", "speaker": "s"}]
    m = write_jsonl(tmp_path / "m.jsonl", rows, extra_lines=["{bad"])
    cfg = CleanConfig(val_fraction=1e-12)  # no utterance is in val by its hash: the guarantee picks one
    one = run(tmp_path / "one", [m], clean=cfg)
    monkeypatch.setattr(M, "_SPAN_ROWS", 2)
    many = run(tmp_path / "many", [m], clean=cfg)
    for a, b in zip(one[:2], many[:2]):
        pd.testing.assert_frame_equal(a, b)
    assert one[2] == many[2]
    assert (one[0]["split"] == "val").sum() == 1
    val = one[0].set_index("utt_id")["split"].idxmax()
    fracs = dict(zip(one[0]["utt_id"], M.stable_fraction(list(one[0]["utt_id"]))))
    assert val == min(fracs, key=fracs.get)
    assert set(one[1]["reason"]) == {"duplicate", "empty_text", "malformed"}
    meta = pq.ParquetFile(tmp_path / "many" / "out" / "clean.parquet").metadata
    assert meta.num_row_groups > 1
    # summary.json's counts, gathered span by span, are the table's.
    summary, clean = many[2], many[0]
    assert summary["languages"] == clean["language"].value_counts().to_dict()
    assert summary["emotions"] == {str(k): v for k, v in clean["emotion"].value_counts(dropna=False).to_dict().items()}
    assert summary["speakers"] == clean["speaker"].nunique() and summary["kept"] == len(clean)
    assert summary["utterances_by_split"] == {"train": int((clean.split == "train").sum()), "val": 1}
    # The transcripts are stored uncompressed, every other column zstd.
    codecs = {meta.schema.column(i).name: meta.row_group(0).column(i).compression for i in range(meta.num_columns)}
    assert {k for k, v in codecs.items() if v == "UNCOMPRESSED"} == {"text", "raw_text"}
    assert {v for k, v in codecs.items() if k not in ("text", "raw_text")} == {"ZSTD"}


def test_duplicate_groups_survive_hash_collisions(monkeypatch):
    # Rows are grouped by a 64-bit hash; with every hash equal, the groups must still be exact.
    from indextts import manifest as M

    keys = pa.chunked_array([["a", "b", "a", "c"], ["b", "d", "a"]])
    want = M._groups(keys)
    assert M._groups(keys.combine_chunks()).tolist() == want.tolist()  # chunks are gathered from, not joined
    monkeypatch.setattr(M, "_hash64", lambda arr: np.zeros(len(arr), dtype=np.uint64))
    got = M._groups(keys)
    assert want.tolist() == [0, 1, 0, 2, 1, 3, 0]
    same = lambda g: [[i == j for j in g] for i in g]  # noqa: E731 (numbering may differ, grouping may not)
    assert same(got.tolist()) == same(want.tolist())
