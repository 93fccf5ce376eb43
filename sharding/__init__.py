"""Ingest raw image corpora into WebDataset shards with a parquet manifest."""
