"""Text normalisation per language, vectorised over whole arrays of transcripts.

The official IndexTTS frontend routes any non-Latin text through a Chinese normaliser, which
mangles Ge'ez, Hangul and kana. This module never does: it applies Unicode normalisation, strips
invisible and control characters, unifies quotes/dashes/whitespace, and applies a per-language
punctuation map (Ethiopic punctuation for Amharic) plus the user's own map from config.

Everything runs on whole arrays (``normalize_array``) so millions of transcripts take seconds;
``normalize_text`` is the same code on one string, so the two can never disagree. Two engines
share the work: rows of *plain* characters (nearly every row of a Ge'ez, Hangul or kana corpus,
see :func:`_plain_class`) take the language rules in polars (Rust's ``regex``, which finds the
rare punctuation with ``memchr`` instead of stepping a DFA over every letter); the other rows
take every step with Arrow's RE2 kernels. The rules are written so that both engines read them
the same way (no ``\\s``/``\\d``/``\\w``/``\\b``, whose meaning differs), and a test checks that
both routes give the same strings.
Numbers are left as written: verbalising them is language-specific and belongs to the corpus.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from indextts.config import pairs

# Zero-width and byte-order marks that survive copy-paste from the web and split tokens.
_INVISIBLE = "[\u200b\u200c\u200d\u2060\ufeff\u00ad]"
# C0/C1 control characters (tab and newline are handled as whitespace first).
_CONTROL = "[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]"
# Whitespace variants that become a plain space.
_SPACES = "[\t\n\r\u00a0\u2000-\u200a\u202f\u205f\u3000]"
# RE2's ``\s``, spelled out: Rust's regex reads ``\s`` as Unicode whitespace.
_WS = "[\\t\\n\\f\\r ]"

# Applied to every language: typographic variants that only fragment the vocabulary.
_COMMON_MAP: tuple[tuple[str, str], ...] = (
    ("\u201c", '"'), ("\u201d", '"'), ("\u201e", '"'), ("\u00ab", '"'), ("\u00bb", '"'),
    ("\u2018", "'"), ("\u2019", "'"), ("\u201a", "'"), ("\u2032", "'"),
    ("\u2013", "-"), ("\u2014", "-"), ("\u2212", "-"),
    ("\u2026", "..."),
)


class Rule(NamedTuple):
    """One language rule: a regex replacement applied to every transcript."""

    pattern: str  # RE2 syntax that Rust's regex reads the same way (no \s, \d, \w, \b)
    replacement: str  # \1 for a group
    # True when the rule gives the same strings on rows joined by U+0000 as on each row alone, so
    # that it may run on blocks of rows (the fast path, see _plain_steps): no match can take
    # U+0000 in or depend on where a row ends, except as noted at the rule.
    blockwise: bool = False


# Per-language rules, applied in order after the common map.
_LANGUAGE_RULES: dict[str, tuple[Rule, ...]] = {
    # Amharic / Ge'ez: the Ethiopic word space (፡) is a word separator, so it becomes a space;
    # two of them, or "::", are an informal full stop. Latin punctuation typed next to Ge'ez
    # letters is mapped to its Ethiopic form so one sentence mark gets one token.
    "am": (
        Rule(f"\u1361{_WS}*\u1361", "\u1362", blockwise=True),  # ፡፡ -> ።
        Rule("::", "\u1362", blockwise=True),  # :: -> ።
        Rule("\u1361", " ", blockwise=True),  # ፡ -> space
        # ሰላም. -> ሰላም። (not 3.5). Blockwise: where a row ends inside a block, [^0-9] takes the
        # U+0000 after it and \2 writes it back, which is what $ at the row's end gives alone.
        Rule(f"([\u1200-\u137f]){_WS}*\\.([^0-9]|$)", "\\1\u1362\\2", blockwise=True),
        Rule(f"([\u1200-\u137f]){_WS}*,", "\\1\u1363", blockwise=True),  # , -> ፣
        Rule(f"([\u1200-\u137f]){_WS}*;", "\\1\u1364", blockwise=True),  # ; -> ፤
        Rule(f"([\u1200-\u137f]){_WS}*\\?", "\\1\u1367", blockwise=True),  # ? -> ፧
        Rule(f"{_WS}+([\u1362-\u1368])", "\\1", blockwise=True),  # no space before Ethiopic punctuation
    ),
    # Korean: NFC composes decomposed jamo (macOS file names, some corpora) into syllables;
    # nothing else is needed. Japanese: NFKC (set in config) folds half-width kana; the ideographic
    # full stop and comma are kept as they are.
    "ko": (),
    "ja": (),
}
# Runs of spaces collapse to one, after every other rule.
_SPACE_RUNS = Rule(" {2,}", " ", blockwise=True)
# Joins rows into blocks for the fast path: a control character, so no plain row holds one.
_ROW_SEPARATOR = "\x00"
_BLOCK_ROWS = 1024

# Mojibake: U+FFFD (a decoding error upstream) or UTF-8 read as Latin-1 ("Ã©", "â€").
_BAD_ENCODING = "\ufffd|Ã[\u0080-\u00bf]|â€"


@dataclass(frozen=True)
class TextConfig:
    """The ``text`` config section: how transcripts are normalised.

    Stored in every checkpoint's model.json, because inference must normalise the same way.
    """

    language: str = "am"  # ISO 639-1 code; rows without a language column get it; picks the rules
    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFC"  # NFC keeps Hangul syllables composed
    lowercase: bool = True  # lowercases cased scripts (Latin, Cyrillic); Ge'ez/Hangul/kana have no case
    punctuation_map: dict[str, str] = field(default_factory=dict)  # extra literal replacements, applied last


def language_rules(language: str) -> tuple[Rule, ...]:
    """The built-in regex rules for ``language`` (an empty tuple for languages without any)."""
    return _LANGUAGE_RULES.get(language.split("-")[0].lower(), ())


def normalize_array(texts: pa.Array | pa.ChunkedArray, cfg: TextConfig) -> pa.Array | pa.ChunkedArray:
    """Normalise an Arrow string array; nulls stay null.

    Each string kernel costs a pass over every row, so rows made only of printable ASCII and
    characters that the Unicode steps (normal form, invisible, whitespace, control, common map)
    cannot change -- nearly every row of a Ge'ez, Hangul or kana corpus -- skip those steps, take
    the language rules in polars and are lowercased with the ASCII kernel. The other rows take
    every step in Arrow. Both routes give exactly what the full sequence of steps gives (see
    :func:`_plain_class` and :func:`_plain_steps`).

    Args:
        texts: transcripts as an Arrow ``string``/``large_string`` array.
        cfg: the text section.

    Returns:
        An array of the same length and type with normalised text (possibly empty strings).
    """
    chunked = isinstance(texts, pa.ChunkedArray)
    arr = (texts.combine_chunks() if texts.num_chunks != 1 else texts.chunk(0)) if chunked else texts
    if len(arr) == 0:
        return texts
    other = pl.from_arrow(arr).str.contains(_plain_class(cfg.unicode_form)).fill_null(False)
    n_other = int(other.sum())
    if n_other == len(arr):
        out = _language_steps(_unicode_steps(arr, cfg), cfg, ascii_case=False)
    else:
        # The plain route takes every row, the other rows and null rows blanked: the other rows
        # may hold U+0000, which joins rows into blocks there, and take every step on their own.
        mask = other.to_arrow()
        if n_other or arr.null_count:  # one copy blanks both
            arr_plain = pc.if_else(pc.or_(mask, pc.is_null(arr)), pa.scalar("", arr.type), arr)
        else:
            arr_plain = arr
        out = _plain_steps(arr_plain, cfg)
        if arr.null_count:
            out = pc.if_else(pc.is_valid(arr), out, pa.scalar(None, out.type))
        if n_other:
            full = _language_steps(_unicode_steps(arr.filter(mask), cfg), cfg, ascii_case=False)
            out = pc.replace_with_mask(out, mask, full.cast(out.type))
    out = out.cast(arr.type)
    return pa.chunked_array([out], type=out.type) if chunked else out


def _unicode_steps(out: pa.Array, cfg: TextConfig) -> pa.Array:
    out = pc.utf8_normalize(out, form=cfg.unicode_form)
    out = pc.replace_substring_regex(out, pattern=_INVISIBLE, replacement="")
    out = pc.replace_substring_regex(out, pattern=_SPACES, replacement=" ")
    out = pc.replace_substring_regex(out, pattern=_CONTROL, replacement="")
    for src, dst in _COMMON_MAP:
        out = pc.replace_substring(out, pattern=src, replacement=dst)
    return out


def _user_map(cfg: TextConfig) -> tuple[tuple[str, str], ...]:
    # An empty key would match between every two characters (Arrow's kernel never returns).
    return tuple((src, dst) for src, dst in pairs(cfg.punctuation_map) if src)


def _is_literal(rule: Rule) -> bool:
    return re.escape(rule.pattern) == rule.pattern and "\\" not in rule.replacement


def _language_steps(out: pa.Array, cfg: TextConfig, ascii_case: bool) -> pa.Array:
    """The language rules, the user's map, lowercasing, space runs and trimming, in Arrow."""
    for rule in language_rules(cfg.language):
        if _is_literal(rule):  # a plain string: the literal kernel is ~5x faster
            out = pc.replace_substring(out, pattern=rule.pattern, replacement=rule.replacement)
        else:
            out = pc.replace_substring_regex(out, pattern=rule.pattern, replacement=rule.replacement)
    for src, dst in _user_map(cfg):
        out = pc.replace_substring(out, pattern=src, replacement=dst)
    if cfg.lowercase:
        out = pc.ascii_lower(out) if ascii_case and _ascii_case_exact(cfg) else pc.utf8_lower(out)
    out = pc.replace_substring_regex(out, pattern=_SPACE_RUNS.pattern, replacement=_SPACE_RUNS.replacement)
    return pc.utf8_trim_whitespace(out)


