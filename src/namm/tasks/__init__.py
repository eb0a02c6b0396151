"""Long-context benchmark tasks: the offline synthetic suite, LongBench, InfiniteBench and ChouBun.

    from namm.tasks import get_task
    samples = get_task("passkey").samples(tokenizer, length=2048, n=20)
"""

from namm.tasks.base import Sample, Task
from namm.tasks.registry import get_task, task_names

__all__ = ["Sample", "Task", "get_task", "task_names"]
