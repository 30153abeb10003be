"""torchrun data parallelism: two CPU ranks equal one process with the two ranks' batches together."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hsae.cli import main


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_ranks_match_one_process_with_double_batch(tmp_path):
    gen = torch.Generator().manual_seed(0)
    np.save(tmp_path / "acts.npy", torch.randn(4096, 16, generator=gen).numpy())
    common = [
        "train",
        "--arch",
        "topk",
        "--data",
        str(tmp_path / "acts.npy"),
        "--n-latents",
        "48",
        "--k",
        "4",
        "--steps",
        "30",
        "--checkpoint-every",
        "10",
        "-q",
    ]
    ddp = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "hsae.cli",
        *common,
        "--batch-size",
        "64",
        "--out",
        str(tmp_path / "ddp"),
    ]
    run = subprocess.run(ddp, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert main([*common, "--batch-size", "128", "--out", str(tmp_path / "single")]) == 0
    a = load_file(tmp_path / "ddp" / "weights.safetensors")
    b = load_file(tmp_path / "single" / "weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-4, rtol=1e-3, msg=key)
