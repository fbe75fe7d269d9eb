"""Stage 5: metrics of a model's scores (IC family, classification, long-short) and plots."""
