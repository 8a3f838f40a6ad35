"""Data: corpora and splits, instruction pairs, client partitions, tokenisation, batching."""
