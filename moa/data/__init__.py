"""Tasks, data sources (hf, local, synthetic), preprocessing to Parquet, and training batches."""
