"""Stage 1-2: market data in (ingest, synthetic market), Alpha158 factors, labels and splits."""
