import pyarrow as pa
import pytest

from indextts.text import TextConfig, count_chars, has_bad_encoding, normalize_array, normalize_text

AM = TextConfig(language="am")


@pytest.mark.parametrize(
    "raw, want",
    [
        ("ሰላም፡ነው፡፡", "ሰላም ነው።"),  # Ethiopic word space -> space, double -> full stop
        ("ሰላም ነው::", "ሰላም ነው።"),
        ("ሰላም , ዓለም ;ጤና ?", "ሰላም፣ ዓለም፤ጤና፧"),  # Latin punctuation after Ge'ez -> Ethiopic
        ("ዋጋው 3.5 ብር ነው.", "ዋጋው 3.5 ብር ነው።"),  # a decimal point is not a full stop
        ("  አዲስ\tአበባ \n", "አዲስ አበባ"),
        ("\ufeffአዲስ\u200bአበባ", "አዲስአበባ"),  # invisible characters removed
        ("“ጥቅስ” — ‘ሀ’", '"ጥቅስ" - \'ሀ\''),
        ("Hello WORLD", "hello world"),
        ("a\u0007b", "ab"),  # control characters removed
    ],
)
def test_amharic_rules(raw, want):
    assert normalize_text(raw, AM) == want


def test_korean_jamo_composed_and_hangul_kept():
    ko = TextConfig(language="ko")
    decomposed = "\u1112\u1161\u11ab\u1100\u1173\u11af"  # 한글 as conjoining jamo
    assert normalize_text(decomposed, ko) == "한글"
    assert normalize_text("안녕하세요, 세계!", ko) == "안녕하세요, 세계!"


def test_japanese_kana_kept_and_nfkc_folds_halfwidth():
    ja = TextConfig(language="ja", unicode_form="NFKC")
    assert normalize_text("ｶﾀｶﾅとひらがな。", ja) == "カタカナとひらがな。"
    # No Chinese normaliser: kanji are not converted or romanised.
    assert normalize_text("東京へ行きます。", ja) == "東京へ行きます。"


def test_user_punctuation_map_applies_last():
    cfg = TextConfig(language="am", punctuation_map={"!": "።"})
    assert normalize_text("ሰላም!", cfg) == "ሰላም።"


def test_array_and_single_string_agree_and_nulls_survive():
    arr = pa.array(["ሰላም፡ነው", None, "  "])
    out = normalize_array(arr, AM).to_pylist()
    assert out == [normalize_text("ሰላም፡ነው", AM), None, ""]


def test_bad_encoding_detected():
    assert has_bad_encoding(pa.array(["ok ሰላም", "bad\ufffd", "CafÃ©", "ok"])).to_pylist() == [False, True, True, False]


