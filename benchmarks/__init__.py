"""Benchmarks of dask-vastai; results and how they were taken in ``RESULTS.md``.

Run each as a module from the repository root (``python -m benchmarks.<name>``): that puts
the root on ``sys.path``, so a benchmark can import the test scaffolding from
``tests.helpers`` (never a test file by path).
"""
