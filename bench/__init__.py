"""Benchmarks: each module prints its ratios against a named peer (``python -m bench.<name>``;
``python -m bench.run_all`` runs them all). A package so that the import contracts
(``.importlinter``) see it: benchmarks use ``harness`` and never ``tests``."""
