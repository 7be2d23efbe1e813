"""Data pipeline: corpus sources -> SentencePiece tokenizer -> uint16 memmap shards -> windows."""
