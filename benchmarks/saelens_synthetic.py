"""hsae's families against SAELens's on hierarchical data written by SAELens (`sae_lens.synthetic`).

Needs sae-lens, which is never a dependency of hsae: run it in a virtual environment of its own,

    python3 -m venv /tmp/saelens-venv
    /tmp/saelens-venv/bin/pip install torch==2.13.0
    /tmp/saelens-venv/bin/pip install 'sae-lens==6.54.*' --constraint <(echo torch==2.13.0)
    /tmp/saelens-venv/bin/pip install -e . --no-deps
    /tmp/saelens-venv/bin/python benchmarks/saelens_synthetic.py [--structures all|NAME,...]
        [--runs all|NAME,...] [--samples 1000000] [--width 512] [--k 6] [--lr 3e-4] [--json FILE]

Data: for each structure, a `SyntheticModel` of 512 features in d=128 (random unit directions, a
bias of norm 1, Zipf firing probabilities from 0.3 down to 0.01, magnitude 1) with a hierarchy from
`generate_hierarchy` (a child fires only with its parent; mutually exclusive sibling sets keep at
most one child). `--samples` training rows are drawn once and both libraries read the same rows in
the same order (hsae.sources.files.ArrayActivations' batches, 1024 rows each); held-out rows for
scoring and a separate sample for post-hoc forests are drawn with other seeds.

Runs: SAELens's TopK, BatchTopK and Matryoshka BatchTopK through its own `SAETrainer` (its
`train_toy_sae` settings: Adam, constant lr, no warm-up, grad-norm clip 1, dead window 1000
steps), and hsae's families through `hsae.train.Trainer` (hsae's defaults otherwise). Every run is
at `--width` latents and L0 `--k` (each family's k is set so that its L0 is --k: see FAMILY_K),
once at the matched `--lr` and once at its library's default learning rate (`@default`).

Scores on the held-out rows: SAELens's own metric functions (sae_lens.synthetic.evals and
sae_lens.evals: MCC, uniqueness, classification F1, explained variance, dead latents, L0) for every
run, and hsae.eval.hierarchy's absorption and edge precision / recall / F1 against the true forest,
on the model's own tree (h-sae, forest, tree) or the post-hoc forest (hsae.interpret.forest) for the
others, SAELens's included.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.evals import ExplainedVarianceCalculator
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.synthetic import (
    ActivationGenerator,
    ClassificationMetricsCalculator,
    HierarchyConfig,
    LowRankCorrelationConfig,
    SyntheticModel,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
    feature_uniqueness,
    mean_correlation_coefficient,
)
from sae_lens.synthetic.hierarchy import HierarchyNode
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file, save_file

from hsae.config import TrainConfig, from_dict, parse_overrides
from hsae.eval.hierarchy import absorption, edge_scores, latent_of_features
from hsae.interpret.forest import ForestOptions, extract_forest, has_builtin_hierarchy
from hsae.models import families, get_family, load
from hsae.models.codes import SparseCodes, to_dense
from hsae.models.registry import register
from hsae.sources.files import ArrayActivations
from hsae.train import Trainer

BATCH = 1024
# Bumped whenever the data a structure draws changes (cached samples of older versions are not read).
DATA_VERSION = 2
SAELENS_DEFAULT_LR = 3e-4  # train_toy_sae's


# ----- the data ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Structure:
    """A hierarchy for `generate_hierarchy`. `levels` counts feature levels (2: roots and children;
    SAELens's max_depth is levels - 1)."""

    roots: int
    branching: int
    levels: int
    exclusive: float  # fraction of sibling sets that are mutually exclusive
    correlated: bool = False  # low-rank correlation between features (roots included)
    about: str = ""


STRUCTURES = {
    "d2-exclusive": Structure(64, 4, 2, 1.0, about="64 roots x 4 children, every sibling set exclusive"),
    "d2-free": Structure(64, 4, 2, 0.0, about="64 roots x 4 children, siblings fire independently"),
    "d3-mixed": Structure(24, 3, 3, 0.5, about="24 roots x 3 x 3 (issue 19's), half the sibling sets exclusive"),
    "d3-correlated": Structure(
        24, 3, 3, 0.5, correlated=True, about="as d3-mixed, with low-rank correlated features (rank 32, scale 0.1)"
    ),
}


# Given its parent, each child fires with probability CHILD_MASS / branching (so a parent has about
# CHILD_MASS active children, or one with probability about CHILD_MASS where siblings are exclusive).
CHILD_MASS = 0.8


def synthetic_model(s: Structure, seed: int, n_features: int = 512, d: int = 128) -> SyntheticModel:
    """SAELens's SyntheticModel for `s`. Roots and the features outside every tree fire at SAELens's
    Zipf rates (0.3 down to 0.01, by index: generate_hierarchy gives roots the first indices); a
    child's rate is CHILD_MASS / branching times its parent's, realised through SAELens's own
    hierarchy probability compensation. (SAELens's plain Zipf rates give a child the next index's
    rate times its ancestors': in d3-mixed 216 of 216 grandchildren and 56 of 72 children then fire
    on under 0.1% of rows, and with compensation 132 children are clamped at always firing with
    their parent, so those edges cannot be seen in the data.)"""
    zipf = ZipfianFiringProbabilityConfig(exponent=1.0, max_prob=0.3, min_prob=0.01)
    cfg = SyntheticModelConfig(
        num_features=n_features,
        hidden_dim=d,
        firing_probability=zipf,
        hierarchy=HierarchyConfig(
            total_root_nodes=s.roots,
            branching_factor=s.branching,
            max_depth=s.levels - 1,
            mutually_exclusive_portion=s.exclusive,
        ),
        correlation=LowRankCorrelationConfig(rank=32, correlation_scale=0.1, seed=seed) if s.correlated else None,
        seed=seed,
    )
    model = SyntheticModel(cfg)
    assert model.hierarchy is not None
    rates = zipf.generate(n_features)
    parents = true_parents(model)
    for f in range(n_features):  # parents come before their children (breadth-first indices)
        if parents[f] >= 0:
            rates[f] = rates[parents[f]] * CHILD_MASS / s.branching
    raw = (rates * model.hierarchy.compute_probability_correction_factors(rates)).clamp(max=1.0)
    generator = ActivationGenerator(
        num_features=n_features,
        firing_probabilities=raw,
        modify_activations=model.hierarchy.modifier,
        correlation_matrix=model.correlation_matrix,
    )
    return SyntheticModel(
        cfg,
        feature_dict=model.feature_dict,
        activation_generator=generator,
        hierarchy=model.hierarchy,
        correlation_matrix=model.correlation_matrix,
    )


def true_parents(model: SyntheticModel) -> torch.Tensor:
    """Parent feature of every feature (-1: a root or outside every tree)."""
    parents = torch.full((model.cfg.num_features,), -1, dtype=torch.long)
    assert model.hierarchy is not None

    def walk(node: HierarchyNode, parent: int | None) -> None:
        if node.feature_index is not None and parent is not None:
            parents[node.feature_index] = parent
        for child in node.children:
            walk(child, node.feature_index if node.feature_index is not None else parent)

    for root in model.hierarchy.roots:
        walk(root, None)
    return parents


def draw(
    model: SyntheticModel, n: int, seed: int, cache: str | None = None, name: str = "", features: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n rows of hidden activations and (if `features`) their feature activations; SAELens samples
    from torch's global RNG. With `cache`, the rows are kept in that folder and read back next time."""
    path = (
        Path(cache) / f"{name}-v{DATA_VERSION}-{model.cfg.seed}-{seed}-{n}-{int(features)}.safetensors"
        if cache
        else None
    )
    if path is not None and path.is_file():
        saved = load_file(str(path))
        return saved["x"], saved.get("f")
    torch.manual_seed(seed)
    xs, fs = [], []
    for lo in range(0, n, 65536):
        x, f = model.sample_with_features(min(65536, n - lo))
        xs.append(x)
        if features:
            fs.append(f)
    x = torch.cat(xs)
    f_all = torch.cat(fs) if features else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"x": x} if f_all is None else {"x": x, "f": f_all}, str(path))
    return x, f_all


