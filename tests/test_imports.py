"""The library never imports the orchestrator (STYLE habit 1), and its light modules stay light."""

from __future__ import annotations

import subprocess
import sys


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(out.stdout.split())


def test_import_captioning_pulls_in_neither_prefect_nor_mlflow() -> None:
    modules = imported_after(
        "import captioning, captioning.config, captioning.cli, captioning.vision, "
        "captioning.data.records, captioning.data.vocab, captioning.data.synthetic"
    )
    for heavy in ("prefect", "mlflow"):
        assert heavy not in modules, f"importing captioning imported {heavy}"


def test_config_records_vocab_do_not_import_torch() -> None:
    modules = imported_after(
        "import captioning.config, captioning.data.records, captioning.data.vocab, captioning.cli"
    )
    assert "torch" not in modules
