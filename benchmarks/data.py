"""Byte-store scaling: cache-build MB/s, train-iterator bytes/s and peak RSS against the corpus size.

    python -m benchmarks.data                          # 100 MB, 1 GB and 2 GB single_file corpora
    python -m benchmarks.data --sizes=100M --source=jsonl --out=benchmarks/results/data_cpu_2core.md

For each size it writes a synthetic text corpus (words of random letters; --source=jsonl writes the same
text as 64 shards of JSON lines), then measures in fresh processes, so each peak RSS is that step's own:
  build    data/corpora.py building the cache entry of all three splits (a cold cache directory)
  iterate  the train iterator (data/pipeline.py) for --seconds at --batch x --seq_len on the built cache
At the smallest size it also reads the same windows from the corpus stored as grain ArrayRecord chunks of
64 KiB (the alternative layout: a window crossing a chunk reads two records), to show why the store is one
flat byte file. Peak RSS is the process's VmHWM, Python and numpy included.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

_SIZES = {"K": 1e3, "M": 1e6, "G": 1e9}
_WRITE_CHUNK = 1 << 26
_ARRAY_RECORD_CHUNK = 1 << 16


def parse_size(text: str) -> int:
  text = text.strip().upper()
  return int(float(text[:-1]) * _SIZES[text[-1]]) if text[-1] in _SIZES else int(text)


def _text_block(rng: np.random.Generator, size: int) -> bytes:
  """size bytes of lowercase letters with ~18% spaces and ~1.2% newlines (one byte of memory per byte)."""
  draw = rng.integers(0, 256, size, dtype=np.uint8)
  out = ord("a") + draw % 26
  out[draw < 46] = ord(" ")
  out[(draw >= 46) & (draw < 49)] = ord("\n")
  return out.tobytes()


def write_text_corpus(path: str, num_bytes: int, seed: int = 0) -> str:
  """Writes num_bytes of synthetic text to path in 64 MiB blocks (never more in memory)."""
  rng = np.random.default_rng(seed)
  with open(path, "wb") as f:
    left = num_bytes
    while left > 0:
      block = _text_block(rng, min(left, _WRITE_CHUNK))
      f.write(block)
      left -= len(block)
  return path


def write_jsonl_shards(directory: str, num_bytes: int, shards: int = 64, seed: int = 0) -> str:
  """The same kind of text as JSON lines, one ~4 KB document per line, over `shards` files."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  per_shard = -(-num_bytes // shards)
  for i in range(shards):
    with open(os.path.join(directory, f"part-{i:05d}.jsonl"), "w") as f:
      left = per_shard
      while left > 0:
        text = _text_block(rng, min(left, _WRITE_CHUNK)).decode()
        for start in range(0, len(text), 4096):
          f.write(json.dumps({"text": text[start:start + 4096]}) + "\n")
        left -= len(text)
  return os.path.join(directory, "*.jsonl")


def _data_config(source: str, path: str, cache_dir: str):
  from configs import base  # pylint: disable=import-outside-toplevel
  cfg = base.get_config().data
  cfg.update(source=source, paths=(path,), cache_dir=cache_dir)
  return cfg


