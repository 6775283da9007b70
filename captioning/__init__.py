"""Show, Attend and Tell image captioning: the library behind the pipeline.

It never imports Prefect (the orchestration lives in ``flows/`` and ``tasks/``, each task a few lines
around one call into this package). MLflow is imported only by ``tracking``, ``registry`` and
``serving``; importing ``captioning`` itself is cheap, and submodules import torch only where they
need it. The tree is described in README.md ("Layout").
"""

__version__ = "0.1.0"
