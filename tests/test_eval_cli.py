"""`hsae eval` and `hsae compare` as a user runs them."""

import json

from hsae.cli import main


def _train(out, arch="topk"):
    assert (
        main(
            [
                "train",
                "--arch",
                arch,
                "--data",
                "synthetic",
                "--n-latents",
                "64",
                "--k",
                "3",
                "--steps",
                "40",
                "--batch-size",
                "256",
                "--synthetic",
                "d_in=24",
                "--synthetic",
                "n_roots=6",
                "-q",
                "--out",
                str(out),
            ]
        )
        == 0
    )


def test_eval_writes_report_with_core_and_ground_truth(tmp_path, capsys):
    _train(tmp_path / "m")
    assert main(["eval", str(tmp_path / "m"), "--tokens", "2048"]) == 0
    report = json.loads((tmp_path / "m" / "eval" / "report.json").read_text())
    core = report["sections"]["core"]
    assert core["tokens"] == 2048 and 0 < core["fvu"] < 1 and abs(core["l0"] - 3) < 0.5
    assert len(core["density"]) == 64 and sum(core["l0_histogram"]) == 2048
    assert 0 <= report["sections"]["ground_truth"]["recovered_fraction"] <= 1
    html = (tmp_path / "m" / "eval" / "report.html").read_text()
    assert "<svg" in html and "feature density" in html
    assert "fvu" in capsys.readouterr().out


def test_eval_marks_ground_truth_skipped_on_real_data(tmp_path):
    import numpy as np

    np.save(tmp_path / "acts.npy", np.random.default_rng(0).normal(size=(1024, 8)).astype("float32"))
    assert (
        main(
            [
                "train",
                "--arch",
                "topk",
                "--data",
                str(tmp_path / "acts.npy"),
                "--n-latents",
                "32",
                "--k",
                "2",
                "--steps",
                "10",
                "--batch-size",
                "128",
                "-q",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    assert main(["eval", str(tmp_path / "m"), "--tokens", "512"]) == 0
    sections = json.loads((tmp_path / "m" / "eval" / "report.json").read_text())["sections"]
    assert "no known features" in sections["ground_truth"]["skipped"]


def test_compare_two_models(tmp_path):
    _train(tmp_path / "a", "topk")
    _train(tmp_path / "b", "batchtopk")
    assert (
        main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--tokens", "1024", "--out", str(tmp_path / "cmp")])
        == 0
    )
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert set(report["sections"]) == {str(tmp_path / "a"), str(tmp_path / "b")}
    assert "core.fvu" in report["sections"][str(tmp_path / "a")]
    assert "Pareto" in (tmp_path / "cmp" / "report.html").read_text()


def test_eval_on_other_width_is_refused(tmp_path, capsys):
    _train(tmp_path / "m")
    rc = main(["eval", str(tmp_path / "m"), "--data", "synthetic", "--synthetic", "d_in=30", "--tokens", "256"])
    assert rc == 2 and "width 24" in capsys.readouterr().err


def test_hierarchy_section_extracts_forest_and_scores_against_truth(tmp_path):
    _train(tmp_path / "m")
    assert main(["eval", str(tmp_path / "m"), "--tokens", "4096", "-m", "core", "-m", "hierarchy"]) == 0
    section = json.loads((tmp_path / "m" / "eval" / "report.json").read_text())["sections"]["hierarchy"]
    assert section["forest"] == "extracted post hoc"
    assert section["edges"] + section["orphans"] + section["roots"] <= 64
    for key in ("true_absorption", "true_edge_f1", "parent_coverage", "parent_explained"):
        assert key in section
    assert (
        "forest&#x27;s shape" in (tmp_path / "m" / "eval" / "report.html").read_text()
        or "forest's shape" in (tmp_path / "m" / "eval" / "report.html").read_text()
    )


def test_parent_explained_fraction_by_hand():
    import torch

    from hsae.eval.hierarchy_evaluators import parent_explained_fraction

    W = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    parents = torch.tensor([-1, 0, -1])
    # child 1 fires in rows 0,1,2; its parent 0 in rows 0,1: coverage 2/3, cos^2 = 0.36
    active = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 1, 1], [0, 0, 1]]).bool()
    assert abs(parent_explained_fraction(parents, active, W) - (2 / 3) * 0.36) < 1e-6
