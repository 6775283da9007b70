"""The local services the pipeline talks to, apart from the ML library: an MLflow tracking server
(mlflow_server.py), an S3-compatible server (s3_server.py), the Prefect + MLflow (+ S3) stack that
runs them together (stack.py), and the ``captioning mlflow|stack`` subcommands (cli.py)."""