def _plain_steps(arr: pa.Array, cfg: TextConfig) -> pa.Array:
    """:func:`_language_steps` for rows of plain characters (no nulls): the rules, the user's
    map and the space runs in polars, then lowercasing and trimming in Arrow.

    When every rule is ``blockwise``, rows are joined by U+0000 into blocks of ``_BLOCK_ROWS``
    and each rule runs once per block: Rust's regex then scans long strings, finding the rare
    punctuation with a prefilter, instead of starting over for every row. Lowercasing maps each
    character on its own and leaves U+0000 alone, so it runs on the blocks too. Collapsing runs
    of spaces before lowercasing instead of after gives the same string: lowercasing never turns
    a character into a space or a space into anything else.
    """
    rules = language_rules(cfg.language)
    steps = [_polars_step(rule) for rule in rules]
    steps += [_literal_step(src, dst) for src, dst in _user_map(cfg)]
    steps.append(_polars_step(_SPACE_RUNS))
    blocks = all(rule.blockwise for rule in rules) and not any(_ROW_SEPARATOR in src + dst for src, dst in _user_map(cfg))
    flat = arr.cast(pa.string())
    if blocks:
        cuts = pa.array(list(range(0, len(flat), _BLOCK_ROWS)) + [len(flat)], type=pa.int32())
        flat = pc.binary_join(pa.ListArray.from_arrays(cuts, flat), _ROW_SEPARATOR)
    series = pl.from_arrow(flat)
    for pattern, replacement, literal in steps:
        series = series.str.replace_all(pattern, replacement, literal=literal)
    out = series.to_arrow().cast(pa.string())
    if cfg.lowercase:
        out = pc.ascii_lower(out) if _ascii_case_exact(cfg) else pc.utf8_lower(out)
    if blocks:
        out = pc.list_flatten(pc.split_pattern(out, _ROW_SEPARATOR))
        if len(out) != len(arr):  # no rule writes or removes the separator
            raise AssertionError(f"text: {len(arr)} rows came back from their blocks as {len(out)}")
    return pc.utf8_trim_whitespace(out)


