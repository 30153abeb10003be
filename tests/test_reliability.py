"""Reliability (issue 17): each class of hostile input or failure ends in one line naming the problem
and the fix (exit 2), resume refuses what would change the run, and nothing is left behind.

The ten classes of the issue, one section each; `make_store` builds a store by hand (no model),
`cli` runs a command and returns its exit code and stderr lines.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hsae
import hsae.atomic as atomic
from hsae.atomic import write_json, write_safetensors
from hsae.cli import main
from hsae.config import TrainConfig, from_dict
from hsae.errors import HsaeError
from hsae.models.topk import TopKConfig
from hsae.sources.synthetic import SyntheticConfig, SyntheticSource
from hsae.store import FORMAT, FORMAT_VERSION, MANIFEST, ActivationStore, activation_key, sha256_of, shard_name
from hsae.train import Trainer

HOOK = "layer.0"


def make_store(folder: Path, rows: int = 300, d_in: int = 8, shard_rows: int = 100, seed: int = 0) -> Path:
    """A complete store written by hand in hsae's format (five rows per document)."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards = []
    for index, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        tensors = {
            activation_key(HOOK): torch.randn(n, d_in, generator=gen),
            "token_ids": torch.arange(n),
            "doc_ids": torch.arange(start, start + n) // 5,
            "positions": torch.arange(n) % 5,
        }
        path = folder / shard_name(index)
        save_file(tensors, str(path), metadata={"format": FORMAT})
        shards.append({"file": path.name, "rows": n, "sha256": sha256_of(path)})
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "status": "complete",
        "model": {"name": "hand-made"},
        "hooks": [{"name": HOOK, "transformer_lens": None, "d_in": d_in}],
        "dtype": "float32",
        "corpus": {"kind": "test"},
        "harvest": {},
        "shard_rows": shard_rows,
        "target_rows": rows,
        "d_in": d_in,
        "total_rows": rows,
        "shards": shards,
        "resume": None,
        "created": "2026-01-01T00:00:00",
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def cli(capsys, args: list[str]) -> tuple[int, list[str]]:
    """Run `hsae ARGS`; the exit code and the non-empty lines it wrote to stderr (but warnings)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    lines = capsys.readouterr().err.splitlines()
    return code, [line for line in lines if line.strip() and not line.startswith("warning: ")]


def one_error(capsys, args, *fragments: str) -> str:
    """`hsae ARGS` must fail with exit 2 and exactly one line, `error: ...`, holding every fragment
    (not the line of an unexpected exception)."""
    code, lines = cli(capsys, args)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and not lines[0].startswith("error: unexpected"), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def train_args(out: Path, *extra: str, steps: int = 60) -> list[str]:
    return [
        "train", "--arch", "topk", "--data", "synthetic", "--synthetic", "d_in=24", "--synthetic", "n_roots=6",
        "--n-latents", "64", "--k", "3", "--steps", str(steps), "--batch-size", "128", "--checkpoint-every", "20",
        "--log-every", "10", "-q", "--out", str(out), *extra,
    ]  # fmt: skip


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def steps_of(folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Trained once: a run of 60 steps stopped (as if killed) right after its checkpoint at step 20,
    and a finished run of 20 steps; tests take copies."""
    root = tmp_path_factory.mktemp("trained")
    assert main(train_args(root / "stopped", "--stop-after", "20")) == 0
    assert main(train_args(root / "model", steps=20)) == 0
    return root


@pytest.fixture
def stopped_run(trained, tmp_path):
    return Path(shutil.copytree(trained / "stopped", tmp_path / "run"))


@pytest.fixture
def saved_model(trained, tmp_path):
    return Path(shutil.copytree(trained / "model", tmp_path / "model"))


# ----- the edge: one line for every failure ------------------------------------------------------------
def test_unexpected_errors_are_one_line_with_their_type_and_debug_shows_the_traceback(saved_model, capsys, monkeypatch):
    import hsae.cli.info as info_command

    def broken(directory):
        raise KeyError("deep inside")

    monkeypatch.setattr(info_command, "read_config", broken)
    code, lines = cli(capsys, ["info", saved_model])
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("error: unexpected KeyError: 'deep inside'") and "--debug" in lines[0]
    code, lines = cli(capsys, ["--debug", "info", saved_model])
    assert code == 1 and lines[0] == "Traceback (most recent call last):" and "--debug" in lines[-1]
    monkeypatch.setenv("HSAE_DEBUG", "1")
    code, lines = cli(capsys, ["info", saved_model])
    assert code == 1 and lines[0] == "Traceback (most recent call last):"


