"""Show, Attend and Tell image captioning: the library behind the pipeline.

Importing ``captioning`` is cheap: it never imports prefect or mlflow (the orchestration lives in
``flows/`` and ``tasks/``), and submodules import torch only where they need it.
"""

__version__ = "0.1.0"
