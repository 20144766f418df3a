"""Real DICOM peers for the tests and the benchmarks, one set.

- :mod:`harness.peers.dicom`: DCMTK ``storescu`` and ``storescp``, a pynetdicom SCU
  (:class:`~harness.peers.dicom.Scu`), ``triage scp`` as a separate process
  (:class:`~harness.peers.dicom.ScpProcess`);
- :mod:`harness.peers.orthanc`: one Orthanc launcher (:class:`~harness.peers.orthanc.Orthanc`,
  and :func:`~harness.peers.orthanc.orthanc` with the settings the export tests use).

Each is started on free loopback ports and stopped by its own process id afterwards; a missing
tool skips the test naming its Debian package (or fails it under TEST_REQUIRE_SERVICES), see
:func:`harness.services.missing`.
"""