def _polars_step(rule: Rule) -> tuple[str, str, bool]:
    """``(pattern, replacement, literal)`` for polars' ``str.replace_all``."""
    if _is_literal(rule):
        return _literal_step(rule.pattern, rule.replacement)
    return rule.pattern, _rust_replacement(rule.replacement), False


def _literal_step(src: str, dst: str) -> tuple[str, str, bool]:
    """A literal replacement (a rule's or the user's map's) for polars' ``str.replace_all``.

    One non-ASCII character is written as a one-character class: polars searches for a literal
    with a substring finder whose byte heuristics fail on Ge'ez text (every character starts
    with the same lead byte), at about half the speed of the regex engine.
    """
    if len(src) == 1 and ord(src) > 127:
        return f"[{src}]", dst.replace("$", "$$"), False
    return src, dst, True


def _ascii_case_exact(cfg: TextConfig) -> bool:
    """ASCII lowercasing is exact for rows of plain characters unless a rule or the user's map
    wrote a cased non-ASCII letter into them."""
    written = "".join(r.replacement for r in language_rules(cfg.language)) + "".join(v for _, v in _user_map(cfg))
    return not any(ord(c) > 127 and _cased(c) for c in written)


def _rust_replacement(repl: str) -> str:
    """An RE2 rewrite string (``\\1`` for a group, ``\\\\`` for a backslash) in the syntax of
    Rust's regex (``${1}``, with ``$`` written ``$$``)."""
    out, i = [], 0
    while i < len(repl):
        c = repl[i]
        if c == "\\" and i + 1 < len(repl) and (repl[i + 1].isdigit() or repl[i + 1] == "\\"):
            out.append("${" + repl[i + 1] + "}" if repl[i + 1].isdigit() else "\\")
            i += 2
            continue
        out.append("$$" if c == "$" else c)
        i += 1
    return "".join(out)


