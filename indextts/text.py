"""Text normalisation per language, vectorised with Arrow compute kernels.

The official IndexTTS frontend routes any non-Latin text through a Chinese normaliser, which
mangles Ge'ez, Hangul and kana. This module never does: it applies Unicode normalisation, strips
invisible and control characters, unifies quotes/dashes/whitespace, and applies a per-language
punctuation map (Ethiopic punctuation for Amharic) plus the user's own map from config.

Everything runs on whole Arrow arrays (``normalize_array``) so millions of transcripts take
seconds; ``normalize_text`` is the same code on one string, so the two can never disagree.
Numbers are left as written: verbalising them is language-specific and belongs to the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from indextts.config import pairs

# Zero-width and byte-order marks that survive copy-paste from the web and split tokens.
_INVISIBLE = "[\u200b\u200c\u200d\u2060\ufeff\u00ad]"
# C0/C1 control characters (tab and newline are handled as whitespace first).
_CONTROL = "[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]"

# Applied to every language: typographic variants that only fragment the vocabulary.
_COMMON_MAP: tuple[tuple[str, str], ...] = (
    ("\u201c", '"'), ("\u201d", '"'), ("\u201e", '"'), ("\u00ab", '"'), ("\u00bb", '"'),
    ("\u2018", "'"), ("\u2019", "'"), ("\u201a", "'"), ("\u2032", "'"),
    ("\u2013", "-"), ("\u2014", "-"), ("\u2212", "-"),
    ("\u2026", "..."),
)

# Per-language rules as (regex, replacement), applied in order after the common map.
_LANGUAGE_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    # Amharic / Ge'ez: the Ethiopic word space (፡) is a word separator, so it becomes a space;
    # two of them, or "::", are an informal full stop. Latin punctuation typed next to Ge'ez
    # letters is mapped to its Ethiopic form so one sentence mark gets one token.
    "am": (
        ("\u1361\\s*\u1361", "\u1362"),  # ፡፡ -> ።
        ("::", "\u1362"),  # :: -> ።
        ("\u1361", " "),  # ፡ -> space
        ("([\u1200-\u137f])\\s*\\.([^0-9]|$)", "\\1\u1362\\2"),  # ሰላም. -> ሰላም። (not 3.5)
        ("([\u1200-\u137f])\\s*,", "\\1\u1363"),  # , -> ፣
        ("([\u1200-\u137f])\\s*;", "\\1\u1364"),  # ; -> ፤
        ("([\u1200-\u137f])\\s*\\?", "\\1\u1367"),  # ? -> ፧
        ("\\s+([\u1362-\u1368])", "\\1"),  # no space before Ethiopic punctuation
    ),
    # Korean: NFC composes decomposed jamo (macOS file names, some corpora) into syllables;
    # nothing else is needed. Japanese: NFKC (set in config) folds half-width kana; the ideographic
    # full stop and comma are kept as they are.
    "ko": (),
    "ja": (),
}


@dataclass(frozen=True)
class TextConfig:
    """The ``text`` config section: how transcripts are normalised.

    Stored in every checkpoint's model.json, because inference must normalise the same way.
    """

    language: str = "am"  # ISO 639-1 code; rows without a language column get it; picks the rules
    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFC"  # NFC keeps Hangul syllables composed
    lowercase: bool = True  # lowercases cased scripts (Latin, Cyrillic); Ge'ez/Hangul/kana have no case
    punctuation_map: dict[str, str] = field(default_factory=dict)  # extra literal replacements, applied last


def language_rules(language: str) -> tuple[tuple[str, str], ...]:
    """The built-in regex rules for ``language`` (an empty tuple for languages without any)."""
    return _LANGUAGE_RULES.get(language.split("-")[0].lower(), ())


def normalize_array(texts: pa.Array | pa.ChunkedArray, cfg: TextConfig) -> pa.Array | pa.ChunkedArray:
    """Normalise an Arrow string array; nulls stay null.

    Args:
        texts: transcripts as an Arrow ``string``/``large_string`` array.
        cfg: the text section.

    Returns:
        An array of the same length with normalised text (possibly empty strings).
    """
    out = pc.utf8_normalize(texts, form=cfg.unicode_form)
    out = pc.replace_substring_regex(out, pattern=_INVISIBLE, replacement="")
    out = pc.replace_substring_regex(out, pattern="[\t\n\r\u00a0\u2000-\u200a\u202f\u205f\u3000]", replacement=" ")
    out = pc.replace_substring_regex(out, pattern=_CONTROL, replacement="")
    for src, dst in _COMMON_MAP:
        out = pc.replace_substring(out, pattern=src, replacement=dst)
    for pattern, repl in language_rules(cfg.language):
        out = pc.replace_substring_regex(out, pattern=pattern, replacement=repl)
    for src, dst in pairs(cfg.punctuation_map):
        out = pc.replace_substring(out, pattern=src, replacement=dst)
    if cfg.lowercase:
        out = pc.utf8_lower(out)
    out = pc.replace_substring_regex(out, pattern=" {2,}", replacement=" ")
    return pc.utf8_trim_whitespace(out)


def normalize_text(text: str, cfg: TextConfig) -> str:
    """Normalise one transcript exactly as :func:`normalize_array` does."""
    return normalize_array(pa.array([text], type=pa.string()), cfg)[0].as_py()


def has_bad_encoding(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """True where a transcript holds U+FFFD (a decoding error upstream) or typical UTF-8-read-as-
    Latin-1 mojibake (``Ã``/``â€`` sequences); such rows are rejected rather than trained on."""
    return pc.match_substring_regex(texts, pattern="\ufffd|Ã[\u0080-\u00bf]|â€")