def test_os_errors_name_the_path_and_the_cause(saved_model, capsys, monkeypatch):
    import hsae.cli.info as info_command

    def denied(directory):
        raise PermissionError(errno.EACCES, "Permission denied", str(directory))

    monkeypatch.setattr(info_command, "read_config", denied)
    one_error(capsys, ["info", saved_model], str(saved_model), "permission denied", "fix its permissions")


# ----- class 1: resume refuses what would change the run ------------------------------------------------
@pytest.mark.parametrize(
    "extra,names",
    [
        (["--lr", "0.5"], ["--lr is 0.5 now"]),
        (["--seed", "8"], ["seed 0", "seed 8"]),
        (["--batch-size", "64"], ["--batch-size is 64 now but 128"]),
        (["--steps", "80"], ["--steps is 80 now but 60", "schedule"]),
        (["-o", "lr_warmup_steps=5"], ["-o lr_warmup_steps is 5 now but 100"]),
        (["-o", "dead_window_tokens=5000"], ["-o dead_window_tokens is 5000 now but 1365"]),  # 64 x 64 / 3
        (["-o", "aux_coef=0.5"], ["aux_coef is 0.5 now"]),
    ],
)
def test_resume_refuses_options_that_change_the_run(stopped_run, capsys, extra, names):
    before = listing(stopped_run)
    one_error(capsys, [*train_args(stopped_run, "--resume"), *extra], "--resume", *names)
    assert listing(stopped_run) == before


def test_resume_keeps_the_runs_own_dead_window(stopped_run, tmp_path):
    """Left out, the dead window is the run's own: runs saved before the default scaled with the width
    hold 1000000 and resume with it; giving the default's value is the same run as leaving it out."""
    old_style = tmp_path / "old"
    assert main(train_args(old_style, "-o", "dead_window_tokens=1000000", "--stop-after", "20")) == 0
    assert main(train_args(old_style, "--resume")) == 0
    assert json.loads((old_style / "config.json").read_text())["train"]["dead_window_tokens"] == 1_000_000
    assert main(train_args(stopped_run, "--resume", "-o", "dead_window_tokens=1365")) == 0
    assert json.loads((stopped_run / "config.json").read_text())["train"]["dead_window_tokens"] is None


