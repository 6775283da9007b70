"""When a failed task is worth another attempt: every failure but the ones that cannot heal by waiting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def unless(*permanent: type[BaseException]) -> Callable[[Any, Any, Any], bool]:
    """A ``retry_condition_fn`` that retries every failure except exceptions of the ``permanent`` types
    (a registry without a champion, a bad setting: retrying in 30 s gives the same answer)."""

    def condition(task: Any, task_run: Any, state: Any) -> bool:
        return not isinstance(state.result(raise_on_failure=False), permanent)

    return condition
