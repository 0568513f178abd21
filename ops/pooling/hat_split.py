"""The HAT word splitting rule (specs/token_free.md §4.1), host-side numpy over byte ids.

Rule (Aleph-Alpha-Research/hat-splitter, the `unicode_segmentation` version of `src/split.rs`):
  1. UAX #29 word bounds (`ops.pooling.uax29.word_bounds`);
  2. split off every punctuation character \\p{P} (a piece "a." becomes "a", ".": the crate cuts after each
     \\p{P}, which groups identically, since a word piece ending in punctuation and the word + punctuation
     pieces are appended by the same rules below);
  3. split camelCase at every lowercase -> uppercase transition (\\p{Ll} then \\p{Lu});
  4. merge runs of single-space pieces " " into one multi-space piece;
  5. classify: " " is Space; a piece of White_Space only (\\s) is Whitespace; one \\p{P} character is
     Punctuation; anything else is Word. Group: a token is appended to the previous group iff
     (previous token = Space and token = Word) or (previous token in {Space, Word, Punctuation} and
     token = Punctuation); otherwise it starts a group. So [optional single space] + word + [trailing
     punctuation] is one word, and newlines, tabs and multi-space runs are words of their own;
  6. `max_bytes`: a word longer than max_bytes bytes is cut into chunks of at most max_bytes bytes, each cut
     moved back to the last UTF-8 character boundary when one exists after the chunk's start (a character
     longer than max_bytes is cut inside).
Crate examples: "Hello, world!" -> ["Hello,", " world!"]; "howAreYou" -> ["how", "Are", "You"];
"how_are_you" -> ["how_", "are_", "you"]; with max_bytes 4: [b"Hell", b"o,", b" wor", b"ld!"].

Byte ids (`hat_word_boundaries`): ByT5 ids (data/bytes.py, byte b is id b + 3). Each maximal run of byte ids
is split on its own; a special id (EOS 1, UNK 2, ids >= 259) is always a word of its own (§4.1: special
tokens are their own word), so documents never share a word; PAD (0) is never a boundary and joins the
group before it. Invalid UTF-8 (a character cut by a window edge, arbitrary bytes) is decoded with
surrogateescape: every invalid byte is a character (and so a word piece) of its own.
"""

import codecs
import unicodedata
from typing import Any

import numpy as np

from ops.pooling.boundaries import BYTE_OFFSET, PAD_ID, is_byte_id
from ops.pooling.uax29 import word_bounds

# Unicode White_Space (what the crate's regex \s matches).
_WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
                         "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_SPACE, _WHITESPACE, _PUNCTUATION, _WORD = range(4)


def _is_punctuation(ch: str) -> bool:
  return unicodedata.category(ch).startswith("P")


def _pieces(text: str) -> list[str]:
  """Steps 1-4: word bounds, punctuation and camelCase splits, single spaces merged."""
  pieces = []
  for bound in word_bounds(text):
    start = 0
    for i, ch in enumerate(bound):
      if _is_punctuation(ch):
        pieces.extend([bound[start:i], ch] if i > start else [ch])
        start = i + 1
      elif i > start and unicodedata.category(bound[i - 1]) == "Ll" and unicodedata.category(ch) == "Lu":
        pieces.append(bound[start:i])
        start = i
    if start < len(bound):
      pieces.append(bound[start:])
  merged: list[str] = []
  for piece in pieces:
    if piece == " " and merged and set(merged[-1]) == {" "}:
      merged[-1] += piece
    else:
      merged.append(piece)
  return merged


def _kind(piece: str) -> int:
  if piece == " ":
    return _SPACE
  if all(ch in _WHITE_SPACE for ch in piece):
    return _WHITESPACE
  if len(piece) == 1 and _is_punctuation(piece):
    return _PUNCTUATION
  return _WORD


def _append(previous: int, token: int) -> bool:
  """Step 5's grammar: whether `token` joins the group whose last token is `previous`."""
  return ((previous == _SPACE and token == _WORD)
          or (previous in (_SPACE, _WORD, _PUNCTUATION) and token == _PUNCTUATION))


def _utf8_length(ch: str) -> int:
  return 1 if 0xDC80 <= ord(ch) <= 0xDCFF else len(ch.encode("utf-8"))  # surrogateescape: one raw byte


def _pending_bytes(data: bytes) -> int:
  """How many bytes at the end of `data` start a UTF-8 character that is not complete yet."""
  decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
  decoder.decode(data, final=False)
  return len(decoder.getstate()[0])


