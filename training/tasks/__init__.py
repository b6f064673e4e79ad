"""Procedural tasks for training and evaluating the project's own small MLLM (no datasets download here)."""

from mmrag.training.tasks.families import FAMILIES, IMAGE_FAMILIES, Task, document_source, make_task, split_of

__all__ = ["FAMILIES", "IMAGE_FAMILIES", "Task", "document_source", "make_task", "split_of"]
