"""Plots of training runs (matplotlib, Agg backend: files, never windows)."""

from rnnkit.viz.curves import plot_run

__all__ = ["plot_run"]