def _word_ends(data: bytes, max_bytes: int | None) -> tuple[list[int], np.ndarray]:
  """(ends, char_ends): the byte offset one past the end of every word (steps 1-6) of the UTF-8 bytes
  `data`, increasing, and the byte offset of every character boundary (0 first, len(data) last)."""
  if max_bytes is not None and max_bytes < 1:
    raise ValueError(f"max_bytes must be >= 1, got {max_bytes}.")
  text = data.decode("utf-8", errors="surrogateescape")
  char_ends = np.cumsum([0] + [_utf8_length(ch) for ch in text])
  ends, start, kinds = [], 0, []
  for piece in _pieces(text):
    kind = _kind(piece)
    if kinds and not _append(kinds[-1], kind):
      ends.append(start)
    kinds.append(kind)
    start += len(piece)
  if text:
    ends.append(len(text))
  ends = [int(char_ends[e]) for e in ends]  # char offsets -> byte offsets
  if max_bytes is None:
    return ends, char_ends
  boundaries = set(char_ends.tolist())
  chunked, begin = [], 0
  for end in ends:
    while end - begin > max_bytes:
      cut = next((c for c in range(begin + max_bytes, begin, -1) if c in boundaries), begin + max_bytes)
      chunked.append(cut)
      begin = cut
    chunked.append(end)
    begin = end
  return chunked, char_ends


def hat_split(text: str | bytes, max_bytes: int | None = None) -> list[bytes]:
  """The HAT words of `text` (a str, or UTF-8 bytes), as UTF-8 byte strings (the crate's `split_with_limit`;
  `split` when max_bytes is None). b"".join(words) == the input's bytes."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  ends, _ = _word_ends(data, max_bytes)
  return [data[a:b] for a, b in zip([0] + ends[:-1], ends)]


def hat_word_boundaries(ids: Any, max_bytes: int | None = None, *,
                        known: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """HAT word boundaries over ByT5 ids, host-side: ids int [T] or [B, T] -> b bool, same shape.

  b_t = 1 iff byte t is the last byte of a word (the §5.1 convention: the group ends at t). The last word
  of each run of bytes ends where the run ends (at the array's end too). Special ids and PAD as the module
  docstring says; max_bytes is rule step 6 (the vLLM port uses 100).

  A word's end is only known once the next word has started: whether a character opens a word (a space,
  a Han character, ...) or joins the current one (a letter, an accent) takes all its bytes. So pair these
  boundaries with the "exclusive" upsampling rule (byte t reads the group before its own, HAT's p_{w(t)-1}
  of §4.4) and, for exact causality on multi-byte text, with `known`: known=True returns (b, known) where
  known moves each word end to the byte before the last byte of the character that follows it (the same
  byte for a one-byte character), for `group_ids(b, S, rule="exclusive", known=known)`. Then the slot
  byte t reads depends on ids <= t only (tests: prefix stability), except where UAX #29 itself looks
  further ahead (rare: e.g. digit, U+2044 FRACTION SLASH, digit). A character cut by the end of ids is
  one word per byte in b, and known marks no end from the word before it on (it is not complete yet).
  """
  ids = np.asarray(ids)
  if ids.ndim not in (1, 2):
    raise ValueError(f"ids must be [T] or [B, T], got shape {ids.shape}.")
  rows = ids.reshape(-1, ids.shape[-1])
  ends_out, known_out = np.zeros(rows.shape, bool), np.zeros(rows.shape, bool)
  for row, b, k in zip(rows, ends_out, known_out):
    is_byte = is_byte_id(row)
    b[~is_byte & (row != PAD_ID)] = True  # special ids: one word each
    k[b] = True
    t = 0
    while t < len(row):
      if not is_byte[t]:
        t += 1
        continue
      end = t
      while end < len(row) and is_byte[end]:
        end += 1
      data = (row[t:end] - BYTE_OFFSET).astype(np.uint8).tobytes()
      ends, char_ends = _word_ends(data, max_bytes)
      b[[t + e - 1 for e in ends]] = True
      # The character after a word end e spans [e, next char end); its last byte completes the word's end.
      # A character cut by the end of ids is not complete yet: no end from the one before it is known.
      pending = _pending_bytes(data) if end == len(row) else 0
      cut = len(data) - pending if pending else len(data) + 1
      following = np.searchsorted(char_ends, ends, side="right")
      k[[t + int(char_ends[i]) - 2 if i < len(char_ends) else t + e - 1
         for e, i in zip(ends, following) if e < cut]] = True
      t = end
  if known:
    return ends_out.reshape(ids.shape), known_out.reshape(ids.shape)
  return ends_out.reshape(ids.shape)
