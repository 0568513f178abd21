"""Landmark attention language model (specs/attention_variants.md §2): every mixer is "landmark".

    python train.py --config=configs/landmark.py --workdir=runs/landmark
    python train.py --config=configs/landmark.py --workdir=/tmp/landmark_run --config.train.steps=30  # smoke

Landmarks are inserted inside the model (model.name "landmark_lm", models/landmark.py): one landmark id (259) after every
block_size - 1 = 50 bytes of each document (spec §2.1, paper ℓ_block = 50); their hidden states are
dropped before the LM head, so the loss and bits-per-byte count bytes only, as for every other mixer
(equal to the lm_benchmark loss on the expanded stream, spec §2.3). Training always uses the exact
grouped softmax (spec §2.2); `model.landmark.inference` only changes decoding.

Evaluation. `full` (default) decodes exactly (grouped softmax over the whole cache). Passkey retrieval with
top-k block retrieval from the cache (spec §2.4, §2.7), k recorded explicitly (spec §2.8):

    python evaluate.py --workdir=runs/landmark --tasks=passkey --passkey.lengths=1,4,16 \\
        --model.landmark.inference=topk --model.landmark.top_k=4 --model.landmark.stingy=True

(`--model.landmark.granularity=max_over_heads|max_over_tokens` for the Table 2 variants;
`--model.landmark.chunk_len` is ℓ_local, the queries per retrieval call.)
"""

import ml_collections

import models
from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.name = "landmark_lm"  # the Transformer with landmark insertion (models/landmark.py)
  config.model.mixer = "landmark"
  config.model.landmark = models.mixer_config("landmark")  # every option, with its default
  # Window-aligned blocks (lm_benchmark's continuous stream) so training runs the blockwise op; the
  # module default "document" restarts blocks per document (exact packed == alone, O(N^2) reference op).
  config.model.landmark.packed_blocks = "stream"
  return config
