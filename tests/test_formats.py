"""Importing SAEs saved by the real libraries (tests/data/formats, made by scripts/make_format_fixtures.py
with sae-lens 6.54.12, eai-sparsify 1.3.3, dictionary-learning 0.1.0 and numpy for Gemma Scope): the
imported hsae model gives the codes and reconstructions the library itself computed, and what hsae
cannot represent is refused with one line naming it."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hsae
from hsae.errors import HsaeError
from hsae.formats import detect_format, import_sae, import_to_folder
from hsae.models.codes import to_dense

DATA = Path(__file__).parent / "data" / "formats"
TOL = 1e-5

# (fixture folder, format, the hsae family it must become)
LIBRARY_SAES = [
    ("saelens/standard", "saelens", "relu"),
    ("saelens/standard_no_b_dec_input", "saelens", "relu"),
    ("saelens/topk", "saelens", "topk"),
    ("saelens/topk_rescaled", "saelens", "topk"),
    ("saelens/jumprelu", "saelens", "jumprelu"),
    ("saelens/batchtopk", "saelens", "batchtopk"),
    ("saelens/batchtopk_training_form", "saelens", "batchtopk"),
    ("saelens/matryoshka_batchtopk", "saelens", "matryoshka"),
    ("saelens/matryoshka_batchtopk_training_form", "saelens", "matryoshka"),
    ("saelens/legacy_topk", "saelens", "topk"),
    ("sparsify/layers.0", "sparsify", "topk"),
    ("dictionary_learning/standard", "dictionary_learning", "relu"),
    ("dictionary_learning/standard_new", "dictionary_learning", "relu"),
    ("dictionary_learning/topk", "dictionary_learning", "topk"),
    ("dictionary_learning/batchtopk", "dictionary_learning", "batchtopk"),
    ("dictionary_learning/matryoshka", "dictionary_learning", "matryoshka"),
    ("dictionary_learning/jumprelu", "dictionary_learning", "jumprelu"),
    ("gemma_scope/layer_0/width_16/average_l0_3", "gemma_scope", "jumprelu"),
]


def outputs(model, x):
    with torch.no_grad():
        codes = model.encode(x)
        return to_dense(codes), model.decode(codes)


def max_err(a, b):
    return float((a - b).abs().max())


@pytest.mark.parametrize("case,fmt,arch", LIBRARY_SAES, ids=[c for c, _, _ in LIBRARY_SAES])
def test_import_reproduces_the_library(tmp_path, case, fmt, arch):
    ref = load_file(str(DATA / case / "reference.safetensors"))
    assert detect_format(DATA / case) == fmt
    imported = import_to_folder(DATA / case, tmp_path / "m")
    assert imported.model.arch == arch
    codes, x_hat = outputs(imported.model, ref["x"])
    assert max_err(codes, ref["codes"]) <= TOL and max_err(x_hat, ref["x_hat"]) <= TOL
    # The folder is an ordinary hsae model: hsae.load gives the same numbers, config.json says where it came from.
    loaded = hsae.load(tmp_path / "m")
    assert loaded.arch == arch and max_err(outputs(loaded, ref["x"])[1], ref["x_hat"]) <= TOL
    origin = json.loads((tmp_path / "m" / "config.json").read_text())["imported"]
    assert origin["format"] == fmt and origin["source"] == str((DATA / case).resolve())
    assert all(len(digest) == 64 for digest in origin["files"].values())


def test_batchtopk_saved_as_jumprelu_keeps_its_k_and_threshold():
    model = import_sae(DATA / "saelens" / "batchtopk").model
    cfg = json.loads((DATA / "saelens" / "batchtopk" / "cfg.json").read_text())
    threshold = load_file(str(DATA / "saelens" / "batchtopk" / "sae_weights.safetensors"))["threshold"]
    assert model.config.k == cfg["metadata"]["training_architecture_details"]["k"] == 3
    assert float(model.threshold) == pytest.approx(float(threshold[0]))
    matryoshka = import_sae(DATA / "saelens" / "matryoshka_batchtopk").model
    assert matryoshka.config.fixed_bounds() == [0, 4, 8, 16]


def test_provenance_records_model_hook_and_what_was_folded():
    origin = import_sae(DATA / "saelens" / "standard_no_b_dec_input").record["imported"]
    assert origin["model_name"] == "gpt2" and origin["hook_name"] == "blocks.0.hook_resid_pre"
    assert any("apply_b_dec_to_input" in note for note in origin["notes"])
    assert origin["config"]["apply_b_dec_to_input"] is False
    rescaled = import_sae(DATA / "saelens" / "topk_rescaled")
    assert any("rescale_acts_by_decoder_norm" in n for n in rescaled.notes)
    norms = rescaled.model.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)  # folded: unit rows, same codes
    dl = import_sae(DATA / "dictionary_learning" / "topk").record["imported"]
    assert dl["architecture"] == "AutoEncoderTopK" and dl["hook_name"] == "gpt_neox.layers.0"


@pytest.mark.parametrize(
    "case,message",
    [
        ("saelens/gated", "SAELens architecture 'gated'"),
        ("saelens/layer_norm", "normalize_activations='layer_norm'"),
        ("sparsify/groupmax", "activation 'groupmax'"),
        ("dictionary_learning/gated", "GatedAutoEncoder is not supported"),
        ("dictionary_learning/ambiguous.pt", "no config.json"),
        ("sparsify", "holds several SAEs (groupmax, layers.0)"),
    ],
)
def test_what_hsae_cannot_represent_is_refused_in_one_line(case, message):
    with pytest.raises(HsaeError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        import_sae(DATA / case)
    assert "\n" not in str(err.value)


def test_untrained_batchtopk_threshold_is_refused(tmp_path):
    folder = tmp_path / "btk"
    shutil.copytree(DATA / "dictionary_learning" / "batchtopk", folder)
    state = torch.load(folder / "ae.pt", weights_only=True)
    state["threshold"] = torch.tensor(-1.0)
    torch.save(state, folder / "ae.pt")
    with pytest.raises(HsaeError, match="never set by training"):
        import_sae(folder)


class _Marker:
    """Unpickling this object would create a file: the importer must never do it."""

    path = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_dictionary_learning_never_unpickles_objects(tmp_path):
    marker = tmp_path / "unpickled"
    _Marker.path = str(marker)
    torch.save({"encoder.weight": torch.zeros(4, 2), "payload": _Marker()}, tmp_path / "ae.pt")
    with pytest.raises(HsaeError, match="loads without unpickling code"):
        import_sae(tmp_path)
    assert not marker.exists()


def test_transposed_decoder_is_named(tmp_path):
    folder = tmp_path / "sae"
    shutil.copytree(DATA / "saelens" / "topk", folder)
    state = load_file(str(folder / "sae_weights.safetensors"))
    state["W_dec"] = state["W_dec"].T.contiguous()
    save_file(state, str(folder / "sae_weights.safetensors"))
    with pytest.raises(HsaeError, match="W_dec is stored transposed"):
        import_sae(folder)


def test_a_format_named_that_the_path_does_not_hold(tmp_path):
    with pytest.raises(HsaeError, match="holds no sparsify SAE"):
        import_sae(DATA / "saelens" / "topk", fmt="sparsify")
    with pytest.raises(HsaeError, match="does not exist"):
        import_sae(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HsaeError, match="no SAE in a format hsae reads"):
        import_sae(tmp_path / "empty")


def test_import_does_not_replace_a_model(tmp_path):
    import_to_folder(DATA / "saelens" / "topk", tmp_path / "m")
    before = (tmp_path / "m" / "weights.safetensors").read_bytes()
    with pytest.raises(HsaeError, match="already holds config.json"):
        import_to_folder(DATA / "saelens" / "jumprelu", tmp_path / "m")
    assert (tmp_path / "m" / "weights.safetensors").read_bytes() == before
    assert import_to_folder(DATA / "saelens" / "jumprelu", tmp_path / "m", overwrite=True).model.arch == "jumprelu"
