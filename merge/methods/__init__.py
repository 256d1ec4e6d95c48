"""The built-in merge methods; importing this package registers each of them."""

from merge.methods import dare, linear, sce, task_arithmetic, ties, varm  # noqa: F401
