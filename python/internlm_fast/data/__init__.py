"""Data: the sentencepiece tokenizer, corpus -> memory-mapped token files, the built-in corpus."""

from .builtin_corpus import BuiltinCorpus, prepare_builtin_corpus
from .documents import MalformedLineError
from .packed_loader import PackedBatch, PackedLoader
from .token_file import TokenDataset, TokenFileWriter, unigram_entropy
from .tokenize_corpus import TokenizeStats, tokenize_files, tokenize_texts
from .tokenizer import Tokenizer
from .tokenizer_trainer import train_tokenizer

__all__ = [
    "BuiltinCorpus",
    "MalformedLineError",
    "PackedBatch",
    "PackedLoader",
    "TokenDataset",
    "TokenFileWriter",
    "TokenizeStats",
    "Tokenizer",
    "prepare_builtin_corpus",
    "tokenize_files",
    "tokenize_texts",
    "train_tokenizer",
    "unigram_entropy",
]