def test_plain_row_shortcut_equals_every_step_on_mixed_text():
    # normalize_array lets rows of "plain" characters skip the Unicode steps; the result must be
    # exactly what running every step on every row gives.
    import random

    from indextts.text import _language_steps, _unicode_steps

    rng = random.Random(0)
    alphabet = list("abcXYZ 019.,;?!:'\"-\t") + [chr(c) for c in range(0x1200, 0x1260, 3)] + list(
        "\u1361\u1362\u1363\u00a0\u200b\u201c\u201d\u2014\u00c9\u0301\u1100\u1161\u11ab한글ｶﾀカナ東\u0007\ufffd"
    )
    # Canonical compositions (first and second characters), composition exclusions, singletons.
    alphabet += ["e\u0301", "\u0928\u093c", "\u0929", "\u0b47\u0b3e", "\u0b4b", "\u0958", "\u00e0", "A\u030a", "\u212b"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    texts += ["ሰላም ነው።", "plain ascii only", None]
    arr = pa.array(texts, type=pa.string())
    cfgs = (AM, TextConfig(language="ko"), TextConfig(language="ja", unicode_form="NFKC"), TextConfig(language="am", unicode_form="NFD"))
    for cfg in cfgs + (TextConfig(language="am", lowercase=False, punctuation_map={"!": "።"}),):
        full = _language_steps(_unicode_steps(arr, cfg), cfg, ascii_case=False)
        assert normalize_array(arr, cfg).to_pylist() == full.to_pylist(), cfg


def test_polars_route_equals_arrow_steps_on_plain_text():
    # Rows of plain characters take the language rules in polars (Rust regex); the result must be
    # what Arrow's RE2 kernels give for every step. Alphabet: the rules' triggers and their
    # neighbours, so every rule fires, overlaps and chains (ሀ.ለ.ሐ., ፡ ፡፡, " , ").
    import random

    from indextts.text import _language_steps, _unicode_steps

    rng = random.Random(1)
    alphabet = list("ab AB 09 .,;?:!$\\()") + [chr(c) for c in range(0x1200, 0x1380, 7)] + list("\u1361\u1361\u1362\u1364\u1367\u1368 \u1680")
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(5000)]
    texts += ["ሀ.ለ.ሐ.", "ሀ ፡ ፡፡ ለ", "ሀ , ለ ;ሐ ?", "3.5 ሀ.5 ሀ. 5", "  ሀ   ።  ", "", None]
    # Rows where each trigger is rare, so that rules run on the rows that need them only.
    words = ["ሰላም", "ነው", "ab", "3"]
    rare = list(".,;?:") + ["::", "\u1361", "\u1362", " \u1367", "  "]
    texts += [" ".join(rng.choice(words) for _ in range(6)) + (rng.choice(rare) if rng.random() < 0.2 else "") for _ in range(5000)]
    arr = pa.array(texts, type=pa.string())
    for cfg in (AM, TextConfig(language="am", lowercase=False, punctuation_map={"!": "\u1362", "$": "\\1$1"}), TextConfig(language="am", punctuation_map={"a": "\u00c9"}),
                TextConfig(language="am", punctuation_map={"\u1367": "$1?\\1"})):  # one non-ASCII character: a regex class in polars
        full = _language_steps(_unicode_steps(arr, cfg), cfg, ascii_case=False)
        assert normalize_array(arr, cfg).to_pylist() == full.to_pylist(), cfg


def test_rules_mean_the_same_in_re2_and_rust_regex():
    # \s, \d, \w and \b are ASCII in RE2 and Unicode in Rust's regex: the rules spell them out.
    from indextts.text import _LANGUAGE_RULES, _rust_replacement

    for rules in _LANGUAGE_RULES.values():
        for rule in rules:
            assert not any(f"\\{c}" in rule.pattern for c in "sSdDwWbB"), rule.pattern
    assert _rust_replacement("\\1x\\2$\\\\") == "${1}x${2}$$\\"


def test_count_chars_skips_spaces_only():
    assert count_chars(pa.array(["ሰላም ነው", "", None, "a  b\u3000"])).to_pylist() == [5, 0, 0, 3]
    import random

    rng = random.Random(4)
    texts = ["".join(rng.choice("a ሀ😀\u00e9\u3000") for _ in range(rng.randint(0, 50))) for _ in range(100_000)]
    arr = pa.chunked_array([pa.array(texts[:70_000]), pa.array(texts[70_000:])])
    assert count_chars(arr.slice(5)).to_pylist() == [len(t) - t.count(" ") for t in texts[5:]]
    assert count_chars(pa.array(texts, pa.large_string())).to_pylist() == [len(t) - t.count(" ") for t in texts]


def test_blocks_of_rows_give_what_each_row_gives(monkeypatch):
    # The plain route runs blockwise rules on rows joined by U+0000; small blocks, rows that end
    # or start with a rule's context, U+0000 inside other rows, and a user map that forces the
    # row by row route must all give the full sequence's strings.
    import random

    from indextts import text as T

    monkeypatch.setattr(T, "_BLOCK_ROWS", 3)
    rng = random.Random(3)
    pieces = ["ሀ.", ".5", "፡", " ፡", "ለ ,", "?", "3.", " ", "ab", "\u1362", "::", ":"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 4))) for _ in range(3000)] + ["a\x00b", None, "ሀ.\x00"]
    arr = pa.array(texts, type=pa.string())
    for cfg in (AM, TextConfig(language="am", punctuation_map={"\x00": "x"}), TextConfig(language="ko")):
        full = T._language_steps(T._unicode_steps(arr, cfg), cfg, ascii_case=False)
        assert normalize_array(arr, cfg).to_pylist() == full.to_pylist(), cfg