def test_resume_refuses_other_data_of_the_same_width(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("a.npy", "b.npy"):
        np.save(tmp_path / name, rng.standard_normal((2000, 8)).astype(np.float32))
    args = ["train", "--arch", "topk", "--n-latents", "16", "--k", "2", "--steps", "20", "--batch-size", "64",
            "--checkpoint-every", "10", "-q", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main([*args, "--data", str(tmp_path / "a.npy"), "--stop-after", "10"]) == 0
    one_error(capsys, [*args, "--data", tmp_path / "b.npy", "--resume"], "path", "a.npy", "b.npy")


def test_resume_refuses_another_number_of_processes(stopped_run, capsys):
    checkpoint = stopped_run / "checkpoint.safetensors"
    with safe_open(str(checkpoint), framework="pt") as fh:
        state = json.loads(fh.metadata()["state"])
    tensors = load_file(checkpoint)
    state["world_size"] = 2
    save_file(tensors, str(checkpoint), metadata={"state": json.dumps(state)})
    one_error(capsys, train_args(stopped_run, "--resume"), "2 data-parallel", "on 1", "--nproc_per_node 2")


def test_resume_takes_run_neutral_options_and_ends_bit_identical(stopped_run, tmp_path):
    assert main(train_args(tmp_path / "full")) == 0
    assert main(train_args(stopped_run, "--resume", "--log-every", "5", "--checkpoint-every", "30")) == 0
    assert (stopped_run / "weights.safetensors").read_bytes() == (
        tmp_path / "full" / "weights.safetensors"
    ).read_bytes()
    record = json.loads((stopped_run / "config.json").read_text())["train"]
    assert record["lr"] is None and record["steps"] == 60 and record["log_every"] == 5  # the run's own record
    assert steps_of(stopped_run) == [10, 20, 25, 30, 35, 40, 45, 50, 55, 60]


# ----- class 2: loading checks every field and every weight ---------------------------------------------
def _edit_config(model: Path, edit) -> None:
    record = json.loads((model / "config.json").read_text())
    edit(record)
    (model / "config.json").write_text(json.dumps(record))


def _edit_weights(model: Path, edit) -> None:
    tensors = load_file(model / "weights.safetensors")
    edit(tensors)
    save_file(tensors, str(model / "weights.safetensors"), metadata={"arch": "topk"})


@pytest.mark.parametrize(
    "damage,fragments",
    [
        (lambda m: _edit_config(m, lambda r: r["sae"].pop("k")), ["k missing"]),
        (lambda m: _edit_config(m, lambda r: r["sae"].pop("input_scale")), ["input_scale missing"]),
        (lambda m: _edit_config(m, lambda r: r["sae"].update(k="four")), ["expected an integer"]),
        (lambda m: _edit_config(m, lambda r: r["sae"].update(n_latents=10**9)), ["1000000000 latents", "more than"]),
        (lambda m: (m / "config.json").write_text("[1, 2]"), ["config.json", "list"]),
        (lambda m: _edit_weights(m, lambda t: t.update(W_dec=t["W_dec"].int())), ["W_dec is int32", "floating point"]),
        (lambda m: _edit_weights(m, lambda t: t.update(W_dec=t["W_dec"][:-1])), ["W_dec has shape (63, 24)"]),
        (lambda m: _edit_weights(m, lambda t: t.pop("b_enc")), ["missing ['b_enc']"]),
        (lambda m: _edit_weights(m, lambda t: t["W_enc"].view(-1)[7].fill_(float("nan"))), ["W_enc holds 1 NaN"]),
        (lambda m: _edit_weights(m, lambda t: t["b_dec"].fill_(float("inf"))), ["b_dec holds 24 NaN or infinite"]),
        (lambda m: _edit_weights(m, lambda t: t["parents"].fill_(99)), ["parents holds values outside"]),
        (lambda m: (m / "weights.safetensors").write_text("these are not weights"), ["not a readable safetensors"]),
        (
            lambda m: (m / "weights.safetensors").write_bytes((m / "weights.safetensors").read_bytes()[:5000]),
            ["not a readable safetensors"],
        ),
    ],
    ids=[
        "no-k",
        "no-input-scale",
        "k-text",
        "huge-config",
        "json-list",
        "int32",
        "shape",
        "missing-key",
        "nan",
        "inf",
        "parents",
        "text-weights",
        "truncated",
    ],  # fmt: skip
)
def test_damaged_models_are_named_errors_in_load_info_and_eval(saved_model, capsys, damage, fragments):
    damage(saved_model)
    before = listing(saved_model)
    with pytest.raises(HsaeError) as caught:
        hsae.load(saved_model)
    for fragment in fragments:
        assert fragment in str(caught.value)
    one_error(capsys, ["eval", saved_model, "--tokens", "256"], *fragments)
    if "list" in fragments:
        one_error(capsys, ["info", saved_model], "holds a JSON list, not an object", "damaged")
    assert listing(saved_model) == before  # nothing written, not even an eval folder's report
    assert not (saved_model / "eval").exists()


def _checkpoint_parts(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = run / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


@pytest.mark.parametrize(
    "damage", ["truncated", "no-state", "state-not-json", "state-a-list", "shape", "adam-shape", "nan", "no-rng"]
)
def test_a_corrupt_checkpoint_on_resume_is_named(stopped_run, capsys, damage):
    checkpoint = stopped_run / "checkpoint.safetensors"
    tensors, metadata = _checkpoint_parts(stopped_run)
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:-100])
    else:
        if damage == "no-state":
            metadata = {}
        elif damage == "state-not-json":
            metadata = {"state": "{not json"}
        elif damage == "state-a-list":
            metadata = {"state": "[1, 2]"}
        elif damage == "shape":
            tensors["model.W_dec"] = tensors["model.W_dec"][:5].clone()
        elif damage == "adam-shape":
            tensors["optim.W_dec.exp_avg"] = tensors["optim.W_dec.exp_avg"][:5].clone()
        elif damage == "nan":
            tensors["model.W_enc"][0, 0] = float("nan")
        else:
            del tensors["trainer.rng"]
        save_file(tensors, str(checkpoint), metadata=metadata)
    before = listing(stopped_run)
    one_error(
        capsys, train_args(stopped_run, "--resume"), "--resume:", "checkpoint.safetensors", "damaged", "new --out"
    )
    assert listing(stopped_run) == before


# ----- class 3: a failure before the first checkpoint leaves the folder as it found it -----------------
class _Diverging:
    """The synthetic source, with a batch of huge values from step `bad_step` on (the loss overflows)."""

    def __init__(self, bad_step: int):
        self.inner = SyntheticSource(SyntheticConfig(d_in=24, n_roots=6, seed=1))
        self.d_in, self.bad_step = 24, bad_step

    def batches(self, batch_size, start_step=0, rank=0, world_size=1):
        for step, x in enumerate(self.inner.batches(batch_size, start_step, rank, world_size), start_step):
            yield x * 1e30 if step >= self.bad_step else x

    def sample(self, n):
        return self.inner.sample(n)

    def describe(self):
        return {"kind": "diverging", "bad_step": self.bad_step}

    def epoch_rows(self):
        return None


def _diverging_trainer(out: Path, bad_step: int) -> Trainer:
    sae = TopKConfig(arch="topk", d_in=24, n_latents=64, k=3)
    cfg = TrainConfig(steps=60, batch_size=64, checkpoint_every=20, log_every=5)
    return Trainer(sae, cfg, _Diverging(bad_step), out, show_progress=False)


def test_nan_loss_before_the_first_checkpoint_leaves_nothing_and_says_so(tmp_path):
    out = tmp_path / "new" / "run"  # neither folder exists yet
    with pytest.raises(HsaeError, match="by step 13; train again with a lower --lr.*nothing was saved") as caught:
        _diverging_trainer(out, bad_step=12).run()
    assert "intact" not in str(caught.value)
    assert not (tmp_path / "new").exists()  # metrics.jsonl (two lines were logged) and the folders are gone
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HsaeError, match="nothing was saved"):
        _diverging_trainer(empty, bad_step=12).run()
    assert empty.is_dir() and not any(empty.iterdir())


