"""Synthetic inputs written here, not rendered by ``service.synthetic``: fast, header-level
control where the tests and benchmarks need it, no anatomy.

- :mod:`harness.data.ctdata`: CT series with any orientation, tilt, kernel, image type, gaps
  (ingest tests, ``bench.ingest``);
- :mod:`harness.data.results_inputs`: a small CT series, its ``Volume``, a label map and a
  ``Findings`` (results and export tests, ``bench.results``);
- :mod:`harness.data.worklist_seed`: worklist rows written straight into the database
  (dashboard tests, browser test).
"""
