"""Synthetic tasks: passkey retrieval prompts, multi-query associative recall (MQAR) and copy-probe batches.

Pure numpy; every output is a deterministic function of its arguments (seed, example index), so any
process can build any example on its own and a data iterator's state is one integer.

Passkey retrieval (specs/attention_variants.md section 2.7; Landmark attention `llama/run_test.py`).
The prompt is five parts joined by "\\n", as in that code:

    <task description>\\n<filler prefix>\\n<The pass key is K. Remember it. K is the pass key.>\\n
    <filler suffix>\\nWhat is the pass key? The pass key is

The filler is the spec's five sentences repeated, joined by single spaces. n = length - (fixed text) filler
characters are split at a uniform random point a in [0, n]: the prefix is the filler's first a characters
and the suffix its first n - a characters (both restart at the filler's beginning, as in the code). So a
prompt has exactly `length` bytes and every trial of one length batches together. K is uniform in
[10000, 99999] (five digits, so the fixed text has one length); the spec's code draws K from [1, 50000].

MQAR (Zoology, Arora et al. 2023, "multi-query associative recall"), byte level. With P pairs a sequence is
4P bytes:

    k_1 v_1 k_2 v_2 ... k_P v_P | k_s(1) v_s(1) ... k_s(P) v_s(P)

keys k_i: P distinct bytes of MQAR_KEY_BYTES (0x21 '!' .. 0x4f 'O'), values v_i: P distinct bytes of
MQAR_VALUE_BYTES (0x50 'P' .. 0x7e '~'), drawn independently (so the pairing is random); s is a random
permutation, so every key is queried once, in random order, after all pairs. As a language-model batch
(targets[t] = window[t + 1], window = the sequence padded with PAD to seq_len + 1 ids) the loss weight is 1
exactly where the target is a query's value (the input there is its key), 0 elsewhere: 4P - 1 real targets,
P weighted. Unlike Zoology's generator the queries follow each other densely (no random gaps, no noise
tokens) and each query's value is in the input, so the next query can condition on it. Chance accuracy for
a model that only knows the value alphabet is 1 / 47.

Copy probes (evaluate.py --tasks=copy): does a model copy what is in its context? Teacher-forced rows whose
loss weight marks only bytes that are predictable by copying. "passkey_repeat" and "passkey_answer" are
passkey training documents (passkey_document at the run's seq_len) scored on the key's five digits where the
key line repeats it ("Remember it. K", about 20 bytes after the first K) and on the answer after the
question. "repeat_digits" and "repeat_letters" are a random string of seq_len // 2 + 1 digits (letters
a-z) written twice (cut to the window), scored on the second copy after its first byte: the
repeated-random-tokens test of induction heads (Olsson et al. 2022). A model that copies nothing is at
1/10 (1/26 for letters).
"""

from typing import Sequence

import numpy as np

from data import bytes as byte_vocab

Batch = dict[str, np.ndarray]

# --- passkey (spec 2.7) -------------------------------------------------------------------------------

PASSKEY_TASK_DESCRIPTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                            "memorize them. I will quiz you about the important information there.")
PASSKEY_FILLER_SENTENCES = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
                            "back again.")
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_MIN, PASSKEY_MAX = 10_000, 99_999  # inclusive; five digits keep the fixed text one length


def passkey_information_line(key: int) -> str:
  return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey_fixed_bytes() -> int:
  """Bytes of a passkey prompt without filler (the shortest possible prompt)."""
  parts = (PASSKEY_TASK_DESCRIPTION, "", passkey_information_line(PASSKEY_MIN), "", PASSKEY_QUESTION)
  return len("\n".join(parts).encode("utf-8"))


