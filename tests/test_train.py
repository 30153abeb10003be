"""The training loop: learning, checkpoints, exact resume, and refusals of bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import hsae
from hsae.cli import main
from hsae.config import TrainConfig
from hsae.errors import HsaeError
from hsae.models.topk import TopKConfig
from hsae.sources.files import ArrayActivations
from hsae.train import Trainer, lr_at


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr_warmup_steps=10, lr_decay_fraction=0.2)
    assert lr_at(0, cfg, 1.0) == pytest.approx(0.1)
    assert lr_at(50, cfg, 1.0) == 1.0
    assert lr_at(90, cfg, 1.0) == pytest.approx(0.5)


def test_topk_learns_synthetic_forest(tmp_path, synthetic_small):
    sae_cfg = TopKConfig(arch="topk", d_in=32, n_latents=64, k=3)
    train_cfg = TrainConfig(
        steps=300, batch_size=256, lr=3e-3, log_every=50, checkpoint_every=100, dead_window_tokens=20_000
    )
    model = Trainer(sae_cfg, train_cfg, synthetic_small, tmp_path / "run", show_progress=False).run()
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [50, 100, 150, 200, 250, 300]
    assert lines[-1]["fvu"] < 0.5 * lines[0]["fvu"] and lines[-1]["fvu"] < 0.25
    loaded = hsae.load(tmp_path / "run")
    x = synthetic_small.sample(64)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), model.decode(model.encode(x)))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["steps"] == 300 and saved["data"]["kind"] == "synthetic"
    assert saved["sae"]["input_scale"] != 1.0  # inputs were normalised and the factor saved


def _train_args(out, *extra):
    return [
        "train",
        "--arch",
        "topk",
        "--data",
        "synthetic",
        "--n-latents",
        "64",
        "--k",
        "3",
        "--steps",
        "60",
        "--batch-size",
        "128",
        "--checkpoint-every",
        "20",
        "--log-every",
        "10",
        "--synthetic",
        "d_in=24",
        "--synthetic",
        "n_roots=6",
        "-q",
        "--out",
        str(out),
        *extra,
    ]


# Every family, with its defaults, plus options that keep state across steps (sampled groups draw
# from the checkpointed RNG; tree's re-parenting counts are training state; forest's hierarchy
# updates and coefficient controllers; relu/jumprelu's L0 controller; mp's adaptive stop).
RESUME_CASES = [(name, []) for name in sorted(hsae.families())] + [
    ("matryoshka", ["sampled_groups=true"]),
    # the first re-parenting event at step 18 moves children by the counts of steps 1-18, which span
    # the checkpoint at step 10
    (
        "tree",
        [
            "selection=pool",
            "reparent=true",
            "capacity_mode=row",
            "realloc_first=0.3",
            "realloc_max=0.6",
            "realloc_stop=0.9",
            "reparent_min_coverage=0.2",
        ],
    ),
    ("forest", ["activation=topk", "level_fractions=1,3"]),
    ("mp", ["adaptive_stop=true"]),
]
# Family options the tiny model needs (widths that split into its groups, k within them).
SIZE_OPTIONS = {"h-sae": ["m_low=3", "subspace_dim=2"], "forest": ["level_fractions=1,3"]}


@pytest.mark.parametrize(
    "arch,options", RESUME_CASES, ids=[f"{a}" + ("-" + "-".join(o) if o else "") for a, o in RESUME_CASES]
)
def test_resumed_run_equals_uninterrupted(tmp_path, arch, options):
    def args(out, *extra):
        a = _train_args(out, *extra)
        a[a.index("topk")] = arch
        if arch == "h-sae":
            a[a.index("64")] = "68"  # n_top 17 experts of 1 + m_low = 4 latents
        for opt in dict.fromkeys(SIZE_OPTIONS.get(arch, []) + options):
            a += ["-o", opt]
        return a

    assert main(args(tmp_path / "full")) == 0
    stop = ["--checkpoint-every", "10", "--stop-after", "10"] if "reparent=true" in options else ["--stop-after", "20"]
    assert main(args(tmp_path / "cut", *stop)) == 0  # stops right after a checkpoint
    assert main(args(tmp_path / "cut", "--resume")) == 0
    full = load_file(tmp_path / "full" / "weights.safetensors")
    cut = load_file(tmp_path / "cut" / "weights.safetensors")
    assert full.keys() == cut.keys()
    for key in full:
        assert torch.equal(full[key], cut[key]), key
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40, 50, 60]


def test_tree_reparenting_counts_are_checkpointed(tmp_path):
    """The counts Tree SAE re-parents from are in the checkpoint (they span checkpoints), not lost."""
    from safetensors import safe_open

    a = _train_args(tmp_path / "t", "--stop-after", "20")
    a[a.index("topk")] = "tree"
    a += ["-o", "reparent=true", "-o", "selection=pool"]
    assert main(a) == 0
    with safe_open(str(tmp_path / "t" / "checkpoint.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert {"family.coactivation_keys", "family.coactivation_counts", "family.fire_count"} <= keys


def test_killed_process_resumes_to_the_same_weights(tmp_path):
    """SIGKILL a real training process after a checkpoint; --resume ends where an uninterrupted run does."""
    assert main(_train_args(tmp_path / "full", "--steps", "400")) == 0
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "hsae.cli", *_train_args(cut, "--steps", "400")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (cut / "checkpoint.safetensors").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (cut / "checkpoint.safetensors").exists()
    assert main(_train_args(cut, "--steps", "400", "--resume")) == 0
    full = load_file(tmp_path / "full" / "weights.safetensors")
    resumed = load_file(cut / "weights.safetensors")
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_train_from_npy_and_safetensors_files(tmp_path, synthetic_small):
    x = synthetic_small.sample(2048)
    np.save(tmp_path / "acts.npy", x.numpy())
    save_file({"activations": x.half()}, tmp_path / "acts.safetensors")
    for name in ("acts.npy", "acts.safetensors"):
        out = tmp_path / f"run_{name}"
        rc = main(
            [
                "train",
                "--arch",
                "topk",
                "--data",
                str(tmp_path / name),
                "--n-latents",
                "64",
                "--k",
                "3",
                "--steps",
                "20",
                "--batch-size",
                "256",
                "-q",
                "--out",
                str(out),
            ]
        )
        assert rc == 0 and hsae.load(out).d_in == 32


def test_array_source_batches_are_deterministic_and_disjoint_per_rank():
    data = torch.arange(40, dtype=torch.float32).view(20, 2)
    src = ArrayActivations(data, seed=1)
    it = src.batches(4)
    first = [next(it) for _ in range(6)]  # crosses an epoch (5 steps per epoch)
    torch.testing.assert_close(next(src.batches(4, start_step=5)), first[5])
    epoch_rows = torch.cat(first[:5])[:, 0]
    assert sorted(epoch_rows.tolist()) == list(range(0, 40, 2))
    r0, r1 = next(src.batches(4, 0, 0, 2)), next(src.batches(4, 0, 1, 2))
    assert not set(r0[:, 0].tolist()) & set(r1[:, 0].tolist())


def _rc_and_err(capsys, args):
    rc = main(args)
    return rc, capsys.readouterr().err


def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, capsys):
    base = ["train", "--arch", "topk", "--n-latents", "64", "--k", "3", "--steps", "5", "-q"]
    (tmp_path / "acts.txt").write_text("1 2 3")
    rc, err = _rc_and_err(capsys, [*base, "--data", str(tmp_path / "acts.txt"), "--out", str(tmp_path / "o1")])
    assert rc == 2 and "unsupported file type" in err and ".npy" in err
    np.save(tmp_path / "bad3d.npy", np.zeros((4, 4, 4), np.float32))
    rc, err = _rc_and_err(capsys, [*base, "--data", str(tmp_path / "bad3d.npy"), "--out", str(tmp_path / "o2")])
    assert rc == 2 and "2-D" in err
    nan = np.ones((300, 8), np.float32)
    nan[123, 4] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    rc, err = _rc_and_err(capsys, [*base, "--data", str(tmp_path / "nan.npy"), "--out", str(tmp_path / "o3")])
    assert rc == 2 and "row 123" in err and "NaN" in err
    too_big_k = ["train", "--arch", "topk", "--n-latents", "64", "--k", "64", "--steps", "5", "-q"]
    rc, err = _rc_and_err(capsys, [*too_big_k, "--data", "synthetic", "--out", str(tmp_path / "o4")])
    assert rc == 2 and "--k 64" in err
    for out in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / out).exists()


def test_existing_model_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(out)) == 0
    before = (out / "weights.safetensors").read_bytes()
    rc, err = _rc_and_err(capsys, _train_args(out))
    assert rc == 2 and "already holds a model" in err and "--resume" in err
    assert (out / "weights.safetensors").read_bytes() == before


def test_resume_with_other_width_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(out, "--stop-after", "20")) == 0
    args = _train_args(out, "--resume")
    args[args.index("d_in=24")] = "d_in=30"
    rc, err = _rc_and_err(capsys, args)
    assert rc == 2 and "width 30" in err and "width 24" in err


def test_nan_loss_stops_with_message(tmp_path):
    data = torch.randn(512, 8)
    src = ArrayActivations(data)
    cfg = TopKConfig(arch="topk", d_in=8, n_latents=16, k=2)
    trainer = Trainer(cfg, TrainConfig(steps=5, batch_size=64, lr=1e30), src, tmp_path / "x", show_progress=False)
    with pytest.raises(HsaeError, match="lower --lr"):
        trainer.run()


def test_info_prints_config_and_last_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(out)) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "topk" in text and "last logged step (60)" in text and "fvu" in text
