"""The teacher cache: run the text LLM once over every transcript and write sharded Parquet + WebDataset."""