# ----- one trained model, seen the same way whichever library trained it ------------------------
@dataclass
class Trained:
    name: str
    W_dec: torch.Tensor  # (n_latents, d): directions, for MCC and the latents of true features
    encode: Callable[[torch.Tensor], torch.Tensor]  # raw rows -> dense codes (n, n_latents)
    decode: Callable[[torch.Tensor], torch.Tensor]  # dense codes -> raw reconstruction
    parents: torch.Tensor | None  # the built-in tree, or None (extract one post hoc)
    lr: float
    seconds: float

    @property
    def n_latents(self) -> int:
        return self.W_dec.shape[0]


# ----- hsae ---------------------------------------------------------------------------------------
# run name -> (family, options): each family's defaults, but for the width h-sae's layout needs
# (512 = 128 parents x (1 + 3 children)); every run gets --k (docs/hierarchy.md says what each k is).
HSAE_RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "topk": ("topk", {}),
    "batchtopk": ("batchtopk", {}),
    "matryoshka": ("matryoshka", {}),
    "mp": ("mp", {}),
    "h-sae": ("h-sae", {"m_low": 3}),
    "forest": ("forest", {}),
    "tree": ("tree", {}),
}


def with_encoder_scale(arch: str, scale: float) -> str:
    """A family registered for this measurement: `arch` with its encoder started at `scale` times
    the decoder's transpose (SAELens starts it at 0.1 x 0.1, eai-sparsify at about 0.58)."""
    name = f"{arch}-encoder-x{scale:g}"
    if name not in families():
        base = get_family(arch)

        def reset_parameters(self: Any) -> None:
            base.reset_parameters(self)
            with torch.no_grad():
                self.W_enc.mul_(scale)

        register(name)(type(name, (base,), {"reset_parameters": reset_parameters}))
    return name