def test_nan_loss_after_a_checkpoint_says_which_one_is_intact(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(HsaeError, match="by step 46; .* new --out .*the checkpoint at step 40 in .* is intact"):
        _diverging_trainer(out, bad_step=45).run()
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 60
    assert steps_of(out) == [5, 10, 15, 20, 25, 30, 35, 40, 45]


def test_a_failed_first_checkpoint_leaves_the_folder_as_found_and_the_rerun_is_accepted(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "save_file", full_disk)
    one_error(capsys, train_args(out), f"cannot write {out / 'checkpoint.safetensors'}", "no space left", "free some")
    assert list(out.iterdir()) == []  # no metrics.jsonl, no temporary file
    monkeypatch.undo()
    assert main(train_args(out)) == 0


def test_a_full_disk_at_a_later_checkpoint_keeps_the_previous_one(stopped_run, capsys, monkeypatch, tmp_path):
    before = (stopped_run / "checkpoint.safetensors").read_bytes()
    real = atomic.save_file

    def full_disk(tensors, filename, metadata=None):
        real(tensors, filename, metadata)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "save_file", full_disk)
    one_error(capsys, train_args(stopped_run, "--resume"), "checkpoint.safetensors", "no space left on the device")
    assert (stopped_run / "checkpoint.safetensors").read_bytes() == before
    assert sorted(p.name for p in stopped_run.iterdir()) == [
        "checkpoint.safetensors", "config.json", "metrics.jsonl", "weights.safetensors",
    ]  # fmt: skip
    monkeypatch.undo()
    assert main(train_args(stopped_run, "--resume")) == 0
    assert main(train_args(tmp_path / "full")) == 0
    assert (stopped_run / "weights.safetensors").read_bytes() == (
        tmp_path / "full" / "weights.safetensors"
    ).read_bytes()


def test_bad_data_found_in_the_loop_leaves_no_metrics_file(tmp_path, capsys):
    np.save(tmp_path / "few.npy", np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32))
    out = tmp_path / "run"
    args = ["train", "--arch", "topk", "--data", tmp_path / "few.npy", "--n-latents", "16", "--k", "2", "--steps",
            "5", "--batch-size", "256", "-q", "--out", out]  # fmt: skip
    one_error(capsys, args, "lower --batch-size")
    assert not out.exists()
    args[args.index("256")] = "32"
    assert main([str(a) for a in args]) == 0


