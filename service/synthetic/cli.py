"""``triage demo generate`` and ``triage demo send``: synthetic studies for demos and tests.

``generate`` writes N studies (about half fractured unless ``--fracture-rate`` says
otherwise) either as DICOM studies (one directory per study with its series) plus a
``manifest.csv`` of the ground truth, or in the RSNA 2022 training layout
(``--layout rsna``). ``send`` C-STOREs a directory tree to an SCP like a PACS would.
Everything generated is synthetic and labelled as such (PatientName SYNTHETIC^...).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from service.findings import VERTEBRAE

if TYPE_CHECKING:
    from service.config import Settings

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["StudyInstanceUID", "seed", "patient_overall", *VERTEBRAE, "fractures",
                    "mimics", "series_dirs", "seconds"]


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from service.synthetic import (
        VERTEBRA_NAMES,
        MultiFrame,
        TransferSyntax,
        WriterOptions,
        generate_phantom,
        random_options,
        write_rsna_layout,
        write_study,
    )

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    writer = WriterOptions(
        transfer_syntax=TransferSyntax(args.transfer_syntax), shuffle=args.shuffle,
        localizer=args.localizer, soft_kernel_series=args.soft_kernel,
        non_ct_series=args.non_ct, multiframe=MultiFrame(args.multiframe))
    cases = []
    for i in range(args.studies):
        opts = random_options(args.seed + i, fracture_rate=args.fracture_rate,
                              matrix=args.matrix, n_slices=args.n_slices)
        if args.slice_spacing:
            opts = replace(opts, slice_spacing=args.slice_spacing,
                           slice_thickness=args.slice_spacing)
        cases.append(opts)
    if args.layout == "rsna":
        index = write_rsna_layout(out, cases, writer_options=writer)
        print(json.dumps({"layout": "rsna", "out": str(out), "studies": len(index.studies),
                          "fractured": index.fractured}))
        return 0
    manifest = out / "manifest.csv"
    new_file = not manifest.exists()
    fractured = 0
    with manifest.open("a", newline="") as fh:
        writer_csv = csv.writer(fh)
        if new_file:
            writer_csv.writerow(MANIFEST_COLUMNS)
        for opts in cases:
            t0 = time.perf_counter()
            phantom = generate_phantom(opts)
            from service.synthetic import study_uid

            uid = study_uid(phantom, writer)
            series = write_study(phantom, out / uid, writer)
            fractured += int(phantom.patient_fractured)
            writer_csv.writerow([
                uid, opts.seed, int(phantom.patient_fractured),
                *[int(phantom.vertebra_fractured[v]) for v in VERTEBRA_NAMES],
                ";".join(f"{f.vertebra}:{f.type.value}" for f in phantom.fractures),
                ";".join(f"{m.vertebra}:{m.type.value}" for m in phantom.mimics),
                ";".join(f"{s.role}={len(s.paths)}" for s in series),
                f"{time.perf_counter() - t0:.2f}"])
            fh.flush()
            logger.info("study %s written (%d series)", uid[-12:], len(series))
    print(json.dumps({"layout": "series", "out": str(out), "studies": len(cases),
                      "fractured": fractured, "manifest": str(manifest)}))
    return 0


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    from service.synthetic.sender import find_dicom_files, send_files

    paths = find_dicom_files(args.path) if args.path.is_dir() else [args.path]
    if not paths:
        print(json.dumps({"error": f"no DICOM files under {args.path}"}))
        return 2
    report = send_files(paths, args.host, args.port or settings.dicom_port,
                        args.ae_title or settings.ae_title, args.calling_ae,
                        associations=args.associations, per_series=args.per_series,
                        timeout=args.timeout)
    print(json.dumps({"files": len(paths), "sent": report.sent, "failed": len(report.failed),
                      "associations": report.associations, "statuses": report.statuses,
                      "seconds": round(report.seconds, 2),
                      "first_failures": report.failed[:5]}))
    return 0 if not report.failed else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo generate`` and ``demo send`` to the ``triage`` command."""
    demo = sub.add_parser("demo", help="synthetic phantom studies: generate, send")
    actions = demo.add_subparsers(dest="action", required=True)
    gen = actions.add_parser("generate", help="write synthetic cervical-spine CT studies")
    gen.add_argument("--studies", type=int, default=4)
    gen.add_argument("--seed", type=int, default=0, help="seed of the first study")
    gen.add_argument("--out", type=Path, required=True)
    gen.add_argument("--layout", choices=["series", "rsna"], default="series")
    gen.add_argument("--fracture-rate", type=float, default=0.5)
    gen.add_argument("--matrix", type=int, default=512,
                     help="512 (default) or e.g. 256 for fast training data (same FOV)")
    gen.add_argument("--n-slices", type=int, default=None,
                     help="default: cover the skull base to T2 at the drawn slice spacing")
    gen.add_argument("--slice-spacing", type=float, default=None,
                     help="mm; default: drawn per study from clinical protocols")
    gen.add_argument("--transfer-syntax", default="explicit",
                     choices=["explicit", "implicit", "deflated", "jpeg-lossless", "jpeg-ls",
                              "jpeg2000", "rle"])
    gen.add_argument("--multiframe", default="none", choices=["none", "enhanced", "legacy"])
    gen.add_argument("--shuffle", action="store_true", help="random file names")
    gen.add_argument("--localizer", action="store_true", help="add a localizer series")
    gen.add_argument("--soft-kernel", action="store_true", help="add a soft-kernel series")
    gen.add_argument("--non-ct", action="store_true", help="add a non-CT (SC) series")
    gen.set_defaults(handler=cmd_generate)

    send = actions.add_parser("send", help="C-STORE a directory of DICOM files to an SCP")
    send.add_argument("path", type=Path, help="a DICOM file or a directory (recursive)")
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, default=None, help="default: TRIAGE_DICOM_PORT")
    send.add_argument("--ae-title", default=None, help="called AE (default: TRIAGE_AE_TITLE)")
    send.add_argument("--calling-ae", default="SYNTH_PACS")
    send.add_argument("--associations", type=int, default=1,
                      help="concurrent associations (files spread round-robin)")
    send.add_argument("--per-series", action="store_true",
                      help="one association per series")
    send.add_argument("--timeout", type=float, default=30.0, help="network timeouts, s")
    send.set_defaults(handler=cmd_send)
