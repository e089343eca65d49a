"""Data: tokenizers, the embedded Shakespeare TFDS dataset, and the packed grain pipeline.

    from ardiff.data import make_dataset, to_global_batch, make_tokenizer
    ds, tok = make_dataset(config.data, "train", seed=0, batch_size=64, seq_len=256, block_size=16)

See ``ardiff/data/pipeline.py`` for the batch format.
"""

from ardiff.data.pipeline import BATCH_KEYS, DataConfig, make_dataset, make_source, to_global_batch
from ardiff.data.shakespeare import data_source, prepare
from ardiff.data.tokenizers import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer, make_tokenizer,
                                    token_byte_lengths)

__all__ = [
    "BATCH_KEYS", "DataConfig", "make_dataset", "make_source", "to_global_batch", "data_source", "prepare",
    "ByteTokenizer", "HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "make_tokenizer",
    "token_byte_lengths",
]