def _filler(num_chars: int) -> str:
  """The first num_chars characters of the filler sentences repeated and joined by spaces."""
  unit = PASSKEY_FILLER_SENTENCES + " "
  return (unit * (num_chars // len(unit) + 1))[:num_chars]


def passkey_prompt(rng: np.random.Generator, length_bytes: int) -> tuple[str, int]:
  """One passkey prompt of exactly length_bytes bytes (ASCII) and its key K."""
  fixed = passkey_fixed_bytes()
  if length_bytes < fixed:
    raise ValueError(f"a passkey prompt needs at least {fixed} bytes (its fixed text), got a target "
                     f"length of {length_bytes}.")
  key = int(rng.integers(PASSKEY_MIN, PASSKEY_MAX + 1))
  num_filler = length_bytes - fixed
  num_prefix = int(rng.integers(0, num_filler + 1))
  filler = _filler(num_filler)
  prompt = "\n".join((PASSKEY_TASK_DESCRIPTION, filler[:num_prefix], passkey_information_line(key),
                      filler[:num_filler - num_prefix], PASSKEY_QUESTION))
  return prompt, key


def passkey_answer(key: int) -> str:
  """What follows a prompt's question in a training document: the evaluation reads its first integer."""
  return f" {key}."


def passkey_document_max_bytes() -> int:
  """Bytes of the longest answer: a passkey training document has at least fixed + this many."""
  return len(passkey_answer(PASSKEY_MAX))


def passkey_document(rng: np.random.Generator, max_bytes: int) -> bytes:
  """A passkey training document: a prompt of a length drawn uniformly from the shortest possible up to
  max_bytes - answer bytes, then its answer (passkey_answer)."""
  answer_bytes = passkey_document_max_bytes()
  longest = max_bytes - answer_bytes
  prompt, key = passkey_prompt(rng, int(rng.integers(passkey_fixed_bytes(), longest + 1)))
  return (prompt + passkey_answer(key)).encode("utf-8")


def passkey_batch(length_bytes: int, num_trials: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """num_trials prompts of one length: (ids int32 [num_trials, length_bytes], keys int64 [num_trials]).

  Deterministic in (length_bytes, seed); ids are byte ids (byte b -> b + 3), no EOS or padding.
  """
  if num_trials < 1:
    raise ValueError(f"passkey trials must be positive, got {num_trials}.")
  rng = np.random.default_rng([int(seed), int(length_bytes)])
  ids, keys = np.empty((num_trials, length_bytes), np.int32), np.empty(num_trials, np.int64)
  for i in range(num_trials):
    prompt, keys[i] = passkey_prompt(rng, length_bytes)
    ids[i] = byte_vocab.encode(prompt)
  return ids, keys


# --- MQAR (Zoology) -----------------------------------------------------------------------------------

MQAR_KEY_BYTES = np.arange(0x21, 0x50, dtype=np.int32)  # '!' .. 'O', 47 symbols
MQAR_VALUE_BYTES = np.arange(0x50, 0x7f, dtype=np.int32)  # 'P' .. '~', 47 symbols
MQAR_MAX_PAIRS = min(len(MQAR_KEY_BYTES), len(MQAR_VALUE_BYTES))

# Random streams of one seed: training, the eval splits and the evaluate.py task never share examples.
MQAR_STREAMS = {"train": 0, "valid": 1, "test": 2, "all": 3, "eval_task": 4}


def mqar_num_pairs(num_pairs: int | Sequence[int]) -> tuple[int, ...]:
  """Validates num_pairs (an int, or ints / digit strings from a command line) -> a tuple of ints."""
  values = (num_pairs,) if isinstance(num_pairs, (int, np.integer, str)) else tuple(num_pairs)
  try:
    values = tuple(int(p) for p in values)
  except (TypeError, ValueError):
    raise ValueError(f"MQAR num_pairs must be integers, got {num_pairs!r}.") from None
  if not values or any(not 1 <= p <= MQAR_MAX_PAIRS for p in values):
    raise ValueError(f"MQAR num_pairs must be one or more integers in [1, {MQAR_MAX_PAIRS}] (the number of "
                     f"distinct key / value bytes), got {num_pairs!r}.")
  return values


def mqar_min_seq_len(num_pairs: int) -> int:
  """The shortest model input holding P pairs and P queries: 4P bytes give 4P - 1 targets."""
  return 4 * num_pairs - 1


def mqar_sequence(rng: np.random.Generator, num_pairs: int) -> tuple[np.ndarray, np.ndarray]:
  """One MQAR sequence: (bytes int32 [4P], is_answer bool [4P], True at the queries' values)."""
  keys = rng.choice(MQAR_KEY_BYTES, num_pairs, replace=False)
  values = rng.choice(MQAR_VALUE_BYTES, num_pairs, replace=False)
  order = rng.permutation(num_pairs)
  seq = np.empty(4 * num_pairs, np.int32)
  seq[0:2 * num_pairs:2], seq[1:2 * num_pairs:2] = keys, values
  seq[2 * num_pairs::2], seq[2 * num_pairs + 1::2] = keys[order], values[order]
  is_answer = np.zeros(4 * num_pairs, bool)
  is_answer[2 * num_pairs + 1::2] = True
  return seq, is_answer


def mqar_batch(example_ids: np.ndarray, *, seed: int, num_pairs: int | Sequence[int], seq_len: int,
               stream: str = "train") -> Batch:
  """MQAR language-model rows for example_ids [b] -> Batch of [b, seq_len] arrays.

  Example i is a function of (stream, seed, i) only. Each row draws its number of pairs uniformly from
  num_pairs. Keys as data/pipeline.py's batches: inputs, targets (targets[t] = window[t + 1]), weights
  (1.0 exactly at the query-value targets), segment_ids (1 on the 4P - 1 real targets, 0 on padding)
  and positions (0, 1, ... on real tokens, 0 on padding).
  """
  pairs = mqar_num_pairs(num_pairs)
  if stream not in MQAR_STREAMS:
    raise ValueError(f"unknown MQAR stream {stream!r}; expected one of {', '.join(MQAR_STREAMS)}.")
  if seq_len < mqar_min_seq_len(max(pairs)):
    raise ValueError(f"MQAR with {max(pairs)} pairs needs seq_len >= {mqar_min_seq_len(max(pairs))} "
                     f"(4 bytes per pair), got {seq_len}.")
  example_ids = np.asarray(example_ids, np.int64).reshape(-1)
  rows = len(example_ids)
  windows = np.full((rows, seq_len + 1), byte_vocab.PAD_ID, np.int32)
  answers = np.zeros((rows, seq_len + 1), bool)
  valid = np.zeros(rows, np.int64)
  for r, index in enumerate(example_ids):
    rng = np.random.default_rng([MQAR_STREAMS[stream], int(seed), int(index)])
    p = pairs[int(rng.integers(len(pairs)))]
    seq, is_answer = mqar_sequence(rng, p)
    windows[r, :len(seq)] = seq + byte_vocab.BYTE_OFFSET
    answers[r, :len(seq)] = is_answer
    valid[r] = len(seq) - 1
  return _scored_rows(windows, answers, valid)


def _scored_rows(windows: np.ndarray, scored: np.ndarray, valid: np.ndarray) -> Batch:
  """Language-model rows of id windows [b, L + 1] (PAD after the first valid[r] + 1 ids), loss weight 1 on
  the targets where `scored` [b, L + 1] is True: inputs, targets, weights, segment_ids, positions."""
  seq_len = windows.shape[1] - 1
  real = np.arange(seq_len)[None, :] < valid[:, None]
  inputs = np.where(real, windows[:, :-1], byte_vocab.PAD_ID)
  return {
      "inputs": inputs.astype(np.int32),
      "targets": windows[:, 1:].astype(np.int32),
      "segment_ids": real.astype(np.int32),
      "positions": np.where(real, np.arange(seq_len, dtype=np.int32)[None, :], 0).astype(np.int32),
      "weights": (scored[:, 1:] & real).astype(np.float32),
  }


# --- Copy probes -------------------------------------------------------------------------------------

COPY_PROBES = {  # name -> the alphabet a model that copies nothing guesses from (chance = 1 / its size)
    "passkey_repeat": b"0123456789",
    "passkey_answer": b"0123456789",
    "repeat_digits": b"0123456789",
    "repeat_letters": b"abcdefghijklmnopqrstuvwxyz",
}


def _copy_probe_row(rng: np.random.Generator, probe: str, seq_len: int) -> tuple[bytes, np.ndarray]:
  """(bytes of one row, bool [len] True on the bytes scored) of a copy probe."""
  if probe in ("repeat_digits", "repeat_letters"):
    half = seq_len // 2 + 1  # two copies fill the seq_len + 1 window (the second one cut short)
    text = bytes(rng.choice(np.frombuffer(COPY_PROBES[probe], np.uint8), half)) * 2
    scored = np.zeros(len(text), bool)
    scored[half + 1:] = True  # the second copy's first byte is not predictable by copying
    return text, scored
  text = passkey_document(rng, seq_len)
  key = str(first_key(text)).encode()
  first = text.index(key)
  start = text.index(key, first + len(key)) if probe == "passkey_repeat" else text.rindex(key)
  scored = np.zeros(len(text), bool)
  scored[start:start + len(key)] = True
  return text, scored


def first_key(document: bytes) -> int:
  """The passkey K of a passkey prompt or document: the integer after the first "The pass key is "."""
  return int(document.split(b"The pass key is ", 1)[1][:len(str(PASSKEY_MAX))])


def copy_probe_batch(probe: str, example_ids: np.ndarray, *, seed: int, seq_len: int) -> Batch:
  """Copy-probe rows (module docstring) for example_ids [b] -> Batch of [b, seq_len] arrays, keys as
  mqar_batch's, weight 1 on the scored targets. Row i is a function of (probe, seed, i) only."""
  if probe not in COPY_PROBES:
    raise ValueError(f"unknown copy probe {probe!r}; expected one of {', '.join(COPY_PROBES)}.")
  need = passkey_fixed_bytes() + passkey_document_max_bytes()
  if probe.startswith("passkey") and seq_len < need:
    raise ValueError(f"the passkey copy probes need seq_len >= {need} (the shortest passkey document), got "
                     f"{seq_len}.")
  example_ids = np.asarray(example_ids, np.int64).reshape(-1)
  windows = np.full((len(example_ids), seq_len + 1), byte_vocab.PAD_ID, np.int32)
  scored = np.zeros(windows.shape, bool)
  valid = np.zeros(len(example_ids), np.int64)
  for r, index in enumerate(example_ids):
    rng = np.random.default_rng([_COPY_STREAM, list(COPY_PROBES).index(probe), int(seed), int(index)])
    text, row_scored = _copy_probe_row(rng, probe, seq_len)
    text, row_scored = text[:seq_len + 1], row_scored[:seq_len + 1]
    windows[r, :len(text)] = byte_vocab.encode(text)
    scored[r, :len(text)] = row_scored
    valid[r] = len(text) - 1
  return _scored_rows(windows, scored, valid)


_COPY_STREAM = 5  # after MQAR_STREAMS' values: never the same generator as an MQAR example