# ----- class 4: no leftovers ---------------------------------------------------------------------------
def test_resume_removes_the_temporary_files_of_interrupted_writes(stopped_run, tmp_path):
    stale = [".checkpoint.safetensors.1a2b3c4d.tmp", ".weights.safetensors.ffff0000.tmp", ".config.json.0.tmp",
             ".metrics.jsonl.99.tmp", ".tmpAb12Cd"]  # fmt: skip
    for name in stale:
        (stopped_run / name).write_bytes(b"x" * 1000)
    (stopped_run / "notes.tmp").write_text("a user's file stays")
    assert main(train_args(stopped_run, "--resume")) == 0
    assert sorted(p.name for p in stopped_run.iterdir()) == [
        "checkpoint.safetensors", "config.json", "metrics.jsonl", "notes.tmp", "weights.safetensors",
    ]  # fmt: skip


def test_harvest_rerun_removes_the_temporary_files_of_interrupted_writes(tmp_path):
    from hsae.sources.harvest import harvest_to_store
    from hsae.sources.hf import DEFAULT_HOOK, Harvester, load_model

    texts = [f"Sentence {i} is about rivers and stone number {i}." for i in range(30)]
    harvester = Harvester(load_model(device="cpu"), [DEFAULT_HOOK], batch_tokens=128, max_length=32)

    class Stop(Exception):
        pass

    def stop(done, total):
        if done >= 100:
            raise Stop

    out = tmp_path / "store"
    with pytest.raises(Stop):
        harvest_to_store(out, harvester, texts, tokens=200, shard_rows=50, progress=stop)
    for name in (".manifest.json.0a0a0a0a.tmp", ".shard-00009.safetensors.12345678.tmp", ".tmpXy12Zw"):
        (out / name).write_bytes(b"x" * 1000)
    harvest_to_store(out, harvester, texts, tokens=200, shard_rows=50)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert ActivationStore.open(out).total_rows == 200


def test_a_kill_after_a_log_line_and_before_the_first_checkpoint_leaves_no_duplicate_step(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # What a run killed at step 25 leaves: two metric lines, a torn third, a checkpoint half written.
    (out / "metrics.jsonl").write_text('{"step": 10, "loss": 1}\n{"step": 20, "loss": 1}\n{"step": 2')
    (out / ".checkpoint.safetensors.0badf00d.tmp").write_bytes(b"\0" * 4096)
    with pytest.raises(HsaeError, match="stopped before its first checkpoint.*--resume"):
        hsae.train.check_out_dir(out, resume=False)
    assert main(train_args(out, "--resume")) == 0
    assert steps_of(out) == [10, 20, 30, 40, 50, 60]
    assert main(train_args(tmp_path / "full")) == 0
    assert (out / "weights.safetensors").read_bytes() == (tmp_path / "full" / "weights.safetensors").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "full").iterdir())


def test_a_run_killed_between_its_last_checkpoint_and_its_model_files_gets_its_final_model(tmp_path):
    assert main(train_args(tmp_path / "full")) == 0
    assert main(train_args(tmp_path / "at40", "--stop-after", "40")) == 0
    killed = Path(shutil.copytree(tmp_path / "full", tmp_path / "killed"))
    for name in ("weights.safetensors", "config.json"):  # the final checkpoint is written, the model not yet
        shutil.copy(tmp_path / "at40" / name, killed / name)
    assert json.loads((killed / "config.json").read_text())["step"] == 40
    assert main(train_args(killed, "--resume")) == 0
    assert listing(killed) == listing(tmp_path / "full")
    inodes = {p.name: p.stat().st_ino for p in killed.iterdir()}
    assert main(train_args(killed, "--resume")) == 0  # an up-to-date finished run is left alone: no file rewritten
    assert {p.name: p.stat().st_ino for p in killed.iterdir()} == inodes


