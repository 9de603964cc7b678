"""The application around lrcr: data, the training loop, figures, benchmarks.

Run from a checkout with `python -m experiments.<entry point>`; its
dependencies are the `experiments` extra. `lrcr` never imports this package.
"""
