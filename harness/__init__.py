"""The test and benchmark harness: real peers, real processes and synthetic inputs, in one place.

Both ``tests/`` and ``bench/`` start the same things (``triage scp`` and ``triage worker`` as
processes, DCMTK's ``storescu``/``storescp``, an Orthanc) and write the same synthetic inputs
(small CT series with full header control, the results tests' volume and findings, worklist
rows). They live here, once, rather than in ``tests/`` because a benchmark is not a test: when
``bench/`` imported ``tests.conftest`` it depended on pytest's fixture module, and integration
tests importing ``tests.unit`` tied one suite to another's layout. ``.importlinter`` keeps it
so (``bench`` and ``harness`` never import ``tests``; integration and browser tests never
import ``tests.unit``; the service never imports any of them).

Why a top-level package and not ``service.synthetic``: nothing here is a product feature. It
starts servers, reads test-only environment variables and skips tests; ``service.synthetic``
renders the anatomy the product's demo and training use. The wheel ships ``service`` only
(``pyproject.toml``), so none of this is installed with the service.

- :mod:`harness.services`: which PostgreSQL/Redis to use, and :func:`~harness.services.missing`
  (skip a test naming the absent peer, fail it under ``TEST_REQUIRE_SERVICES``, or raise
  :class:`~harness.services.PeerMissing` outside pytest);
- :mod:`harness.process`: free ports, waiting, stopping a child process;
- :mod:`harness.dcmtk`: DCMTK's programs, found by what they are;
- :mod:`harness.peers`: DICOM peers (DCMTK, pynetdicom, ``triage scp``), Orthanc, and private
  Redis/PostgreSQL servers a test may stop and restart;
- :mod:`harness.worker`: ``triage worker`` as a process, and spooling a series as the SCP would;
- :mod:`harness.faults`: the whole service as separate processes under a fault (the fault
  table and ``bench.burst``);
- :mod:`harness.pki`: a throwaway CA and certificates for the TLS tests;
- :mod:`harness.web`: API tokens and a form login for the dashboard;
- :mod:`harness.data`: synthetic inputs (CT series, a results case, seeded worklist and admin
  rows).
"""