def peak_rss_mb() -> float:
  """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the parent across exec."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: argparse.Namespace) -> dict:
  from data import corpora  # pylint: disable=import-outside-toplevel
  from data import pipeline  # pylint: disable=import-outside-toplevel
  cfg = _data_config(args.source, args.path, args.cache_dir)
  if args.child == "build":
    started = time.perf_counter()
    corpora.prepare(cfg, show_progress=False)
    seconds = time.perf_counter() - started
    return {"build_s": seconds, "build_rss_mb": peak_rss_mb()}
  if args.child == "iterate":
    it = pipeline.make_train_iterator(cfg, seq_len=args.seq_len, global_batch_size=args.batch, seed=0)
    next(it)
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < args.seconds:
      count += next(it)["inputs"].size
    return {"iterate_bytes_per_s": count / (time.perf_counter() - started), "iterate_rss_mb": peak_rss_mb()}
  return _array_record_windows(args)


def _array_record_windows(args: argparse.Namespace) -> dict:
  """Random train windows read from the byte store (pread) and from 64 KiB ArrayRecord chunks."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  from data import corpora  # pylint: disable=import-outside-toplevel
  train = corpora.open_split(_data_config(args.source, args.path, args.cache_dir), "train")
  records = os.path.join(args.cache_dir, "train.array_record")
  writer = array_record_module.ArrayRecordWriter(records, "group_size:1")
  for start in range(0, train.num_ids, _ARRAY_RECORD_CHUNK):
    writer.write(train.read(start, start + _ARRAY_RECORD_CHUNK).astype(np.uint16).tobytes())
  writer.close()
  reader = array_record_module.ArrayRecordReader(records, "readahead_buffer_size:0,max_parallelism:0")
  last = reader.num_records() - 1
  span = args.seq_len + 1
  rng = np.random.default_rng(0)
  out = {}
  for layout in ("store", "array_record"):
    started, count = time.perf_counter(), 0
    while time.perf_counter() - started < args.seconds / 2:
      starts = rng.integers(0, train.num_ids - span, args.batch)
      if layout == "store":
        rows = train.windows(starts, span)
      else:
        rows = np.empty((args.batch, span), np.int32)
        for r, s in enumerate(starts):
          first = int(s) // _ARRAY_RECORD_CHUNK
          joined = np.concatenate([np.frombuffer(b, np.uint16) for b in reader.read([first, min(first + 1, last)])])
          offset = int(s) - first * _ARRAY_RECORD_CHUNK
          rows[r] = joined[offset:offset + span]
      count += rows.size
    out[f"{layout}_window_bytes_per_s"] = count / (time.perf_counter() - started)
  reader.close()
  return out


def _run_child(mode: str, args: argparse.Namespace, path: str, cache_dir: str) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.data", f"--child={mode}", f"--path={path}", f"--cache_dir={cache_dir}",
         f"--source={args.source}", f"--batch={args.batch}", f"--seq_len={args.seq_len}",
         f"--seconds={args.seconds}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if proc.returncode:
    raise SystemExit(f"benchmarks.data {mode} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
  lines = ["| corpus | source | cache build | build MB/s | build peak RSS | iterator bytes/s | iterator peak RSS |",
           "|---:|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['bytes'] / 1e6:,.0f} MB | {r['source']} | {r['build_s']:.2f} s | "
                 f"{r['bytes'] / 1e6 / r['build_s']:,.0f} | {r['build_rss_mb']:,.0f} MB | "
                 f"{r['iterate_bytes_per_s'] / 1e6:,.1f} M | {r['iterate_rss_mb']:,.0f} MB |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="100M,1G,2G", help="corpus sizes, comma separated (K, M, G = 10^3..)")
  parser.add_argument("--source", default="single_file", choices=("single_file", "jsonl"))
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--seconds", type=float, default=5.0, help="iterator timing per size")
  parser.add_argument("--dir", default="", help="where corpora and caches go (default: a temporary dir)")
  parser.add_argument("--out", default="", help="also write the table to this markdown file")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--path", default="", help=argparse.SUPPRESS)
  parser.add_argument("--cache_dir", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(_child(args)))
    return
  root = args.dir or tempfile.mkdtemp(prefix="bytelab-data-bench-")
  rows, extra = [], {}
  try:
    for i, size in enumerate(parse_size(s) for s in args.sizes.split(",")):
      work = os.path.join(root, f"{size}")
      os.makedirs(work, exist_ok=True)
      print(f"writing a {size / 1e6:,.0f} MB {args.source} corpus in {work}", file=sys.stderr, flush=True)
      path = (write_text_corpus(os.path.join(work, "corpus.txt"), size) if args.source == "single_file"
              else write_jsonl_shards(os.path.join(work, "shards"), size))
      cache_dir = os.path.join(work, "cache")
      row = {"bytes": size, "source": args.source}
      row.update(_run_child("build", args, path, cache_dir))
      row.update(_run_child("iterate", args, path, cache_dir))
      if i == 0:
        extra = _run_child("layouts", args, path, cache_dir)
      rows.append(row)
      print(_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
      shutil.rmtree(work)  # the next size needs the disk
  finally:
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)
  text = _table(rows)
  if extra:
    text += (f"\n\nRandom {args.batch} x {args.seq_len + 1} train windows at {rows[0]['bytes'] / 1e6:,.0f} MB: "
             f"byte store {extra['store_window_bytes_per_s'] / 1e6:,.1f} M bytes/s, ArrayRecord (64 KiB "
             f"chunks, uint16 ids) {extra['array_record_window_bytes_per_s'] / 1e6:,.1f} M bytes/s.")
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
