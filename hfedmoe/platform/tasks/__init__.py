"""What a federation learns, one small class per task (see ``base.Task``).

Importing this package registers the built-in tasks; ``TASKS`` maps every registered name
to its class, and the config validates ``task.name`` and ``task.params`` against it.
"""

from hfedmoe.platform.tasks import causal_lm, classification  # noqa: F401  (registers them)
from hfedmoe.platform.tasks.base import TASKS, Evaluation, Examples, Task, make_task, register

__all__ = ["TASKS", "Evaluation", "Examples", "Task", "make_task", "register"]
