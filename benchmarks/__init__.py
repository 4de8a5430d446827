"""Speed measurements of ilvae (not tests): ``python -m benchmarks [--quick] --out DIR``.

Every figure is the ratio of two things measured side by side in the same process, the median of
several alternating rounds after warm-up; see :mod:`benchmarks._common`.
"""
