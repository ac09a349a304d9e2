"""The data package: rows in, tokenized training examples out.

    sources   -> where rows come from (files, directories, the Hub; streams)
    formats   -> how a row becomes (text, trained) segments (text, prompt/completion, chat)
    examples  -> the tokenized-examples store (`Examples`) and split statistics
    tokenize  -> segments -> token ids with exact trained-token masks
    cache     -> prepared splits on disk, keyed by data, tokenizer and settings
    pipeline  -> `prepare_data(DataOptions, tokenizer)`: all of the above for in-memory data
    streaming -> the same, chunk by chunk, for data too big for memory

Imports point one way: formats and examples import nothing of sftune.data; tokenize imports
them; sources imports formats; cache imports examples, formats and sources; pipeline and
streaming import the rest.
"""

from sftune.data.examples import Examples, SplitStats, count_targets, drop_untrained
from sftune.data.pipeline import DataOptions, PreparedData, prepare_data
from sftune.data.tokenize import EncodeOptions, encode_example

__all__ = ["DataOptions", "EncodeOptions", "Examples", "PreparedData", "SplitStats", "count_targets",
           "drop_untrained", "encode_example", "prepare_data"]
