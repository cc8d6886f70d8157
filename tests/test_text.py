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


def test_plain_row_shortcut_equals_every_step_on_mixed_text():
    # normalize_array lets rows of "plain" characters skip the Unicode steps; the result must be
    # exactly what running every step on every row gives.
    import random

    from indextts.text import _language_steps, _unicode_steps

    rng = random.Random(0)
    alphabet = list("abcXYZ 019.,;?!:'\"-\t") + [chr(c) for c in range(0x1200, 0x1260, 3)] + list(
        "\u1361\u1362\u1363\u00a0\u200b\u201c\u201d\u2014\u00c9\u0301\u1100\u1161\u11ab한글ｶﾀカナ東\u0007\ufffd"
    )
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    texts += ["ሰላም ነው።", "plain ascii only", None]
    arr = pa.array(texts, type=pa.string())
    for cfg in (AM, TextConfig(language="ko"), TextConfig(language="ja", unicode_form="NFKC"), TextConfig(language="am", lowercase=False, punctuation_map={"!": "።"})):
        full = _language_steps(_unicode_steps(arr, cfg), cfg, ascii_case=False)
        assert normalize_array(arr, cfg).to_pylist() == full.to_pylist(), cfg
