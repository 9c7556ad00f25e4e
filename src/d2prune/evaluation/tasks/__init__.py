"""Zero-shot tasks of lm-evaluation-harness, run offline from the local data folder.

``convert`` reads each task's raw files and gives records in the layout of the Hub data set lm-eval
normally downloads; ``configs`` writes lm-eval task YAMLs that include lm-eval's own config for the
task and read those records. ``d2prune.evaluation.zeroshot`` runs them.
"""

from d2prune.evaluation.tasks.convert import CONVERTERS, LOCAL_TASKS, LocalTask, check_files, load_task_docs

__all__ = ["CONVERTERS", "LOCAL_TASKS", "LocalTask", "check_files", "load_task_docs"]
