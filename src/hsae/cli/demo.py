"""`hsae demo`: the main job on the embedded default, end to end, into one folder."""

from __future__ import annotations

from pathlib import Path

import typer

from hsae.cli import app


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for everything the demo writes"),
    steps: int = typer.Option(2000, help="Training steps"),
) -> None:
    """Train a TopK SAE on the synthetic forest and report what it recovered (resumes if stopped)."""
    import torch

    from hsae.config import TrainConfig
    from hsae.eval.core import fvu, mean_l0
    from hsae.eval.groundtruth import recovered_fraction
    from hsae.models.topk import TopKConfig
    from hsae.sources.synthetic import SyntheticConfig, SyntheticSource
    from hsae.train import Trainer

    source = SyntheticSource(SyntheticConfig())
    model_dir = out / "topk"
    done = (model_dir / "config.json").exists()
    cfg = TopKConfig(arch="topk", d_in=source.d_in, n_latents=512, k=4)
    train_cfg = TrainConfig(steps=steps, batch_size=1024, checkpoint_every=500, dead_window_tokens=200_000)
    model = Trainer(cfg, train_cfg, source, model_dir, resume=done).run()
    held = source.sample_with_truth(16384)
    with torch.no_grad():
        codes = model.encode(held.x)
        x_hat = model.decode(codes)
    typer.echo(
        f"topk on the synthetic forest: FVU {fvu(held.x, x_hat):.4f}, L0 {mean_l0(codes):.2f}, "
        f"true features recovered {recovered_fraction(model.W_dec, source.forest.directions):.3f}; model in {model_dir}"
    )
