"""Unicode word boundaries (UAX #29, "Unicode Text Segmentation" §4.1, rules WB1-WB999), host-side.

The first step of the HAT splitting rule (specs/token_free.md §4.1: `unicode_segmentation::split_word_bounds`
/ `uniseg.wordbreak.words`). Pure Python over a `str`; no dependency beyond the standard library.

The Word_Break property is derived from `unicodedata` (general categories, the Unicode version of the running
Python) plus the explicit code point lists of the UAX #29 property table (MidLetter, MidNum, MidNumLet,
Katakana, Hebrew_Letter, WSegSpace, ...). Scripts whose words UAX #29 does not delimit (Han, Hiragana and the
Line_Break=SA scripts Thai, Lao, Myanmar, Khmer, Tai ...) are not ALetter, so each of their characters is a
piece of its own (WB999). Extended_Pictographic (only used by WB3c) is the emoji blocks. Where
unicodedata's version differs from the Rust crate's tables, single rare characters can be classified
differently; tests/ops/test_pooling.py pins the crate's output on text in many scripts.
"""

import bisect
import functools
import unicodedata

_CR, _LF, _NEWLINE, _EXTEND, _ZWJ, _RI, _FORMAT = "CR", "LF", "Newline", "Extend", "ZWJ", "RI", "Format"
_KATAKANA, _HEBREW, _ALETTER, _SQ, _DQ = "Katakana", "Hebrew_Letter", "ALetter", "Single_Quote", "Double_Quote"
_MIDNUMLET, _MIDLETTER, _MIDNUM, _NUMERIC = "MidNumLet", "MidLetter", "MidNum", "Numeric"
_EXTENDNUMLET, _WSEGSPACE, _OTHER = "ExtendNumLet", "WSegSpace", "Other"

_NEWLINES = (_CR, _LF, _NEWLINE)
_IGNORED = (_EXTEND, _FORMAT, _ZWJ)  # WB4: absorbed into the character before them
_AHLETTER = (_ALETTER, _HEBREW)
_MIDNUMLETQ = (_MIDNUMLET, _SQ)

_SINGLES = {
    0x0D: _CR, 0x0A: _LF, 0x0B: _NEWLINE, 0x0C: _NEWLINE, 0x85: _NEWLINE, 0x2028: _NEWLINE,
    0x2029: _NEWLINE, 0x200D: _ZWJ, 0x27: _SQ, 0x22: _DQ, 0x202F: _EXTENDNUMLET,
    # Numeric although not Nd: the Arabic decimal separator, NEW TAI LUE THAM DIGIT ONE and (Unicode 15.1)
    # the prepended concatenation marks (U+0600 ARABIC NUMBER SIGN, ...), which stand before a number.
    **{c: _NUMERIC for c in (0x66B, 0x19DA, 0x600, 0x601, 0x602, 0x603, 0x604, 0x605, 0x6DD, 0x70F, 0x890,
                             0x891, 0x8E2, 0x110BD, 0x110CD)},
    **{c: _MIDLETTER for c in (0x3A, 0xB7, 0x387, 0x55F, 0x5F4, 0x2027, 0xFE13, 0xFE55, 0xFF1A)},
    **{c: _MIDNUM for c in (0x2C, 0x3B, 0x37E, 0x589, 0x60C, 0x60D, 0x66C, 0x7F8, 0x2044, 0xFE10, 0xFE14,
                            0xFE50, 0xFE54, 0xFF0C, 0xFF1B)},
    **{c: _MIDNUMLET for c in (0x2E, 0x2018, 0x2019, 0x2024, 0xFE52, 0xFF07, 0xFF0E)},
    # Letters by Word_Break although their general category is punctuation or a modifier symbol.
    **{c: _ALETTER for c in (0x55A, 0x55B, 0x55C, 0x55E, 0x58A, 0x5F3, 0x2ED, 0xA789, 0xA78A, 0xAB5B)},
}


def _ranges(*pairs: tuple[int, int]) -> tuple[list[int], list[int]]:
  """Inclusive code point ranges as (starts, ends), sorted for `_in`'s bisection."""
  pairs = sorted(pairs)
  return [a for a, _ in pairs], [b for _, b in pairs]


def _in(ranges: tuple[list[int], list[int]], cp: int) -> bool:
  i = bisect.bisect_right(ranges[0], cp) - 1
  return i >= 0 and cp <= ranges[1][i]


