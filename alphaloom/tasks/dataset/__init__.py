"""Stage 3: the training data set on disk: text vectors per symbol and parquet shards."""
