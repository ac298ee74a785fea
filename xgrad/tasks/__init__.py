"""Tasks: what a batch means (loss and metrics), one file per kind of problem.

The protocol the engine relies on is in :mod:`xgrad.tasks.base`.
"""
