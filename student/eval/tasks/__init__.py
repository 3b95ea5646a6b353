"""Downstream tasks for `diva bench-task`: the data layouts they read (data.py), their specs (specs.py) and their
scorers (scorers.py); the harness that runs the systems is student/eval/bench_task.py."""