def test_resume_drops_metric_lines_past_the_checkpoint_and_a_torn_line(stopped_run):
    with open(stopped_run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 30, "loss": 1}\n{"step": 4')  # logged after the checkpoint at 20, then killed
    assert main(train_args(stopped_run, "--resume")) == 0
    assert steps_of(stopped_run) == [10, 20, 30, 40, 50, 60]


# ----- class 5: what gave tracebacks -------------------------------------------------------------------
def test_inputs_that_gave_tracebacks_are_one_line(tmp_path, capsys, saved_model):
    base = ["train", "--arch", "topk", "--data", "synthetic", "--k", "4", "--steps", "20", "-q"]
    one_error(
        capsys, [*base, "--n-latents", 10**9, "--out", tmp_path / "a"], "needs at least", "GiB", "lower --n-latents"
    )
    one_error(capsys, [*base, "--n-latents", 64, "--device", "tpu", "--out", tmp_path / "b"], "--device 'tpu'")
    (tmp_path / "file").write_text("not a folder")
    one_error(capsys, [*base, "--n-latents", 64, "--out", tmp_path / "file", "--resume"], "is a file")
    one_error(capsys, [*base, "--n-latents", 64, "--out", tmp_path / "file" / "sub"], "a file, not a folder")
    for tokens in (0, -5):
        one_error(
            capsys,
            ["eval", saved_model, "--tokens", tokens],
            f"--tokens must be a positive number of rows to evaluate on, got {tokens}",
        )
        one_error(
            capsys, ["compare", saved_model, saved_model, "--tokens", tokens, "--out", tmp_path / "c"], "--tokens"
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert (tmp_path / "file").read_text() == "not a folder"


def test_a_read_only_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch, saved_model):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access

    # (the tests run as root, for whom permission bits do not apply: the read-only folder is simulated)
    def access(path, mode, **kwargs):
        return not (Path(path) == read_only and mode & os.W_OK) and real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    for out in (read_only, read_only / "new"):
        one_error(
            capsys, train_args(out), f"--out {out}: cannot write there", "read-only file system", "choose a folder"
        )
        one_error(capsys, train_args(out, "--resume"), "cannot write there")
        one_error(capsys, ["harvest", "--out", out, "--tokens", "10", "--corpus", saved_model / "config.json"],
                  "cannot write there")  # fmt: skip
    assert list(read_only.iterdir()) == []


def test_a_write_the_file_system_refuses_is_one_line_naming_the_file(tmp_path):
    def read_only(tensors, filename, metadata=None):
        raise OSError(errno.EROFS, "Read-only file system", filename)

    target = tmp_path / "w.safetensors"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(atomic, "save_file", read_only)
        with pytest.raises(HsaeError, match=f"cannot write {target}: the file system is read-only; choose a folder"):
            write_safetensors(target, {"a": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


# ----- class 6: validation holes -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option,fragment",
    [
        ("aux_coef=nan", "expected a finite number, got 'nan'"),
        ("aux_coef=inf", "expected a finite number"),
        ("aux_coef=-inf", "expected a finite number"),
        ("lr_warmup_steps=-5", "lr_warmup_steps must be 0"),
        ("dead_window_tokens=-1", "dead_window_tokens must be positive"),
        ("grad_clip_norm=0", "grad_clip_norm must be positive"),
        ("adam_beta1=1", "adam_beta1 must be in [0, 1)"),
        ("lr_decay_fraction=nan", "finite"),
    ],
)
def test_options_that_make_no_sense_are_refused_up_front(tmp_path, capsys, option, fragment):
    one_error(capsys, train_args(tmp_path / "run", "-o", option), fragment)
    assert not (tmp_path / "run").exists()


def test_absurd_learning_rates_and_seeds_are_refused_up_front(tmp_path, capsys):
    one_error(capsys, train_args(tmp_path / "r", "--lr", "1e30"), "--lr 1e+30 is far above", "at most 1")
    one_error(capsys, train_args(tmp_path / "r", "--lr", "nan"), "training.lr: expected a finite number")
    one_error(capsys, train_args(tmp_path / "r", "--seed", "-1"), "--seed must be 0 or more")
    sized = ["train", "--arch", "topk", "--data", "synthetic", "--k", "2", "-q", "--out", tmp_path / "r"]
    for factor in ("inf", "nan", "-2"):
        one_error(capsys, [*sized, "--expansion-factor", factor], "--expansion-factor must be a positive number")
    assert not (tmp_path / "r").exists()


def test_json_is_never_written_with_non_standard_numbers(tmp_path):
    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    text = (tmp_path / "x.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}}
    with pytest.raises(HsaeError, match="finite"):
        from_dict(TrainConfig, {"lr": float("nan")})


# ----- class 7: eval and compare on a small store ---------------------------------------------------------
def test_eval_and_compare_on_models_trained_on_2000_rows(tmp_path, capsys):
    store = make_store(tmp_path / "store", rows=2000, d_in=8, shard_rows=500)
    for name in ("a", "b"):
        args = ["train", "--arch", "topk", "--data", store, "--n-latents", "16", "--k", "2", "--steps", "5",
                "--batch-size", "128", "-q", "--out", tmp_path / name]  # fmt: skip
        assert main([str(a) for a in args]) == 0
    assert main(["eval", str(tmp_path / "a"), "-m", "core"]) == 0
    core = json.loads((tmp_path / "a" / "eval" / "report.json").read_text())["sections"]["core"]
    assert core["heldout"] is True and core["tokens"] == 100  # every 20th of 400 documents, 5 rows each
    compare = ["compare", tmp_path / "a", tmp_path / "b", "-m", "core", "--out", tmp_path / "c"]
    assert main([str(a) for a in compare]) == 0
    (tmp_path / "b" / "config.json").write_text("[]")
    one_error(capsys, [*compare[:-1], tmp_path / "d"], str(tmp_path / "b"), "list")
    assert not (tmp_path / "d").exists()  # the damaged second folder is found before the first is evaluated


# ----- class 8: paths in a manifest stay inside the store -------------------------------------------------
@pytest.mark.parametrize("where", ["../other/shard-00000.safetensors", "/etc/passwd", "..", "."])
def test_shard_paths_outside_the_store_are_refused_before_anything_is_read(tmp_path, capsys, monkeypatch, where):
    store = make_store(tmp_path / "store")
    make_store(tmp_path / "other", seed=1)
    manifest = json.loads((store / MANIFEST).read_text())
    manifest["shards"][0]["file"] = where
    if where.startswith("../"):
        manifest["shards"][0]["sha256"] = sha256_of(tmp_path / "other" / "shard-00000.safetensors")
    (store / MANIFEST).write_text(json.dumps(manifest))
    opened = []
    monkeypatch.setattr("hsae.store.sha256_of", lambda path: opened.append(path))
    with pytest.raises(HsaeError, match="outside the store folder"):
        ActivationStore.open(store)
    args = ["train", "--arch", "topk", "--data", store, "--n-latents", "16", "--k", "2", "--steps", "2", "-q",
            "--out", tmp_path / "run"]  # fmt: skip
    one_error(capsys, args, "outside the store folder", "harvest the store again")
    assert opened == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["shards", "hooks"])
@pytest.mark.parametrize("value", ["missing", None, [], {}, "x", [None], [{}]])
def test_manifests_without_shards_or_hooks_are_one_line_errors(tmp_path, capsys, key, value):
    store = make_store(tmp_path / "store")
    manifest = json.loads((store / MANIFEST).read_text())
    if value == "missing":
        del manifest[key]
    else:
        manifest[key] = value
    (store / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(HsaeError, match="the store is damaged"):
        ActivationStore.open(store)
    one_error(capsys, ["train", "--arch", "topk", "--data", store, "--n-latents", "16", "--k", "2", "--steps", "2",
                       "-q", "--out", tmp_path / "run"], str(store / MANIFEST), "damaged")  # fmt: skip


# ----- class 9: --resume into a folder that holds no run ---------------------------------------------------
def test_resume_into_a_folder_holding_no_run_is_refused(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    (folder / "weights.safetensors").write_text("not hsae's")
    one_error(capsys, train_args(folder, "--resume"), "holds no run to resume", "notes.txt", "new or empty --out")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "weights.safetensors"]
    assert (folder / "notes.txt").read_text() == "precious"
    # an empty or missing folder is a run that has not started: --resume starts it
    assert main(train_args(tmp_path / "missing", "--resume", steps=20)) == 0


# ----- class 10: files honour the umask and keep their mode --------------------------------------------------
def _modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert main(train_args(tmp_path / "run", steps=20)) == 0
        write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert set(_modes(tmp_path / "run").values()) == {mode}
    assert _modes(tmp_path)["x.json"] == mode


def test_a_resumed_run_keeps_each_file_s_mode(stopped_run):
    for name, mode in (("metrics.jsonl", 0o640), ("config.json", 0o604), ("weights.safetensors", 0o444)):
        os.chmod(stopped_run / name, mode)
    assert main(train_args(stopped_run, "--resume")) == 0
    modes = _modes(stopped_run)
    assert (modes["metrics.jsonl"], modes["config.json"], modes["weights.safetensors"]) == (0o640, 0o604, 0o444)
