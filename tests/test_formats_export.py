"""Exporting hsae models: the files written are the ones the real libraries were checked on (their
codes and reconstructions of hsae's exports, recorded by scripts/make_format_fixtures.py in each
library's own environment, equal hsae's), and export -> import gives the model back."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hsae
from hsae.config import from_dict
from hsae.errors import HsaeError
from hsae.formats import FORMATS, export_model, import_sae
from hsae.models import get_family
from hsae.models.codes import to_dense

DATA = Path(__file__).parent / "data" / "formats"
EXPORTS = sorted(p.name for p in (DATA / "exports").iterdir() if p.is_dir())
TOL = 1e-5
VERSION_KEYS = {"written_by", "trainer_class", "hsae_version"}  # name the hsae version that wrote the file


def outputs(model, x):
    with torch.no_grad():
        codes = model.encode(x)
        return to_dense(codes), model.decode(codes)


def max_err(a, b):
    return float((a - b).abs().max())


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(data[k]) for k in data.files}
    return torch.load(path, weights_only=True)


def _without_versions(value):
    if isinstance(value, dict):
        return {k: _without_versions(v) for k, v in value.items() if k not in VERSION_KEYS}
    return value


def test_every_family_a_format_holds_has_a_checked_export():
    expected = {f"{arch}-{fmt}" for fmt, module in FORMATS.items() for arch in module.WRITES}
    assert set(EXPORTS) == expected


@pytest.mark.parametrize("name", EXPORTS)
def test_export_is_what_the_library_reproduced(tmp_path, name):
    arch, fmt = name.rsplit("-", 1)
    checked = DATA / "exports" / name
    exported = export_model(DATA / "hsae" / arch, fmt, tmp_path / "out")
    assert sorted(p.name for p in exported.files) == sorted(
        p.name for p in checked.iterdir() if p.name != "library.safetensors"
    )
    for path in exported.files:
        if path.suffix == ".json":
            assert _without_versions(json.loads(path.read_text())) == _without_versions(
                json.loads((checked / path.name).read_text())
            )
        else:
            ours, theirs = _tensors(path), _tensors(checked / path.name)
            assert ours.keys() == theirs.keys()
            assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # What the real library computed from these files, on raw activations, is what hsae computes.
    library = load_file(str(checked / "library.safetensors"))
    codes, x_hat = outputs(hsae.load(DATA / "hsae" / arch), library["x"])
    assert max_err(codes, library["codes"]) <= TOL and max_err(x_hat, library["x_hat"]) <= TOL


@pytest.mark.parametrize("name", EXPORTS)
def test_export_then_import_gives_the_model_back(tmp_path, name):
    arch, fmt = name.rsplit("-", 1)
    original = hsae.load(DATA / "hsae" / arch)
    export_model(DATA / "hsae" / arch, fmt, tmp_path / "out")
    back = import_sae(tmp_path / "out").model
    x = load_file(str(DATA / "hsae" / arch / "hsae.safetensors"))["x"]
    (c0, r0), (c1, r1) = outputs(original, x), outputs(back, x)
    assert back.arch == arch and back.config == original.config  # input_scale and options restored
    assert max_err(c0, c1) <= TOL and max_err(r0, r1) <= TOL
    assert torch.equal(back.hierarchy(), original.hierarchy())  # the saved forest travels in hsae.json
    # Without the sidecar the numbers still agree: the input scale stays folded into the weights.
    (tmp_path / "out" / "hsae.json").unlink()
    bare = import_sae(tmp_path / "out").model
    assert bare.config.input_scale == 1.0 and max_err(outputs(bare, x)[1], r0) <= TOL


def test_export_keeps_the_forest_in_the_sidecar(tmp_path):
    export_model(DATA / "hsae" / "topk", "saelens", tmp_path / "out")
    sidecar = json.loads((tmp_path / "out" / "hsae.json").read_text())
    assert sidecar["parents"] == hsae.load(DATA / "hsae" / "topk").hierarchy().tolist()
    assert sidecar["sae"]["input_scale"] == pytest.approx(1.7)
    assert sidecar["record"]["data"]["kind"] == "synthetic"


def _save(tmp_path, arch, **options):
    family = get_family(arch)
    config = from_dict(family.config_class, {"arch": arch, "d_in": 8, "n_latents": 16, **options})
    family.from_config(config).save(tmp_path / arch)
    return tmp_path / arch


@pytest.mark.parametrize(
    "arch,options", [("mp", {"k": 2}), ("h-sae", {"k": 2, "m_low": 3}), ("tree", {"k": 2}), ("forest", {"k": 2})]
)
def test_families_without_a_foreign_form_are_refused(tmp_path, arch, options):
    with pytest.raises(HsaeError, match=f"the {arch} family cannot be written"):
        export_model(_save(tmp_path, arch, **options), "saelens", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_untrained_batchtopk_is_written_as_the_topk_it_encodes_with(tmp_path):
    exported = export_model(_save(tmp_path, "batchtopk", k=3), "sparsify", tmp_path / "out")
    assert any("never trained" in note for note in exported.notes)
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["k"] == 3


def test_a_format_that_cannot_hold_the_family_says_which_can(tmp_path):
    with pytest.raises(HsaeError, match="the sparsify format cannot hold a jumprelu SAE"):
        export_model(DATA / "hsae" / "jumprelu", "sparsify", tmp_path / "out")
    with pytest.raises(HsaeError, match="gemma_scope format cannot hold a topk"):
        export_model(DATA / "hsae" / "topk", "gemma_scope", tmp_path / "out")
    with pytest.raises(HsaeError, match="unknown format 'safetensors'"):
        export_model(DATA / "hsae" / "topk", "safetensors", tmp_path / "out")


def test_export_refuses_to_overwrite_or_to_read_a_foreign_folder(tmp_path):
    export_model(DATA / "hsae" / "topk", "saelens", tmp_path / "out")
    with pytest.raises(HsaeError, match="already holds cfg.json, sae_weights.safetensors, hsae.json"):
        export_model(DATA / "hsae" / "relu", "saelens", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["architecture"] == "topk"
    export_model(DATA / "hsae" / "relu", "saelens", tmp_path / "out", overwrite=True)
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["architecture"] == "standard"
    with pytest.raises(HsaeError, match="not an hsae model folder"):
        export_model(DATA / "saelens" / "topk", "sparsify", tmp_path / "other")
    with pytest.raises(HsaeError, match="the model's own folder"):
        export_model(DATA / "hsae" / "topk", "saelens", DATA / "hsae" / "topk")
