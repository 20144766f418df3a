"""``triage demo send`` against a peer that accepts only Implicit VR Little Endian."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt

from harness.process import free_port
from service.synthetic import PhantomOptions, generate_phantom, write_series
from service.synthetic.sender import send_files


def test_files_are_converted_to_the_only_syntax_the_peer_accepts(tmp_path: Path) -> None:
    """The phantoms are written compressed / explicit VR; the peer takes implicit VR only.
    Each file is decompressed and re-encoded (it used to fail in pynetdicom: "encoded as
    explicit VR little endian but the file meta has Implicit VR Little Endian")."""
    files = write_series(generate_phantom(PhantomOptions(
        seed=3, matrix=64, pixel_spacing=3.2, slice_spacing=3.0, n_slices=12,
        shoulders=False)), tmp_path / "series")
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        assert event.context.transfer_syntax == ImplicitVRLittleEndian
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="IMPLICIT_ONLY")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, [ImplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        report = send_files(files, "127.0.0.1", port, "IMPLICIT_ONLY", "SENDER")
    finally:
        server.shutdown()
    assert report.failed == [] and report.sent == len(files) == len(received)
