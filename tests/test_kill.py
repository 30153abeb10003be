"""kill -9 harness: training and harvesting are killed at chosen points, including in the middle of
the checkpoint, model, metrics and manifest writes, then resumed (`hsae train --resume`, or the same
`hsae harvest` again); the result must be bit-identical to an uninterrupted run's (weights, config,
checkpoint and metric steps; shards and manifest) and the folder must hold nothing else.

A kill point is (write, phase): the n-th atomic write of the run (hsae.atomic), paused in a child
process `before` anything is written to its temporary file, once it is `written` (not yet renamed),
or just after it is `renamed` into place; the parent SIGKILLs the paused child. Random points kill
at a seeded random delay instead.

The default run takes a few points (seconds each); HSAE_KILL_ALL=1 takes every point of both runs
and HSAE_KILL_RANDOM=N (default 10 with HSAE_KILL_ALL) N random delays each, seeded by
HSAE_KILL_SEED (default 0).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hsae.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")
PHASES = ("before", "written", "renamed")
EVERY_POINT = os.environ.get("HSAE_KILL_ALL", "") not in ("", "0")
RANDOM_KILLS = int(os.environ.get("HSAE_KILL_RANDOM", "10" if EVERY_POINT else "0"))
SEED = int(os.environ.get("HSAE_KILL_SEED", "0"))

# The child: hsae's CLI with the atomic writer paused at one point (argv: write number, phase,
# flag file, then the command). The flag file tells the parent the child is paused there.
CHILD = """
import sys, time
from contextlib import contextmanager
import hsae.atomic as atomic
target, phase, flag = int(sys.argv[1]), sys.argv[2], sys.argv[3]
real = atomic.atomic_path
writes = [0]

def pause(at):
    if writes[0] == target and phase == at:
        with open(flag, "w") as fh:
            fh.write(str(target))
        time.sleep(600)

@contextmanager
def pausing(path):
    writes[0] += 1
    with real(path) as tmp:
        pause("before")
        yield tmp
        pause("written")
    pause("renamed")

atomic.atomic_path = pausing
from hsae.cli import main
if target == 0:  # random kills: the delay counts from here
    open(flag, "w").close()
sys.exit(main(sys.argv[4:]))
"""


def run_child(command: list[str], flag: Path, target: int, phase: str, delay: float | None = None) -> str:
    """Start the command in a child paused at (target, phase), SIGKILL it there (or, for target 0,
    `delay` seconds after it starts the command); 'killed', or 'finished' if it ended first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [sys.executable, "-c", CHILD, str(target), phase, str(flag), *command]
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if delay is not None and flag.exists():
            time.sleep(delay)
        if child.poll() is not None:
            assert child.returncode == 0, child.stderr.read().decode() if child.stderr else ""
            return "finished"
        assert flag.exists(), "the child never reached its kill point"
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        return "killed"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stderr:
            child.stderr.close()


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ----- training -------------------------------------------------------------------------------------------
def train_args(out: Path) -> list[str]:
    return [
        "train", "--arch", "topk", "--data", "synthetic", "--synthetic", "d_in=24", "--synthetic", "n_roots=6",
        "--n-latents", "64", "--k", "3", "--steps", "60", "--batch-size", "128", "--checkpoint-every", "20",
        "--log-every", "10", "-q", "--out", str(out),
    ]  # fmt: skip


TRAIN_WRITES = 9  # 3 checkpoints of 3 files each (checkpoint, weights, config)


def metric_steps(folder: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows]


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("kill-train") / "reference"
    assert main(train_args(out)) == 0
    return out


def check_training(out: Path, reference: Path) -> None:
    """Resume, then compare with the uninterrupted run: every file but metrics.jsonl byte for byte,
    metrics.jsonl step for step (its timings differ), and nothing else in the folder."""
    assert main(train_args(out) + ["--resume"]) == 0
    got, want = files(out), files(reference)
    assert sorted(got) == sorted(want), f"leftovers or missing files: {sorted(set(got) ^ set(want))}"
    for name in want:
        if name != "metrics.jsonl":
            assert got[name] == want[name], f"{name} differs from the uninterrupted run's"
    assert metric_steps(out) == metric_steps(reference)


TRAIN_POINTS = (
    [(n, phase) for n in range(1, TRAIN_WRITES + 1) for phase in PHASES]
    if EVERY_POINT
    # in the first checkpoint (two metric lines logged); right after the last checkpoint, before the model files
    else [(1, "written"), (7, "renamed")]
)