_WSEGSPACE_RANGES = _ranges((0x20, 0x20), (0x1680, 0x1680), (0x2000, 0x2006), (0x2008, 0x200A),
                            (0x205F, 0x205F), (0x3000, 0x3000))
_KATAKANA_RANGES = _ranges((0x3031, 0x3035), (0x309B, 0x309C), (0x30A0, 0x30FA), (0x30FC, 0x30FF),
                           (0x31F0, 0x31FF), (0x32D0, 0x32FE), (0x3300, 0x3357), (0xFF66, 0xFF9D),
                           (0x1AFF0, 0x1AFFE), (0x1B000, 0x1B000), (0x1B120, 0x1B122), (0x1B155, 0x1B155),
                           (0x1B164, 0x1B167))
_HEBREW_RANGES = _ranges((0x5D0, 0x5EA), (0x5EF, 0x5F2), (0xFB1D, 0xFB1D), (0xFB1F, 0xFB28), (0xFB2A, 0xFB4F))
_EXTEND_EXTRA = _ranges((0x200C, 0x200C), (0xFF9E, 0xFF9F), (0x1F3FB, 0x1F3FF), (0xE0020, 0xE007F))
# Letters that are not ALetter: Ideographic, Hiragana, and the Line_Break=SA scripts.
_NOT_ALETTER = _ranges((0xE00, 0xEFF), (0x1000, 0x109F), (0x1780, 0x17FF), (0x1950, 0x19DF), (0x19E0, 0x19FF),
                       (0x1A20, 0x1AAF), (0x3006, 0x3007), (0x3021, 0x3029), (0x3038, 0x303A),
                       (0x3041, 0x3096), (0x309D, 0x309F), (0x3400, 0x4DBF), (0x4E00, 0x9FFF),
                       (0xA9E0, 0xA9FF), (0xAA60, 0xAADF), (0xF900, 0xFAFF), (0x11700, 0x1174F),
                       (0x16FE4, 0x16FE4), (0x17000, 0x18CFF), (0x18D00, 0x18D08), (0x1B001, 0x1B11F),
                       (0x1B132, 0x1B132), (0x1B150, 0x1B152), (0x1B170, 0x1B2FF), (0x1F200, 0x1F200),
                       (0x20000, 0x3FFFD))
# Alphabetic symbols (circled / squared Latin letters) and modifier letters that are ALetter.
_ALETTER_EXTRA = _ranges((0x2C2, 0x2C5), (0x2D2, 0x2D7), (0x2DE, 0x2DF), (0x2E5, 0x2EB), (0x2EF, 0x2FF),
                         (0x24B6, 0x24E9), (0xA708, 0xA716), (0xA720, 0xA721),
                         (0x1F130, 0x1F149), (0x1F150, 0x1F169), (0x1F170, 0x1F189))
_EXT_PICT = _ranges((0xA9, 0xA9), (0xAE, 0xAE), (0x203C, 0x203C), (0x2049, 0x2049), (0x2122, 0x2122),
                    (0x2139, 0x2139), (0x2194, 0x21AA), (0x231A, 0x23FF), (0x24C2, 0x24C2), (0x25AA, 0x27BF),
                    (0x2934, 0x2935), (0x2B05, 0x2B55), (0x3030, 0x3030), (0x303D, 0x303D), (0x3297, 0x3299),
                    (0x1F000, 0x1F0FF), (0x1F10D, 0x1F10F), (0x1F12F, 0x1F12F), (0x1F16C, 0x1F171),
                    (0x1F17E, 0x1F17F), (0x1F18E, 0x1F18E), (0x1F191, 0x1F19A), (0x1F1AD, 0x1F1E5),
                    (0x1F201, 0x1F3FA), (0x1F400, 0x1FAFF), (0x1FC00, 0x1FFFD))


