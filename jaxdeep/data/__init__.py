"""Token data: byte tokenizer, corpus sources, train/eval split, resumable batches, placement on a mesh."""

from jaxdeep.data.fingerprint import token_fingerprint
from jaxdeep.data.iterator import TokenBatches
from jaxdeep.data.sharding import to_global_array
from jaxdeep.data.sources import STDLIB_SOURCE, load_tokens, stdlib_files
from jaxdeep.data.split import DEFAULT_EVAL_FRACTION, split_train_eval
from jaxdeep.data.tokenizer import EOS_MARKER, ByteTokenizer

__all__ = [
    "DEFAULT_EVAL_FRACTION",
    "EOS_MARKER",
    "STDLIB_SOURCE",
    "ByteTokenizer",
    "TokenBatches",
    "load_tokens",
    "split_train_eval",
    "stdlib_files",
    "to_global_array",
    "token_fingerprint",
]
