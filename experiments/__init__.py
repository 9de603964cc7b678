"""The application around lrcr: data, training, figures, benchmarks."""
