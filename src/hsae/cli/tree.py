"""`hsae tree DIR --data ...`: print a model's feature forest and its tree statistics.

Families with a built-in tree (h-sae, forest, tree) report it; for the others (flat families,
Matryoshka, MP-SAE) the forest is extracted post hoc from co-activation on the data and decoder
cosines (hsae.interpret.forest). `--save` stores the extracted parents in the model folder, so that
`hsae.load(DIR).hierarchy()` returns them. With `--data synthetic` the scores against the true
forest are printed too.
"""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from hsae.cli import app
from hsae.errors import HsaeError
from hsae.interpret.forest import ForestOptions

_DEFAULTS = ForestOptions()


def _print_forest(parents: torch.Tensor, fire_counts: torch.Tensor | None, max_trees: int, max_children: int) -> None:
    from hsae.eval.hierarchy import depths

    n = parents.numel()
    kids: dict[int, list[int]] = {}
    for j, p in enumerate(parents.tolist()):
        if p >= 0:
            kids.setdefault(p, []).append(j)
    roots = [i for i in range(n) if parents[i] < 0 and i in kids]
    if fire_counts is not None:
        roots.sort(key=lambda i: -int(fire_counts[i]))
    _ = depths(parents)  # refuses cycles before walking

    def label(i: int) -> str:
        return f"{i}" + (f" ({int(fire_counts[i])} fires)" if fire_counts is not None else "")

    def walk(i: int, prefix: str) -> None:
        children = kids.get(i, [])
        shown = children[:max_children]
        for pos, c in enumerate(shown):
            last = pos == len(shown) - 1 and len(children) <= max_children
            typer.echo(f"{prefix}{'└─ ' if last else '├─ '}{label(c)}")
            walk(c, prefix + ("   " if last else "│  "))
        if len(children) > max_children:
            typer.echo(f"{prefix}└─ ... {len(children) - max_children} more")

    for r in roots[:max_trees]:
        typer.echo(label(r))
        walk(r, "")
    if len(roots) > max_trees:
        typer.echo(f"... {len(roots) - max_trees} more trees")


@app.command()
def tree(
    directory: Path = typer.Argument(..., help="A model folder written by `hsae train`"),
    data: str | None = typer.Option(
        None,
        help="'synthetic' or an activation file/store: the sample used for "
        "post-hoc extraction and statistics (needed for flat families)",
    ),
    n_samples: int = typer.Option(16384, "--n-samples", help="Activation rows to read from --data"),
    min_coverage: float = typer.Option(
        _DEFAULTS.min_coverage, "--min-coverage", help="Least P(parent on | child on) for an edge"
    ),
    min_lift: float = typer.Option(
        _DEFAULTS.min_lift,
        "--min-lift",
        help="Least P(parent on | child on) / P(parent on): how much more often the parent fires with the child "
        "than at its base rate (0 = no test against the base rate)",
    ),
    max_parent_density: float = typer.Option(
        _DEFAULTS.max_parent_density,
        "--max-parent-density",
        help="A parent may fire on at most this fraction of the sample's rows (1 = no cap)",
    ),
    rank: str = typer.Option(
        _DEFAULTS.rank, "--rank", help="Which qualifying parent a child takes: the one of best coverage or of best lift"
    ),
    min_cosine: float = typer.Option(
        _DEFAULTS.min_cosine, "--min-cosine", help="Least decoder cosine between parent and child"
    ),
    min_fires: int = typer.Option(
        _DEFAULTS.min_fires, "--min-fires", help="A child must fire at least this often in the sample"
    ),
    extract: bool = typer.Option(False, "--extract", help="Extract post hoc even if the family has a built-in tree"),
    save: bool = typer.Option(False, "--save", help="Store the extracted parents in the model folder"),
    max_trees: int = typer.Option(20, "--max-trees", help="Trees to print (largest roots first); 0 = statistics only"),
    max_children: int = typer.Option(8, "--max-children", help="Children shown per node"),
    seed: int = typer.Option(0, help="Seed of the data sample"),
    synthetic: list[str] = typer.Option([], "--synthetic", help="KEY=VALUE for --data synthetic (as in hsae train)"),
) -> None:
    """Print the feature forest of a model and its tree statistics (roots, depth, branching, orphans)."""
    from hsae.config import parse_overrides
    from hsae.eval.hierarchy import hierarchy_report, parent_coverage, tree_stats
    from hsae.interpret.forest import extract_forest, has_builtin_hierarchy
    from hsae.models import load
    from hsae.models.base import read_config
    from hsae.models.codes import encode_rows
    from hsae.sources import open_source

    options = ForestOptions(
        min_coverage=min_coverage,
        min_cosine=min_cosine,
        min_fires=min_fires,
        min_lift=min_lift,
        max_parent_density=max_parent_density,
        rank=rank,
    )
    options.validate()
    sae = load(directory)
    builtin = has_builtin_hierarchy(sae)
    if save and builtin:
        raise HsaeError(f"the {sae.arch} family has a built-in tree and cannot store another; drop --save")
    x = source = None
    if data is not None:
        if n_samples <= 0:
            raise HsaeError("--n-samples must be positive")
        source = open_source(data, seed=seed, synthetic=parse_overrides(synthetic))
        if source.d_in != sae.d_in:
            raise HsaeError(f"--data has width {source.d_in} but the model was trained on width {sae.d_in}")
    elif extract or save:
        raise HsaeError("--extract and --save need --data (the activations to extract the forest from)")
    elif not builtin and not bool(sae.hierarchy().ge(0).any()):
        raise HsaeError(f"the {sae.arch} family has no built-in tree and none is saved: pass --data to extract one")

    truth = None
    if source is not None:
        if hasattr(source, "sample_with_truth"):
            truth = source.sample_with_truth(n_samples)
            x = truth.x
        else:
            x = source.sample(n_samples)
    fire_counts = None
    codes = encode_rows(sae, x) if x is not None else None
    if x is not None and (extract or not builtin):
        found = extract_forest(sae, x, options, codes=codes)
        parents, fire_counts = found.parents, found.fire_counts
        how = f"extracted post hoc ({options.describe()}) on {x.shape[0]} rows"
    else:
        parents = sae.hierarchy()
        how = "built in" if builtin else "saved in the model folder"
    stats = tree_stats(parents)
    typer.echo(f"{sae.arch} SAE, {sae.n_latents} latents; forest {how}")
    if max_trees > 0:
        _print_forest(parents, fire_counts, max_trees, max_children)
    typer.echo(
        "statistics: "
        + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.as_dict().items())
    )
    if x is not None and codes is not None:
        typer.echo(f"parent coverage P(parent on | child on): {parent_coverage(parents, codes):.3f}")
        forest = getattr(source, "forest", None)
        if truth is not None and forest is not None:
            rep = hierarchy_report(
                sae, x, truth.true_acts, forest.directions, forest.parents, parents=parents, codes=codes
            )
            typer.echo(
                f"against the true forest: absorption {rep['absorption']:.3f}, edge precision "
                f"{rep['edge_precision']:.3f}, recall {rep['edge_recall']:.3f}, F1 {rep['edge_f1']:.3f}"
            )
    if save:
        sae.set_hierarchy(parents)
        record = read_config(directory)
        sae.save(directory, record={k: v for k, v in record.items() if k != "sae"})
        typer.echo(f"saved the parents in {directory}")
