import pytest

from hsae.config import TrainConfig, from_dict, parse_overrides
from hsae.errors import HsaeError
from hsae.models.topk import TopKConfig


def test_from_dict_coerces_strings_and_validates():
    cfg = from_dict(TopKConfig, {"arch": "topk", "d_in": "16", "n_latents": "64", "k": "4", "aux_coef": "0.1"})
    assert cfg.d_in == 16 and cfg.k == 4 and cfg.aux_coef == pytest.approx(0.1)
    assert from_dict(TrainConfig, {"dead_window_tokens": "1e6"}).dead_window_tokens == 1_000_000


def test_default_dead_window_is_64_mean_firing_intervals():
    cfg = TrainConfig()
    assert cfg.dead_window_tokens is None
    assert cfg.resolved_dead_window(3072, 32) == 64 * 3072 // 32
    assert cfg.resolved_dead_window(512, 6) == 5461
    assert cfg.resolved_dead_window(64, None) == 1_000_000  # no k: no mean interval to scale by
    assert TrainConfig(dead_window_tokens=5000).resolved_dead_window(3072, 32) == 5000
    assert from_dict(TrainConfig, {"dead_window_tokens": "none"}).dead_window_tokens is None
    with pytest.raises(HsaeError, match="dead_window_tokens must be positive"):
        from_dict(TrainConfig, {"dead_window_tokens": 0})


def test_auxk_weight_is_saelens_raw_loss_weight_except_where_measured_otherwise():
    from hsae.models import get_family

    base = {"d_in": 8, "n_latents": 32, "k": 4}
    weights = {arch: from_dict(get_family(arch).config_class, {"arch": arch, **base}).aux_coef
               for arch in ("topk", "batchtopk", "matryoshka", "tree", "msae")}  # fmt: skip
    assert weights == {"topk": 1.0, "batchtopk": 1.0, "matryoshka": 1.0, "tree": 1 / 32, "msae": 0.0}


def test_unknown_option_is_named():
    with pytest.raises(HsaeError, match="unknown option.*bogus"):
        from_dict(TopKConfig, {"arch": "topk", "d_in": 4, "n_latents": 8, "k": 2, "bogus": 1})


@pytest.mark.parametrize("k", [0, 64, 100])
def test_k_must_be_below_n_latents(k):
    with pytest.raises(HsaeError, match="--k"):
        from_dict(TopKConfig, {"arch": "topk", "d_in": 4, "n_latents": 64, "k": k})


def test_bad_types_are_reported():
    with pytest.raises(HsaeError, match="expected an integer"):
        from_dict(TrainConfig, {"steps": "many"})
    with pytest.raises(HsaeError, match="KEY=VALUE"):
        parse_overrides(["aux_coef"])
    assert parse_overrides(["aux-coef=1", "x = y"]) == {"aux_coef": "1", "x": "y"}


def test_family_options_out_of_range_are_refused():
    from hsae.config import from_dict
    from hsae.errors import HsaeError
    from hsae.models import get_family
    from hsae.sources.synthetic import SyntheticConfig

    base = {"d_in": 8, "n_latents": 32, "k": 4}
    for arch, option, message in [
        ("topk", {"aux_k": -5}, "aux_k must be positive"),
        ("batchtopk", {"threshold_momentum": -0.1}, "threshold_momentum"),
        ("relu", {"decoder_init_norm": 0}, "decoder_init_norm"),
        ("jumprelu", {"l0_controller_rate": -1}, "l0_controller_rate"),
    ]:
        with pytest.raises(HsaeError, match=message):
            from_dict(get_family(arch).config_class, {"arch": arch, **base, **option})
    with pytest.raises(HsaeError, match="noise_std"):
        from_dict(SyntheticConfig, {"noise_std": -1})


def test_a_saved_config_missing_a_field_is_refused_unless_the_field_was_added_later():
    from hsae.config import to_dict
    from hsae.models.matryoshka import MatryoshkaConfig

    saved = to_dict(MatryoshkaConfig(arch="matryoshka", d_in=8, n_latents=32, k=4, prefix_weight=0.5))
    assert from_dict(MatryoshkaConfig, saved, complete=True).prefix_weight == 0.5
    # written before prefix_weight existed: trained with the plain sum, whatever today's default
    older = {key: value for key, value in saved.items() if key != "prefix_weight"}
    assert from_dict(MatryoshkaConfig, older, complete=True).prefix_weight == 1.0
    damaged = {key: value for key, value in saved.items() if key != "group_fractions"}
    with pytest.raises(HsaeError, match="group_fractions missing"):
        from_dict(MatryoshkaConfig, damaged, complete=True)


def test_a_model_saved_before_prefix_weight_existed_loads_as_trained():
    from pathlib import Path

    from hsae.models import load

    model = load(Path(__file__).parent / "data" / "formats" / "hsae" / "matryoshka")
    assert model.config.prefix_weight == 1.0