def train_hsae(
    name: str,
    x: torch.Tensor,
    width: int,
    k: int,
    lr: float | None,
    seed: int,
    out: Path,
    options: dict[str, str] | None = None,
    train_options: dict[str, str] | None = None,
    encoder_scale: float = 1.0,
) -> Trained:
    """Train into `out` (or load what an earlier invocation trained there). `options` and
    `train_options` (KEY=VALUE strings, as `hsae train -o`) override the family's settings and the
    TrainConfig; `encoder_scale` != 1 starts the encoder at that multiple of its usual init."""
    arch, settings = HSAE_RUNS[name]
    if encoder_scale != 1.0:
        arch = with_encoder_scale(arch, encoder_scale)
    family = get_family(arch)
    sae_cfg = from_dict(
        family.config_class,
        {"arch": arch, "d_in": x.shape[1], "n_latents": width, "k": k, **settings, **(options or {})},
    )
    steps = x.shape[0] // BATCH
    train_cfg = from_dict(
        TrainConfig,
        {"steps": steps, "batch_size": BATCH, "lr": lr, "seed": seed, "checkpoint_every": steps, "log_every": steps,
         **(train_options or {})},
    )  # fmt: skip
    done = out / "seconds.json"
    if not done.is_file():
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        Trainer(sae_cfg, train_cfg, ArrayActivations(x, seed=seed), out, show_progress=False).run()
        done.write_text(json.dumps(time.perf_counter() - t0))
    model = load(out)

    @torch.no_grad()
    def encode(rows: torch.Tensor) -> torch.Tensor:
        return to_dense(model.encode(rows))

    @torch.no_grad()
    def decode(codes: torch.Tensor) -> torch.Tensor:
        return model.decode(codes)

    return Trained(
        name=name,
        W_dec=model.W_dec.detach().clone(),
        encode=encode,
        decode=decode,
        parents=model.hierarchy() if has_builtin_hierarchy(model) else None,
        lr=train_cfg.resolved_lr(width),
        seconds=json.loads(done.read_text()),
    )


# ----- SAELens ------------------------------------------------------------------------------------
def _matryoshka_widths(width: int) -> list[int]:
    """The prefix widths of hsae's default Matryoshka groups (1/16, 1/16, 1/8, 1/4, 1/2)."""
    from hsae.models.partition import bounds_from_fractions

    return bounds_from_fractions(width, [1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2])[1:]


