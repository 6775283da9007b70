"""Prefect flows: the DAGs (prepare-data, train-sat, evaluate, retrain) that wire ``tasks/``.

Flows hold no business logic; every step is a task around one ``captioning`` library call.
"""
