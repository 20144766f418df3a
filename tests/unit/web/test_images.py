"""Key images of the study page: drawn from a phantom series in the spool and the SEG in the
result store, cached, behind login."""

from __future__ import annotations

import io
import shutil

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from harness.data.worklist_seed import add_imaged_study
from harness.web import login
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.web.app import create_app
from service.web.images import SUSPECTED_RGB


def test_reformats_and_key_image_with_outline(settings_factory, sqlite_url: str) -> None:  # type: ignore[no-untyped-def]
    migrate.upgrade(sqlite_url)
    settings = settings_factory(database_url=sqlite_url)
    with make_session_factory(make_engine(sqlite_url))() as session:
        uid = add_imaged_study(session, settings).study_instance_uid
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.get(f"/studies/{uid}/images/sagittal.png").status_code == 401
        login(client, sqlite_url)
        detail = client.get(f"/api/studies/{uid}").json()
        assert detail["images"] == ["sagittal", "coronal", "axial-C4"]
        page = client.get(f"/studies/{uid}").text
        for view in detail["images"]:
            assert f"/studies/{uid}/images/{view}.png" in page
        images = {}
        for view in detail["images"]:
            response = client.get(f"/studies/{uid}/images/{view}.png")
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "image/png"
            images[view] = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
        for view, pixels in images.items():
            assert pixels.shape[1] == 420, view
            red = np.all(pixels == SUSPECTED_RGB, axis=-1)
            assert red.sum() > 50, f"{view}: no suspected outline or box drawn"
            colored = (np.abs(pixels[..., 0].astype(int) - pixels[..., 2]) > 60).sum()
            assert colored > red.sum(), f"{view}: no vertebra outline besides the red"
        cached = sorted(p.name for p in (settings.data_dir / "cache" / "images").rglob("*.png"))
        assert cached == ["axial-C4.png", "coronal.png", "sagittal.png"]
        assert client.get(f"/studies/{uid}/images/axial-C2.png").status_code == 404
        assert client.get(f"/studies/{uid}/images/..%2Fx.png").status_code == 404
        # Served from the cache once drawn, even after the spool is cleaned.
        shutil.rmtree(settings.spool_path)
        assert client.get(f"/studies/{uid}/images/sagittal.png").status_code == 200
        assert client.get(f"/api/studies/{uid}").json()["images"] == []