def train_saelens(
    name: str,
    x: torch.Tensor,
    width: int,
    k: int,
    lr: float,
    seed: int,
    out: Path,
    options: dict[str, Any] | None = None,
    dead_window: int = 1000,
) -> Trained:
    """Train into `out` (or load what an earlier invocation trained there). `options` override
    fields of the SAE's training config (e.g. aux_loss_coefficient); `dead_window` is the
    trainer's, in steps."""
    d = x.shape[1]
    torch.manual_seed(seed)
    sae: Any
    extra = dict(options or {})
    if name == "saelens-topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=width, k=k, **extra))
    elif name == "saelens-batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d, d_sae=width, k=k, **extra))
    elif name == "saelens-matryoshka":
        widths = _matryoshka_widths(width)
        sae = MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(d_in=d, d_sae=width, k=k, matryoshka_widths=widths, **extra)
        )
    else:
        raise ValueError(name)
    steps = x.shape[0] // BATCH
    cfg = SAETrainerConfig(
        total_training_samples=steps * BATCH,
        train_batch_size_samples=BATCH,
        lr=lr,
        lr_end=lr,
        lr_scheduler_name="constant",
        adam_beta1=0.9,
        adam_beta2=0.999,
        dead_feature_window=dead_window,
        feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
        n_batches_for_norm_estimate=1000,
    )
    weights, done = out / "sae.safetensors", out / "seconds.json"
    if done.is_file():
        sae.load_state_dict(load_file(str(weights)))
    else:
        batches: Iterator[torch.Tensor] = ArrayActivations(x, seed=seed).batches(BATCH)
        t0 = time.perf_counter()
        SAETrainer(cfg=cfg, sae=sae, data_provider=batches, save_checkpoint_fn=lambda path: None).fit()
        out.mkdir(parents=True, exist_ok=True)
        save_file({key: v.contiguous() for key, v in sae.state_dict().items()}, str(weights))
        done.write_text(json.dumps(time.perf_counter() - t0))
    seconds = json.loads(done.read_text())
    sae.eval()
    threshold = getattr(sae, "topk_threshold", None)

    @torch.no_grad()
    def encode(rows: torch.Tensor) -> torch.Tensor:
        if threshold is None:
            return sae.encode(rows)
        # BatchTopK at inference: the learned threshold, as the JumpReLU SAE SAELens saves for it
        _, pre = sae.encode_with_hidden_pre(rows)
        return pre * (pre > threshold.to(pre.dtype))

    @torch.no_grad()
    def decode(codes: torch.Tensor) -> torch.Tensor:
        return sae.decode(codes)

    return Trained(name, sae.W_dec.detach().clone(), encode, decode, None, lr, seconds)


# ----- scores -------------------------------------------------------------------------------------
class _AsSAE:
    """What hsae.interpret.forest needs of a model: encode (codes), W_dec and n_latents."""

    def __init__(self, t: Trained):
        self.t = t
        self.W_dec = t.W_dec
        self.n_latents = t.n_latents

    def encode(self, x: torch.Tensor) -> SparseCodes:
        return SparseCodes.from_dense(self.t.encode(x))


@dataclass
class Held:
    x: torch.Tensor
    f: torch.Tensor
    forest_x: torch.Tensor  # a separate sample for post-hoc forests
    gt: torch.Tensor  # (n_features, d) true directions
    parents: torch.Tensor


# What post-hoc extraction did before issue 16 (coverage alone: no lift test, best coverage), reported
# beside the current default.
COVERAGE_ONLY = ForestOptions(min_coverage=0.6, min_cosine=-0.25, min_fires=10, min_lift=0.0, rank="coverage")


def criteria_scores(t: Trained, held: Held, lat: torch.Tensor) -> dict[str, list[float]]:
    """Edge precision / recall / F1 of the post-hoc forest under each of benchmarks/forest_criterion.py's
    criteria (co-occurrence counted once)."""
    from forest_criterion import CRITERIA
    from hsae.interpret.forest import coactivation, forest_from_coactivation

    counts, co = coactivation(_AsSAE(t), held.forest_x)
    out = {}
    for name, opt in CRITERIA.items():
        found = forest_from_coactivation(counts, co, held.forest_x.shape[0], t.W_dec.float(), opt)
        es = edge_scores(found.parents, held.parents, lat)
        out[name] = [es.precision, es.recall, es.f1]
    return out


