"""Evaluation of a stage bundle on the paper's benchmark tasks (``python evaluate.py task=...``).

- :mod:`~nextgpt.evaluation.readers`: the benchmarks in their official layouts -> samples;
- :mod:`~nextgpt.evaluation.tasks`: run a task (batched generation, resumable records) or read given predictions;
- :mod:`~nextgpt.evaluation.batched`: the batched generator the tasks use;
- :mod:`~nextgpt.evaluation.scoring`: the metrics;
- :mod:`~nextgpt.evaluation.report`: ``results.json`` / ``results.md`` and the loggers.
"""
