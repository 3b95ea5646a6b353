"""diva-distill: turn a text LLM into a speech LLM by distillation (DiVA, arXiv 2410.02678).

The repository root is the `diva` package: `teacher_cache/`, `student/`, `manifests/` and `zoo/` are
its sub-packages and `cli.py` is `diva.cli` (see pyproject.toml, `package-dir`).
"""

__version__ = "0.1.0"
