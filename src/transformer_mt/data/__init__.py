"""Data: raw corpus files -> SentencePiece ids -> cached arrays -> token-budget batches."""
