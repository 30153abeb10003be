"""Every numeric family option out of its range is refused when the config is validated (before a
model is built or a step is run), with an HsaeError that names the option and its allowed range."""

import re

import pytest

from hsae.config import from_dict
from hsae.errors import HsaeError
from hsae.models import get_family

# A config each family accepts as it stands: the cases below change one option of it.
BASE = {
    "topk": {"d_in": 8, "n_latents": 32, "k": 4},
    "batchtopk": {"d_in": 8, "n_latents": 32, "k": 4},
    "matryoshka": {"d_in": 8, "n_latents": 32, "k": 4, "group_fractions": [0.25, 0.75]},
    "msae": {"d_in": 8, "n_latents": 32, "k": 4},
    "relu": {"d_in": 8, "n_latents": 32},
    "jumprelu": {"d_in": 8, "n_latents": 32, "k": 4},
    "mp": {"d_in": 8, "n_latents": 32, "k": 4},
    "h-sae": {"d_in": 8, "n_latents": 30, "k": 2, "m_low": 4, "subspace_dim": 2},
    "forest": {"d_in": 8, "n_latents": 32, "k": 4, "level_fractions": [1.0, 3.0]},
    "tree": {"d_in": 8, "n_latents": 32, "k": 4},
}

# (family, option, a value out of range, what the message must say: the option and its range)
CASES = [
    ("matryoshka", "n_sampled_prefixes", 0, r"n_sampled_prefixes must be between 1 and n_latents \(32\)"),
    ("matryoshka", "n_sampled_prefixes", -3, r"n_sampled_prefixes must be between 1 and n_latents \(32\)"),
    ("matryoshka", "pareto_power", 0.0, "pareto_power .* must be > 0"),
    ("matryoshka", "pareto_power", -0.5, "pareto_power .* must be > 0"),
    ("matryoshka", "prefix_weight", -0.25, "prefix_weight .* must be >= 0"),
    ("matryoshka", "min_prefix", 0, r"min_prefix must be between 1 and n_latents-1 \(31\)"),
    ("matryoshka", "threshold_momentum", 0.0, r"threshold_momentum must be in \(0, 1\]"),
    ("batchtopk", "threshold_momentum", 1.5, r"threshold_momentum must be in \(0, 1\]"),
    ("topk", "aux_coef", -1.0, "aux_coef must be >= 0"),
    ("topk", "aux_k", 0, "aux_k must be positive"),
    ("forest", "sparsity_coef", -0.2, "forest: sparsity_coef must be >= 0"),
    ("forest", "l0_controller_rate", -0.02, "forest: l0_controller_rate must be >= 0"),
    ("forest", "rho", -0.01, "forest: rho must be >= 0"),
    ("forest", "threshold_init", 0.0, "forest: threshold_init must be > 0"),
    ("forest", "bandwidth", -0.05, "forest: bandwidth must be > 0"),
    ("forest", "perturb_rate", 1.5, r"forest: perturb_rate must be in \[0, 1\]"),
    ("forest", "hierarchy_start", -0.1, r"forest: hierarchy_start must be in \[0, 1\]"),
    ("forest", "unassigned_fraction", 1.0, r"forest: unassigned_fraction must be in \[0, 1\)"),
    ("forest", "hierarchy_every", 0, "forest: hierarchy_every must be >= 1"),
    ("h-sae", "warmup_steps", 0, "h-sae: warmup_steps must be >= 1"),
    ("h-sae", "warmup_steps", -10, "h-sae: warmup_steps must be >= 1"),
    ("h-sae", "beta", -1.0, "h-sae: beta must be >= 0"),
    ("h-sae", "ortho_coef", -0.1, "h-sae: ortho_coef must be >= 0"),
    ("h-sae", "l1_coef", -0.001, "h-sae: l1_coef must be >= 0"),
    ("h-sae", "m_low", 0, "h-sae: m_low must be >= 1"),
    ("h-sae", "subspace_dim", 0, "h-sae: subspace_dim must be >= 1"),
    ("tree", "aux_coef_children", -0.03, "tree: aux_coef_children must be >= 0"),
    ("tree", "realloc_first", 0.0, r"tree: realloc_first .* must be in \(0, 1\]"),
    ("tree", "realloc_max", 1.5, r"tree: realloc_max .* must be in \(0, 1\]"),
    ("tree", "realloc_stop", -0.51, r"tree: realloc_stop .* must be in \(0, 1\]"),
    ("tree", "reparent_min_coverage", 1.5, r"tree: reparent_min_coverage must be in \[0, 1\]"),
    ("jumprelu", "threshold_init", 0.0, "jumprelu: threshold_init must be > 0"),
    ("jumprelu", "bandwidth", -1.0, "jumprelu: bandwidth must be > 0"),
    ("jumprelu", "l0_controller_rate", -1.0, "l0_controller_rate must be >= 0"),
    ("jumprelu", "sparsity_warmup_fraction", 2.0, r"sparsity_warmup_fraction must be in \[0, 1\]"),
    ("relu", "sparsity_coef", -5.0, "sparsity_coef must be a finite number >= 0"),
    ("relu", "decoder_init_norm", 0.0, "decoder_init_norm must be positive"),
    ("mp", "revive_coef", -0.01, "mp: revive_coef must be >= 0"),
    ("mp", "stop_threshold", 1.0, r"mp: stop_threshold must be in \[0, 1\)"),
]


def _config(arch, **changes):
    return from_dict(get_family(arch).config_class, {"arch": arch, **BASE[arch], **changes})


@pytest.mark.parametrize("arch", sorted(BASE))
def test_the_base_configs_are_valid(arch):
    _config(arch)


@pytest.mark.parametrize(
    "arch,option,value,message", CASES, ids=[f"{arch}-{option}={value}" for arch, option, value, _ in CASES]
)
def test_an_out_of_range_option_is_refused_by_name(arch, option, value, message):
    with pytest.raises(HsaeError, match=message) as err:
        _config(arch, **{option: value})
    assert option in str(err.value)
    assert re.search(rf"got {re.escape(str(value))}$", str(err.value)), "the message ends with the refused value"


@pytest.mark.parametrize(
    "arch,changes",
    [
        ("matryoshka", {"n_sampled_prefixes": 1, "pareto_power": 1e-3}),
        ("matryoshka", {"sampled_groups": True, "n_sampled_prefixes": 32}),
        ("h-sae", {"warmup_steps": 1}),
        ("tree", {"realloc_first": 1.0, "realloc_max": 1.0, "realloc_stop": 1.0, "aux_coef_children": 0.0}),
        ("forest", {"sparsity_coef": 0.0, "l0_controller_rate": 0.0, "perturb_rate": 1.0, "hierarchy_every": 1}),
    ],
)
def test_the_edges_of_each_range_are_accepted(arch, changes):
    _config(arch, **changes)


def test_n_sampled_prefixes_is_checked_with_or_without_sampled_groups():
    """At least 1 always (it used to be checked only with sampled_groups=true); at most n_latents
    when prefixes are sampled."""
    with pytest.raises(HsaeError, match="n_sampled_prefixes"):
        _config("matryoshka", sampled_groups=False, n_sampled_prefixes=0)
    with pytest.raises(HsaeError, match="n_sampled_prefixes"):
        _config("matryoshka", sampled_groups=True, n_sampled_prefixes=33)