@functools.lru_cache(maxsize=65536)
def word_break_property(ch: str) -> str:
  """The UAX #29 Word_Break property value of one character (approximated as the module docstring says)."""
  cp = ord(ch)
  if cp in _SINGLES:
    return _SINGLES[cp]
  if 0x1F1E6 <= cp <= 0x1F1FF:
    return _RI
  cat = unicodedata.category(ch)
  if cat in ("Mn", "Me", "Mc") or _in(_EXTEND_EXTRA, cp):
    return _EXTEND
  if cat == "Cf" and cp != 0x200B:  # ZERO WIDTH SPACE is Other
    return _FORMAT
  if _in(_WSEGSPACE_RANGES, cp):
    return _WSEGSPACE
  if _in(_KATAKANA_RANGES, cp):
    return _KATAKANA
  if _in(_HEBREW_RANGES, cp):
    return _HEBREW
  if cat == "Nd":
    return _NUMERIC
  if cat == "Pc":
    return _EXTENDNUMLET
  if ((cat in ("Lu", "Ll", "Lt", "Lm", "Lo", "Nl") and not _in(_NOT_ALETTER, cp))
      or _in(_ALETTER_EXTRA, cp)):
    return _ALETTER
  return _OTHER


def _is_break(text: str, props: list[str], i: int) -> bool:
  """Whether UAX #29 puts a word boundary between text[i - 1] and text[i] (0 < i < len(text))."""
  prev_raw, cur = props[i - 1], props[i]
  if prev_raw == _CR and cur == _LF:  # WB3
    return False
  if prev_raw in _NEWLINES or cur in _NEWLINES:  # WB3a, WB3b
    return True
  if prev_raw == _ZWJ and _in(_EXT_PICT, ord(text[i])):  # WB3c
    return False
  if prev_raw == _WSEGSPACE and cur == _WSEGSPACE:  # WB3d
    return False
  if cur in _IGNORED:  # WB4: X (Extend | Format | ZWJ)* -> X
    return False

  def back(j: int) -> int:
    """The index of the character that the ignorables ending at j were absorbed into, or j itself."""
    k = j
    while k > 0 and props[k] in _IGNORED:
      k -= 1
    return j if props[k] in _IGNORED or props[k] in _NEWLINES and k != j else k

  def forward(j: int) -> str | None:
    while j < len(props) and props[j] in _IGNORED:
      j += 1
    return props[j] if j < len(props) else None

  p_idx = back(i - 1)
  prev = props[p_idx]
  pp_idx = back(p_idx - 1) if p_idx > 0 else None
  prev2 = props[pp_idx] if pp_idx is not None else None
  nxt = forward(i + 1)
  if prev in _AHLETTER and cur in _AHLETTER:  # WB5
    return False
  if prev in _AHLETTER and cur in (_MIDLETTER, *_MIDNUMLETQ) and nxt in _AHLETTER:  # WB6
    return False
  if prev2 in _AHLETTER and prev in (_MIDLETTER, *_MIDNUMLETQ) and cur in _AHLETTER:  # WB7
    return False
  if prev == _HEBREW and cur == _SQ:  # WB7a
    return False
  if prev == _HEBREW and cur == _DQ and nxt == _HEBREW:  # WB7b
    return False
  if prev2 == _HEBREW and prev == _DQ and cur == _HEBREW:  # WB7c
    return False
  if (prev, cur) in ((_NUMERIC, _NUMERIC), (_ALETTER, _NUMERIC), (_HEBREW, _NUMERIC), (_NUMERIC, _ALETTER),
                     (_NUMERIC, _HEBREW), (_KATAKANA, _KATAKANA)):  # WB8, WB9, WB10, WB13
    return False
  if prev2 == _NUMERIC and prev in (_MIDNUM, *_MIDNUMLETQ) and cur == _NUMERIC:  # WB11
    return False
  if prev == _NUMERIC and cur in (_MIDNUM, *_MIDNUMLETQ) and nxt == _NUMERIC:  # WB12
    return False
  if prev in (*_AHLETTER, _NUMERIC, _KATAKANA, _EXTENDNUMLET) and cur == _EXTENDNUMLET:  # WB13a
    return False
  if prev == _EXTENDNUMLET and cur in (*_AHLETTER, _NUMERIC, _KATAKANA):  # WB13b
    return False
  if prev == _RI and cur == _RI:  # WB15, WB16: break after every pair of regional indicators
    count, j = 0, p_idx
    while j is not None and props[j] == _RI:
      count += 1
      j = back(j - 1) if j > 0 else None
    return count % 2 == 0
  return True  # WB999


def word_bounds(text: str) -> list[str]:
  """Splits `text` at every UAX #29 word boundary (WB1/WB2: at its start and end); "" -> []."""
  props = [word_break_property(ch) for ch in text]
  cuts = [0] + [i for i in range(1, len(text)) if _is_break(text, props, i)] + [len(text)]
  return [text[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