def _cased(c: str) -> bool:
    return c.lower() != c or c.upper() != c


@functools.lru_cache(maxsize=None)
def _plain_class(form: str) -> str:
    """A regex class (RE2 and Rust syntax alike) matching any character that is not *plain* for
    ``form``.

    Plain: printable ASCII, and BMP characters that are assigned, uncased (outside ASCII), of
    combining class 0, their own normal form, not the second character of a canonical pair
    composition (nor a Hangul jamo), and untouched by the invisible, whitespace, control and
    common-map steps. A string of plain characters is its own normal form: nothing decomposes
    or reorders, and a composition needs its second character, which is never plain. Those steps
    leave it alone too, so skipping them is exact. Unassigned code points are left out because
    Arrow's Unicode tables may be newer than Python's.
    """
    classes = [re.compile(c) for c in (_INVISIBLE, _SPACES, _CONTROL)]
    mapped = {ord(a) for a, _ in _COMMON_MAP}
    composing = set(range(0x1100, 0x1200)) | set(range(0xA960, 0xA980)) | set(range(0xD7B0, 0xD800))
    for cp in range(0x80, 0x10000):
        d = unicodedata.decomposition(chr(cp))
        if d and not d.startswith("<") and len(d.split()) == 2:
            composing.add(int(d.split()[1], 16))
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
    Latin-1 mojibake (``Ã``/``â€`` sequences); such rows are rejected rather than trained on.
    Null where the transcript is null."""
    arr = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    if len(arr) == 0:
        return pa.array([], type=pa.bool_())
    return pl.from_arrow(arr).str.contains(_BAD_ENCODING).to_arrow()


def count_chars(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Characters other than U+0020 in each transcript (0 for null): the length that
    ``clean.*_chars_per_second`` bounds."""
    arr = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    if len(arr) == 0:
        return pa.array([], type=pa.int64())
    s = pl.from_arrow(arr)
    # The regex " " (a byte search per row) counts about twice as fast as polars' literal search.
    return (s.str.len_chars().cast(pl.Int64) - s.str.count_matches(" ").cast(pl.Int64)).fill_null(0).to_arrow()
