"""Byte-level data: vocabulary (bytes), corpora and splits (corpora), batches (pipeline)."""

from data.bytes import BYTE_OFFSET, EOS_ID, PAD_ID, UNK_ID, VOCAB_SIZE, decode, encode, is_byte_id
from data.corpora import SPLITS, DataError, load_documents, open_split
from data.pipeline import eval_batches, make_train_dataset, make_train_iterator
