"""Thin command-line entry points, e.g. experiments.train, experiments.reproduce.

They parse flags and configs and call one function in `lrcr`; `lrcr` never
imports this package.
"""
