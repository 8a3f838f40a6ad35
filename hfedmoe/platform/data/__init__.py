"""Data: corpora and splits, client partitions, tokenisation and batching."""
