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

import functools
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from indextts.config import pairs

# Zero-width and byte-order marks that survive copy-paste from the web and split tokens.
_INVISIBLE = "[\u200b\u200c\u200d\u2060\ufeff\u00ad]"
# C0/C1 control characters (tab and newline are handled as whitespace first).
_CONTROL = "[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]"
# Whitespace variants that become a plain space.
_SPACES = "[\t\n\r\u00a0\u2000-\u200a\u202f\u205f\u3000]"

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

    Each Arrow string kernel costs a pass over every row, so rows made only of printable ASCII
    and characters that the Unicode steps (normal form, invisible, whitespace, control, common
    map) cannot change -- nearly every row of a Ge'ez, Hangul or kana corpus -- skip those steps
    and are lowercased with the ASCII kernel. The other rows take every step. Both routes give
    exactly what the full sequence of steps gives (see :func:`_plain_class`).

    Args:
        texts: transcripts as an Arrow ``string``/``large_string`` array.
        cfg: the text section.

    Returns:
        An array of the same length with normalised text (possibly empty strings).
    """
    chunked = isinstance(texts, pa.ChunkedArray)
    arr = (texts.combine_chunks() if texts.num_chunks != 1 else texts.chunk(0)) if chunked else texts
    other = pc.fill_null(pc.match_substring_regex(arr, pattern=_plain_class(cfg.unicode_form)), False)
    n_other = pc.sum(other).as_py() or 0
    if n_other == 0:
        out = _language_steps(arr, cfg, ascii_case=True)
    elif n_other == len(arr):
        out = _language_steps(_unicode_steps(arr, cfg), cfg, ascii_case=False)
    else:
        out = _language_steps(arr, cfg, ascii_case=True)
        full = _language_steps(_unicode_steps(arr.filter(other), cfg), cfg, ascii_case=False)
        out = pc.replace_with_mask(out, other, full.cast(out.type))
    return pa.chunked_array([out], type=out.type) if chunked else out


def _unicode_steps(out: pa.Array, cfg: TextConfig) -> pa.Array:
    out = pc.utf8_normalize(out, form=cfg.unicode_form)
    out = pc.replace_substring_regex(out, pattern=_INVISIBLE, replacement="")
    out = pc.replace_substring_regex(out, pattern=_SPACES, replacement=" ")
    out = pc.replace_substring_regex(out, pattern=_CONTROL, replacement="")
    for src, dst in _COMMON_MAP:
        out = pc.replace_substring(out, pattern=src, replacement=dst)
    return out


def _language_steps(out: pa.Array, cfg: TextConfig, ascii_case: bool) -> pa.Array:
    for pattern, repl in language_rules(cfg.language):
        if re.escape(pattern) == pattern and "\\" not in repl:  # a plain string: the literal kernel is ~5x faster
            out = pc.replace_substring(out, pattern=pattern, replacement=repl)
        else:
            out = pc.replace_substring_regex(out, pattern=pattern, replacement=repl)
    for src, dst in pairs(cfg.punctuation_map):
        out = pc.replace_substring(out, pattern=src, replacement=dst)
    if cfg.lowercase:
        # ASCII lowercasing is exact for rows of plain characters unless a rule or the user's map
        # wrote a cased non-ASCII letter into them.
        written = "".join(r for _, r in language_rules(cfg.language)) + "".join(v for _, v in pairs(cfg.punctuation_map))
        ascii_case = ascii_case and not any(ord(c) > 127 and _cased(c) for c in written)
        out = pc.ascii_lower(out) if ascii_case else pc.utf8_lower(out)
    out = pc.replace_substring_regex(out, pattern=" {2,}", replacement=" ")
    return pc.utf8_trim_whitespace(out)


def _cased(c: str) -> bool:
    return c.lower() != c or c.upper() != c


@functools.lru_cache(maxsize=None)
def _plain_class(form: str) -> str:
    """An RE2 class matching any character that is not *plain* for ``form``.

    Plain: printable ASCII, and BMP characters that are assigned, uncased, of combining class 0,
    their own normal form, part of no canonical pair composition (nor Hangul jamo), and untouched
    by the invisible, whitespace, control and common-map steps. A string of plain characters is
    its own normal form (nothing decomposes, reorders or composes) and those steps leave it
    alone, so skipping them is exact. Unassigned code points are left out because Arrow's
    Unicode tables may be newer than Python's.
    """
    classes = [re.compile(c) for c in (_INVISIBLE, _SPACES, _CONTROL)]
    mapped = {ord(a) for a, _ in _COMMON_MAP}
    composing = set(range(0x1100, 0x1200)) | set(range(0xA960, 0xA980)) | set(range(0xD7B0, 0xD800))
    for cp in range(0x80, 0x10000):
        d = unicodedata.decomposition(chr(cp))
        if d and not d.startswith("<") and len(d.split()) == 2:
            composing.update(int(x, 16) for x in d.split())
    plain = []
    for cp in range(0x20, 0x10000):
        c = chr(cp)
        if cp == 0x7F or 0xD800 <= cp < 0xE000 or cp in mapped or cp in composing:
            continue
        if unicodedata.category(c) == "Cn" or unicodedata.combining(c) or (cp > 0x7F and _cased(c)):
            continue
        if unicodedata.normalize(form, c) != c or any(r.fullmatch(c) for r in classes):
            continue
        plain.append(cp)
    ranges: list[list[int]] = []
    for cp in plain:
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return "[^" + "".join(f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in ranges) + "]"


def normalize_text(text: str, cfg: TextConfig) -> str:
    """Normalise one transcript exactly as :func:`normalize_array` does."""
    return normalize_array(pa.array([text], type=pa.string()), cfg)[0].as_py()


def has_bad_encoding(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """True where a transcript holds U+FFFD (a decoding error upstream) or typical UTF-8-read-as-
    Latin-1 mojibake (``Ã``/``â€`` sequences); such rows are rejected rather than trained on."""
    return pc.match_substring_regex(texts, pattern="\ufffd|Ã[\u0080-\u00bf]|â€")