def score(t: Trained, held: Held, criteria: bool = False) -> dict[str, Any]:
    ev = ExplainedVarianceCalculator()
    cls = ClassificationMetricsCalculator(t.W_dec, held.gt)
    nnz, fired = 0.0, torch.zeros(t.n_latents, dtype=torch.bool)
    parts = []
    for lo in range(0, held.x.shape[0], 8192):
        x, f = held.x[lo : lo + 8192], held.f[lo : lo + 8192]
        z = t.encode(x)
        ev.add_batch(t.decode(z), x)
        cls.add_batch(z, f)
        active = z != 0
        nnz += float(active.sum())
        fired |= active.any(0)
        parts.append(SparseCodes.from_dense(z))
    codes = SparseCodes.cat(parts)
    c = cls.compute()
    lat = latent_of_features(t.W_dec, held.gt)
    if t.parents is None:
        parents = extract_forest(_AsSAE(t), held.forest_x).parents
        before = edge_scores(extract_forest(_AsSAE(t), held.forest_x, COVERAGE_ONLY).parents, held.parents, lat)
    else:
        parents = t.parents
        before = edge_scores(parents, held.parents, lat)
    es = edge_scores(parents, held.parents, lat)
    ab = absorption(codes, held.f, held.parents, lat)
    extra = {"criteria": criteria_scores(t, held, lat)} if criteria and t.parents is None else {}
    return {
        **extra,
        "run": t.name,
        "lr": t.lr,
        "mcc": mean_correlation_coefficient(t.W_dec, held.gt),
        "uniqueness": feature_uniqueness(t.W_dec, held.gt),
        "cls_f1": c.f1_score,
        "ev": ev.compute(),
        "dead": int((~fired).sum()),
        "l0": nnz / held.x.shape[0],
        "absorption": ab.rate,
        "edge_p": es.precision,
        "edge_r": es.recall,
        "edge_f1": es.f1,
        "edge_p_coverage_only": before.precision,
        "edge_r_coverage_only": before.recall,
        "edge_f1_coverage_only": before.f1,
        "tree": "built-in" if t.parents is not None else "post-hoc",
        "seconds": t.seconds,
    }


COLUMNS = [
    ("run", "<22", "{}"),
    ("lr", ">9", "{:.2e}"),
    ("mcc", ">7", "{:.3f}"),
    ("uniqueness", ">7", "{:.3f}"),
    ("cls_f1", ">7", "{:.3f}"),
    ("ev", ">7", "{:.3f}"),
    ("dead", ">5", "{}"),
    ("l0", ">6", "{:.2f}"),
    ("absorption", ">7", "{:.3f}"),
    ("edge_p", ">7", "{:.3f}"),
    ("edge_r", ">7", "{:.3f}"),
    ("edge_f1", ">7", "{:.3f}"),
    ("tree", ">9", "{}"),
    ("seconds", ">8", "{:.0f}"),
]
HEADERS = {"uniqueness": "uniq", "cls_f1": "clsF1", "absorption": "absorb", "edge_f1": "edgeF1"}


def format_row(r: dict[str, Any]) -> str:
    cells = []
    for key, spec, fmt in COLUMNS:
        v = r[key]
        text = "nan" if isinstance(v, float) and math.isnan(v) else fmt.format(v)
        cells.append(f"{text:{spec}}")
    return " ".join(cells)


def header() -> str:
    return " ".join(f"{HEADERS.get(key, key):{spec}}" for key, spec, _ in COLUMNS)


ALL_RUNS = [
    "saelens-topk",
    "saelens-batchtopk",
    "saelens-matryoshka",
    "topk",
    "batchtopk",
    "matryoshka",
    "mp",
    "h-sae",
    "forest",
    "tree",
]