@pytest.mark.parametrize("write,phase", TRAIN_POINTS)
def test_training_killed_at_a_write_resumes_bit_identical(tmp_path, train_reference, write, phase):
    out = tmp_path / "run"
    assert run_child(train_args(out), tmp_path / "flag", write, phase) == "killed"
    check_training(out, train_reference)


@pytest.mark.slow
@pytest.mark.skipif(RANDOM_KILLS == 0, reason="random kill delays: set HSAE_KILL_RANDOM=N (or HSAE_KILL_ALL=1)")
@pytest.mark.parametrize("case", range(RANDOM_KILLS))
def test_training_killed_at_a_random_moment_resumes_bit_identical(tmp_path, train_reference, case):
    delay = random.Random(SEED * 1000 + case).uniform(0, 3.0)
    out = tmp_path / "run"
    ended = run_child(train_args(out), tmp_path / "flag", 0, "-", delay=delay)
    print(f"\ntraining, SIGKILL {delay:.2f} s after the start: {ended}")  # (`pytest -s` shows how many were killed)
    check_training(out, train_reference)


# ----- harvesting -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("kill-corpus") / "corpus.txt"
    words = ("dogs", "trees", "music", "rivers", "stone", "glass", "bread", "snow")
    path.write_text("\n".join(f"Line {i}: {a} and {b} meet at dawn." for i, (a, b) in enumerate(
        (a, b) for a in words for b in words)) + "\n")  # fmt: skip
    return path


def harvest_args(out: Path, corpus: Path) -> list[str]:
    return [
        "harvest", "--tokens", "400", "--shard-rows", "100", "--batch-tokens", "256", "--max-length", "32",
        "--sort-window", "50", "--corpus", str(corpus), "--device", "cpu", "-q", "--out", str(out),
    ]  # fmt: skip


HARVEST_WRITES = 10  # the first manifest, 4 x (shard, manifest), the manifest marked complete


@pytest.fixture(scope="module")
def harvest_reference(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("kill-harvest") / "reference"
    assert main(harvest_args(out, corpus)) == 0
    return out


def without_time(manifest: bytes) -> dict:
    record = json.loads(manifest)
    record.pop("created")
    return record


def check_harvest(out: Path, reference: Path, corpus: Path) -> None:
    """Harvest again into the killed store; every shard byte for byte, the manifest but its creation
    time, and nothing else in the folder."""
    assert main(harvest_args(out, corpus)) == 0
    got, want = files(out), files(reference)
    assert sorted(got) == sorted(want), f"leftovers or missing files: {sorted(set(got) ^ set(want))}"
    for name in want:
        if name == "manifest.json":
            assert without_time(got[name]) == without_time(want[name])
        else:
            assert got[name] == want[name], f"{name} differs from the uninterrupted harvest's"


HARVEST_POINTS = (
    [(n, phase) for n in range(1, HARVEST_WRITES + 1) for phase in PHASES]
    if EVERY_POINT
    else [(5, "written")]  # in the manifest write after the second shard (HSAE_KILL_ALL=1: mid shard writes too)
)


@pytest.mark.parametrize("write,phase", HARVEST_POINTS)
def test_harvest_killed_at_a_write_ends_with_the_same_store(tmp_path, harvest_reference, corpus, write, phase):
    out = tmp_path / "store"
    assert run_child(harvest_args(out, corpus), tmp_path / "flag", write, phase) == "killed"
    check_harvest(out, harvest_reference, corpus)


@pytest.mark.slow
@pytest.mark.skipif(RANDOM_KILLS == 0, reason="random kill delays: set HSAE_KILL_RANDOM=N (or HSAE_KILL_ALL=1)")
@pytest.mark.parametrize("case", range(RANDOM_KILLS))
def test_harvest_killed_at_a_random_moment_ends_with_the_same_store(tmp_path, harvest_reference, corpus, case):
    delay = random.Random(SEED * 1000 + 500 + case).uniform(0, 5.0)
    out = tmp_path / "store"
    ended = run_child(harvest_args(out, corpus), tmp_path / "flag", 0, "-", delay=delay)
    print(f"\nharvest, SIGKILL {delay:.2f} s after the start: {ended}")
    check_harvest(out, harvest_reference, corpus)
