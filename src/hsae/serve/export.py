"""`hsae export-site`: the browser as static files (the page plus JSON), to share without a server.

    OUT/index.html            the same page, in static mode (links are #/features/I)
    OUT/static/               its script and style
    OUT/report.html           the eval report, if there is one
    OUT/data/models.json
    OUT/data/KEY/model.json, children/P.json (all children of P, -1 for the roots),
                 features/I.json, search.json (every feature's summary and the token index)
    OUT/images/KEY/ID.png     an image model's pictures: only those some feature shows (its top images)

The site is built in a temporary folder beside OUT and renamed into place; an OUT that is not an
earlier export is never overwritten.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from hsae.errors import HsaeError, HsaeWarning
from hsae.serve.app import STATIC, model_keys
from hsae.serve.data import ModelView
from hsae.serve.images import ImageNotFound

MARKER = ".hsae-site"


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, separators=(",", ":")))


def static_page() -> str:
    page = (STATIC / "index.html").read_text()
    if '<base href="/">' not in page:
        raise HsaeError(f'{STATIC / "index.html"} has no <base href="/">: the package is damaged, reinstall hsae')
    return page.replace('<base href="/">', '<base href="./">\n<meta name="hsae-static" content="1">')


def _write_images(view: ModelView, ids: set[int], folder: Path) -> None:
    """The pictures `ids` as PNGs; one that cannot be read is named in a warning (its card shows
    that the picture is missing) and the export goes on."""
    if view.images is None or not ids:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for image in sorted(ids):
        try:
            (folder / f"{image}.png").write_bytes(view.images.png(image))
        except ImageNotFound as err:
            warnings.warn(f"export-site: picture left out: {err}", HsaeWarning, stacklevel=2)


def export_site(directory: str | Path, out: str | Path, progress: Callable[[int, int], None] | None = None) -> Path:
    out = Path(out)
    if out.exists() and not (out / MARKER).is_file():
        if not out.is_dir() or any(out.iterdir()):
            raise HsaeError(f"{out} exists and is not an hsae site: choose a new folder (nothing was written)")
    [key] = model_keys([Path(directory)])
    view = ModelView(directory, key)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    build.chmod(0o755)  # a site is for sharing (mkdtemp makes it private)
    try:
        (build / "index.html").write_text(static_page())
        shutil.copytree(STATIC, build / "static", ignore=shutil.ignore_patterns("index.html"))
        if view.report_html.is_file():
            shutil.copyfile(view.report_html, build / "report.html")
        data = build / "data"
        _write(
            data / "models.json",
            [{"key": key, "name": view.directory.name, "arch": view.sae.arch, "n_latents": view.n_latents}],
        )
        _write(data / key / "model.json", view.model())
        for parent, ids in view.children.items():
            _write(data / key / "children" / f"{parent}.json", [view.summary(int(i)) for i in ids])
        shown: set[int] = set()
        for i in range(view.n_latents):
            feature = view.feature(i)
            _write(data / key / "features" / f"{i}.json", feature)
            shown.update(item["id"] for item in (feature.get("images") or {}).get("items", []))
            if progress is not None and (i % 256 == 0 or i == view.n_latents - 1):
                progress(i + 1, view.n_latents)
        _write_images(view, shown, build / "images" / key)
        tokens = view.db.token_index() if view.db is not None else {}
        _write(
            data / key / "search.json",
            {"summaries": [view.summary(i) for i in range(view.n_latents)], "tokens": tokens},
        )
        (build / MARKER).write_text("an hsae export-site folder: it is replaced whole when exported again\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            build.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            build.rename(out)
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    return out
