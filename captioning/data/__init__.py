"""Data pipeline: Karpathy records -> vocabulary -> WebDataset shards -> loader."""
