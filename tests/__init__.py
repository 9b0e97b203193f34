"""dask-vastai's test suite, a package so that tests and benchmarks share ``tests.helpers``.

Layout: ``core/`` tests the product (``dask_vastai``), ``plugin/`` the Snakemake executor,
``emulator/`` the local Vast marketplace, and ``helpers/`` holds the test doubles and
waiting helpers they share. Run from the repository root: ``python3 -m pytest``.
"""
