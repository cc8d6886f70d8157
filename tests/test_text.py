import pyarrow as pa
import pytest

from indextts.text import TextConfig, has_bad_encoding, normalize_array, normalize_text

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
