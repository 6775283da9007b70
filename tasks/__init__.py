"""Prefect tasks: a few lines around ONE ``captioning`` library call each (STYLE habit 1)."""
