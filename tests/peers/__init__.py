"""Real DICOM peers for the tests, one set for tests/unit and tests/integration.

- :mod:`tests.peers.dicom`: DCMTK ``storescu`` and ``storescp``, ``triage scp`` as a separate
  process (:class:`~tests.peers.dicom.ScpProcess`), :func:`~tests.peers.dicom.wait_until`;
- :mod:`tests.peers.orthanc`: one Orthanc launcher (:class:`~tests.peers.orthanc.Orthanc`,
  and :func:`~tests.peers.orthanc.orthanc` with the settings the export tests use).

Each is started on free loopback ports and stopped by its own process id afterwards; a missing
tool skips the test naming its Debian package (or fails it under TEST_REQUIRE_SERVICES, see
``tests/conftest.py``).
"""
