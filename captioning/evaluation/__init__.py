"""Scoring captions: pycocoevalcap metrics, a fast CIDEr-D, evaluate()."""