def run_dir(root: Path | None, structure: str, name: str, lr: float, args: argparse.Namespace, extra: Any) -> Path:
    """Where a run's model is kept: everything that decides it is in the name (a digest of the options)."""
    if root is None:
        return Path(tempfile.mkdtemp(prefix="saelens-synthetic-"))
    digest = hashlib.sha1(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8]
    key = f"{name}{args.tag}-lr{lr:g}-seed{args.train_seed}-n{args.samples}-w{args.width}-k{args.k}-{digest}"
    return root / f"{structure}-v{DATA_VERSION}" / key.replace(" ", "_")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--structures", default="all", help=f"all or some of {', '.join(STRUCTURES)}")
    p.add_argument("--runs", default="all", help=f"all or some of {', '.join(ALL_RUNS)}")
    p.add_argument("--samples", type=int, default=1_000_000, help="training rows (each run reads them once)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--k", type=int, default=6, help="L0 of every run")
    p.add_argument(
        "--lr", type=float, default=None, help="the matched learning rate (default: hsae's default at --width)"
    )
    p.add_argument("--no-default-lr", action="store_true", help="skip the runs at each library's default lr")
    p.add_argument("--eval-samples", type=int, default=65536)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--train-seed", type=int, default=1)
    p.add_argument("--json", default=None, help="append every result as a JSON line to this file")
    p.add_argument("--cache", type=Path, default=None, help="a folder keeping the drawn samples between invocations")
    p.add_argument("--models", type=Path, default=None, help="a folder keeping trained models (reused when present)")
    p.add_argument("-o", "--hsae-option", action="append", default=[], metavar="KEY=VALUE", help="hsae family option")
    p.add_argument(
        "-t", "--hsae-train", action="append", default=[], metavar="KEY=VALUE", help="hsae TrainConfig option"
    )
    p.add_argument(
        "-s", "--saelens-option", action="append", default=[], metavar="KEY=JSON", help="SAELens SAE config field"
    )
    p.add_argument("--saelens-dead-window", type=int, default=1000, help="SAELens's dead window, in steps")
    p.add_argument("--encoder-scale", type=float, default=1.0, help="hsae runs: encoder init x this (ablation)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument(
        "--criteria", action="store_true", help="also score post-hoc forests under benchmarks/forest_criterion.py's"
    )
    p.add_argument("--tag", default="", help="appended to every run's name")
    args = p.parse_args()
    structures = list(STRUCTURES) if args.structures == "all" else args.structures.split(",")
    runs = ALL_RUNS if args.runs == "all" else args.runs.split(",")
    torch.set_num_threads(args.threads)
    hsae_options, hsae_train = parse_overrides(args.hsae_option), parse_overrides(args.hsae_train)
    saelens_options = {key: json.loads(value) for key, value in parse_overrides(args.saelens_option).items()}
    matched_lr = TrainConfig().resolved_lr(args.width) if args.lr is None else args.lr
    for sname in structures:
        s = STRUCTURES[sname]
        model = synthetic_model(s, args.data_seed)
        cache = str(args.cache) if args.cache else None
        x, _ = draw(model, args.samples, 10_000 + args.data_seed, cache, sname, features=False)
        hx, hf = draw(model, args.eval_samples, 20_000 + args.data_seed, cache, sname)
        fx, _ = draw(model, args.eval_samples, 30_000 + args.data_seed, cache, sname, features=False)
        assert hf is not None
        held = Held(hx, hf, fx, model.feature_dict.feature_vectors.detach(), true_parents(model))
        true_l0 = float((hf != 0).sum(1).float().mean())
        print(
            f"\n## {sname}: {s.about}\n{model.cfg.num_features} features in d={model.cfg.hidden_dim}, "
            f"{int((held.parents >= 0).sum())} true edges, true L0 {true_l0:.2f}; {args.samples} training rows "
            f"x 1 pass, batch {BATCH}, width {args.width}, k {args.k}, matched lr {matched_lr:.3g}, data seed "
            f"{args.data_seed}, train seed {args.train_seed}",
            flush=True,
        )
        print(header(), flush=True)
        for name in runs:
            saelens = name.startswith("saelens-")
            default_lr = SAELENS_DEFAULT_LR if saelens else TrainConfig().resolved_lr(args.width)
            lrs = [matched_lr] + ([default_lr] if default_lr != matched_lr and not args.no_default_lr else [])
            for lr in lrs:
                if saelens:
                    extra: Any = [saelens_options, args.saelens_dead_window]
                    out = run_dir(args.models, sname, name, lr, args, extra)
                    t = train_saelens(
                        name, x, args.width, args.k, lr, args.train_seed, out, saelens_options, args.saelens_dead_window
                    )
                else:
                    extra = [hsae_options, hsae_train, args.encoder_scale]
                    out = run_dir(args.models, sname, name, lr, args, extra)
                    t = train_hsae(
                        name, x, args.width, args.k, lr, args.train_seed, out, hsae_options, hsae_train,
                        args.encoder_scale,
                    )  # fmt: skip
                t.name += ("@default" if lr != matched_lr else "") + args.tag
                r = score(t, held, args.criteria)
                r["structure"] = sname
                print(format_row(r), flush=True)
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.write(json.dumps(r) + "\n")
                if args.models is None:
                    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
