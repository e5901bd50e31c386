"""Paper tasks: loader for PaperBench-layout task dirs and the bundled offline mini-paper suite."""

from klong_jax.tasks.loader import (
    SPLITS,
    Task,
    TaskError,
    bundled_tasks_dir,
    list_tasks,
    load_task,
    parse_blacklist,
)

__all__ = ["SPLITS", "Task", "TaskError", "bundled_tasks_dir", "list_tasks", "load_task",
           "parse_blacklist"]
