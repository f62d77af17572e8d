"""``ewc-fused demo``: tiny end-to-end runs, fused vs reference EWC, metrics, λ search, CLI errors."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from ewc_fused import cli  # noqa: E402
from ewc_fused.demo import parse_lambdas  # noqa: E402
from ewc_fused.demo.data import load_digits_split, make_benchmark  # noqa: E402
from ewc_fused.demo.methods import FISHERS, MethodSpec, TrainConfig, _balanced_subset, run_method  # noqa: E402
from ewc_fused.demo.metrics import (  # noqa: E402
    average_accuracy, backward_transfer, forgetting, mean_std, seen_average)
from ewc_fused.demo.report import atomic_write_text  # noqa: E402
from ewc_fused.demo.sweep import grid, optuna_available, run_search  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCENARIOS = {"permuted": ["domain_il"], "split": ["task_il", "class_il"]}
TINY = TrainConfig(hidden=(32,), epochs=1)


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature and the chunk CRC."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:16 + length]
    (crc,) = struct.unpack(">I", data[16 + length:20 + length])
    assert zlib.crc32(kind + body) == crc
    assert data.endswith(b"IEND\xaeB`\x82"), f"{path.name} is truncated"
    return struct.unpack(">II", body[:8])


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("bench", ["permuted", "split"])
def test_tiny_demo_writes_json_markdown_and_pngs(bench, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["demo", "--benchmark", bench, "--seeds", "1", "--tasks", "2", "--epochs", "1",
                   "--hidden", "32", "--lambda", "10", "100", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| method | Fisher | λ |" in printed and "wall time" in printed

    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"config", "environment", "benchmarks", "figures", "wall_s"}
    assert list(res["benchmarks"]) == [bench]
    b = res["benchmarks"][bench]
    assert b["scenarios"] == SCENARIOS[bench]
    expected = {"finetune", "ewc-online[exact]", "ewc-reference[exact]", "lwf", "replay", "joint"}
    expected |= {f"ewc[{f}]" for f in FISHERS}
    assert set(b["methods"]) == expected
    for key, m in b["methods"].items():
        run = m["seeds"]["0"]
        for s in b["scenarios"]:
            R = run["R"][s]
            assert len(R) == 2 and all(len(row) == 2 for row in R)
            assert all(0.0 <= a <= 1.0 for row in R for a in row)
            assert run["metrics"][s]["avg_acc"] == pytest.approx(sum(R[1]) / 2)
            assert m["summary"][s]["avg_acc"]["mean"] == pytest.approx(run["metrics"][s]["avg_acc"])
        assert run["train_s"] > 0
    # λ: searched over the given list, per Fisher type, on the validation split
    for f in FISHERS:
        info = b["lambda"][f]
        assert [p["lambda"] for p in info["points"]] == [10.0, 100.0]
        best = max(p["val_score"] for p in info["points"])
        assert info["chosen"] in (10.0, 100.0)
        assert next(p["val_score"] for p in info["points"] if p["lambda"] == info["chosen"]) == best
        assert b["methods"][f"ewc[{f}]"]["lambda"] == info["chosen"]
    cmp_ = b["comparisons"]["fused_vs_reference"]
    assert len(cmp_) == 1 and cmp_[0]["max_abs_weight_diff"] < 1e-4
    assert set(b["fisher_task0"]) == set(FISHERS)
    assert all(len(v["pixel_importance"]) == 64 for v in b["fisher_task0"].values())

    figures = res["figures"][bench]
    want = {f"{bench}_{s}_{k}.png" for s in SCENARIOS[bench] for k in ("curves", "matrices")}
    want |= {f"{bench}_fisher.png", f"{bench}_lambda_sweep.png"}
    assert set(figures) == want
    for name in figures:
        w, h = _png_size(out / name)
        assert w > 100 and h > 100
    report = (out / "report.md").read_text()
    assert "| method | Fisher | λ |" in report
    for m in b["methods"].values():
        assert f"| {m['label']} |" in report
    for name in figures:
        assert f"]({name})" in report
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []


def test_python_m_entry_point_demo_errors():
    r = subprocess.run([sys.executable, "-m", "ewc_fused", "demo", "--tasks", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "--tasks" in r.stderr


# --------------------------------------------------------------------------- fused vs reference
def test_fused_and_reference_ewc_reach_the_same_weights():
    """Same seed, same Fisher tensors, same λ: FusedEWCAdam and the textbook autograd penalty
    with torch.optim.Adam end at the same weights (fp32; tolerance 1e-5 absolute)."""
    bench = make_benchmark("permuted", 3)
    cfg = TrainConfig(hidden=(32,), epochs=1)
    fused = run_method(MethodSpec("f", "ewc", "empirical", 1000.0), bench, cfg, seed=0, keep_fishers=True)
    assert len(fused.fishers) == 2
    ref = run_method(MethodSpec("r", "ewc-reference", "empirical", 1000.0), bench, cfg, seed=0,
                     fishers=fused.fishers)
    plain = run_method(MethodSpec("p", "finetune"), bench, cfg, seed=0)
    for k in fused.state:
        torch.testing.assert_close(fused.state[k], ref.state[k], atol=1e-5, rtol=0)
    # the penalty did something: EWC ends far from fine-tuning, and keeps task 1 better
    assert max(float((fused.state[k] - plain.state[k]).abs().max()) for k in fused.state) > 1e-2
    for row_f, row_r in zip(fused.R["domain_il"], ref.R["domain_il"]):
        assert row_f == pytest.approx(row_r, abs=0.005)
    assert fused.R["domain_il"][2][0] > plain.R["domain_il"][2][0]


def test_runs_are_deterministic_per_seed():
    bench = make_benchmark("split", 2)
    spec = MethodSpec("e", "ewc", "sampled", 3000.0)
    a = run_method(spec, bench, TINY, seed=3)
    b = run_method(spec, bench, TINY, seed=3)
    c = run_method(spec, bench, TINY, seed=4)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert a.R == b.R
    assert not all(torch.equal(a.state[k], c.state[k]) for k in a.state)


def test_tracked_fisher_consolidates_the_running_per_sample_fisher():
    bench = make_benchmark("permuted", 2)
    r = run_method(MethodSpec("t", "ewc", "tracked", 300.0), bench, TINY, seed=0, keep_fishers=True)
    assert len(r.fishers) == 1
    F = r.fishers[0]
    assert set(F) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(bool((f >= 0).all()) and float(f.sum()) > 0 for f in F.values())


# --------------------------------------------------------------------------- metrics
# Rows: after training task i; columns: evaluated on task j.
R_HAND = [
    [0.90, 0.99, 0.10],   # R[0][1] = 0.99 comes before task 1 was trained: forgetting must ignore it
    [0.95, 0.80, 0.20],   # task 0 got better after task 1: its best is 0.95, not R[0][0]
    [0.50, 0.60, 0.70],
]


def test_average_accuracy_forgetting_bwt_on_a_hand_made_matrix():
    # average accuracy: mean of the last row
    assert average_accuracy(R_HAND) == pytest.approx((0.50 + 0.60 + 0.70) / 3)
    # forgetting: task 0: max(R00, R10) − R20 = 0.95 − 0.50; task 1: max(R11) − R21 = 0.80 − 0.60
    assert forgetting(R_HAND) == pytest.approx(((0.95 - 0.50) + (0.80 - 0.60)) / 2)
    # BWT: (R20 − R00 + R21 − R11) / 2
    assert backward_transfer(R_HAND) == pytest.approx(((0.50 - 0.90) + (0.60 - 0.80)) / 2)
    # average over the tasks seen so far, after each task
    assert seen_average(R_HAND) == pytest.approx([0.90, (0.95 + 0.80) / 2, (0.50 + 0.60 + 0.70) / 3])
    # one task: nothing to forget
    assert forgetting([[0.7]]) == 0.0 and backward_transfer([[0.7]]) == 0.0
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[0.1, 0.2]])


def test_mean_std_uses_the_sample_standard_deviation():
    s = mean_std([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3)
    # Σ (x − 7/3)² = 16/9 + 1/9 + 25/9 = 42/9; / (n − 1) = 21/9
    assert s["std"] == pytest.approx((21 / 9) ** 0.5)
    assert mean_std([0.5])["std"] == 0.0


# --------------------------------------------------------------------------- λ search
def test_grid_and_search_pick_the_best_lambda():
    g = grid(100.0, 5)
    assert g == pytest.approx([10.0, 10 ** 1.5, 100.0, 10 ** 2.5, 1000.0])
    score = lambda lam: -abs(torch.tensor(lam).log10().item() - 2.5)  # peak at λ = 10^2.5  # noqa: E731
    res = run_search(score, search="grid", centre=100.0, trials=5, seed=0)
    assert res["chosen"] == pytest.approx(10 ** 2.5) and len(res["points"]) == 5
    r1 = run_search(score, search="random", centre=100.0, trials=4, seed=7)
    r2 = run_search(score, search="random", centre=100.0, trials=4, seed=7)
    assert r1 == r2 and all(10.0 <= p["lambda"] <= 1000.0 for p in r1["points"])
    assert r1["chosen"] == max(r1["points"], key=lambda p: p["val_score"])["lambda"]
    # ties go to the smaller λ; a user's list overrides the search
    flat = run_search(lambda lam: 0.5, search="grid", centre=1.0, trials=3, seed=0, candidates=[30.0, 3.0, 300.0])
    assert flat["chosen"] == 3.0 and flat["search"] == "list"


@pytest.mark.skipif(not optuna_available(), reason="optuna not installed")
def test_optuna_search_stays_in_range_and_picks_its_best():
    score = lambda lam: -abs(torch.tensor(lam).log10().item() - 2.2)  # noqa: E731
    res = run_search(score, search="optuna", centre=100.0, trials=6, seed=0)
    assert res["search"] == "optuna-tpe" and len(res["points"]) == 6
    assert all(10.0 <= p["lambda"] <= 1000.0 for p in res["points"])
    assert res["chosen"] == max(res["points"], key=lambda p: p["val_score"])["lambda"]


def test_parse_lambdas():
    assert parse_lambdas(["auto"]) == "auto"
    assert parse_lambdas(["Default"]) == "default"
    assert parse_lambdas(["100,300", "1e3"]) == (100.0, 300.0, 1000.0)
    for bad, msg in ((["auto", "10"], "cannot be combined"), (["-1"], ">= 0"), (["x"], "not a number"),
                     (["nan"], "finite"), (["10", "10"], "repeated"), ([","], "needs")):
        with pytest.raises(ValueError, match=msg):
            parse_lambdas(bad)


# --------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("argv, needle", [
    (["--tasks", "1"], "--tasks"),
    (["--benchmark", "split", "--tasks", "6"], "split digits has 2 to 5"),
    (["--benchmark", "mnist"], "--benchmark"),
    (["--seeds", "0"], "--seeds"),
    (["--epochs", "-2"], "--epochs"),
    (["--lambda", "-5"], "--lambda"),
    (["--lambda", "auto", "3"], "cannot be combined"),
    (["--lambda", "big"], "not a number"),
    (["--fisher", "exact", "exact"], "repeated"),
    (["--fisher", "diagonal"], "--fisher"),
    (["--methods", "ewc-reference"], "needs ewc"),
    (["--online-decay", "1.5"], "--online-decay"),
    (["--lr", "0"], "--lr"),
    (["--search", "bayes"], "--search"),
])
def test_bad_arguments_exit_2_with_a_message(argv, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--out", str(tmp_path / "o"), "--no-progress", *argv])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_out_must_not_be_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--out", str(f)])
    assert exc.value.code == 2 and "not a folder" in capsys.readouterr().err


@pytest.mark.skipif(optuna_available(), reason="optuna is installed")
def test_optuna_search_without_optuna_is_a_clear_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--search", "optuna", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "optuna is not installed" in capsys.readouterr().err


# --------------------------------------------------------------------------- data and helpers
def test_fixed_stratified_split_and_benchmarks():
    d = load_digits_split()
    sizes = {k: len(v[1]) for k, v in d.items()}
    assert sum(sizes.values()) == 1797
    assert abs(sizes["train"] - 0.6 * 1797) <= 1 and abs(sizes["val"] - sizes["test"]) <= 1
    from sklearn.datasets import load_digits

    y_all = torch.from_numpy(load_digits().target)
    share = torch.bincount(y_all, minlength=10).double() / len(y_all)
    for split, (x, y) in d.items():   # stratified: each class within a sample or two of its share
        counts = torch.bincount(torch.from_numpy(y), minlength=10).double()
        assert float((counts - share * len(y)).abs().max()) <= 2.0, split
    x_train = torch.from_numpy(d["train"][0])
    assert float(x_train.mean(0).abs().max()) < 1e-5
    perm = make_benchmark("permuted", 3)
    t0, t2 = perm.tasks[0], perm.tasks[2]
    assert torch.equal(t0.x["train"], x_train)
    assert torch.equal(t2.x["test"], t0.x["test"][:, t2.permutation]) and torch.equal(t2.y["test"], t0.y["test"])
    assert not torch.equal(t2.permutation, torch.arange(64))
    assert torch.equal(make_benchmark("permuted", 3).tasks[2].permutation, t2.permutation)   # fixed
    split = make_benchmark("split", 5)
    assert [t.classes for t in split.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert all(set(t.y[s].tolist()) == set(t.classes) for t in split.tasks for s in ("train", "val", "test"))
    with pytest.raises(ValueError, match="2 to 5"):
        make_benchmark("split", 6)


def test_replay_buffer_is_class_balanced():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = _balanced_subset(y, 10, torch.Generator().manual_seed(0))
    assert len(idx) == 10 and len(set(idx.tolist())) == 10
    assert sorted(torch.bincount(y[idx], minlength=3).tolist()) == [3, 3, 4]


def test_atomic_write_leaves_no_temp_file_and_a_normal_mode(tmp_path):
    p = tmp_path / "sub" / "r.md"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [q.name for q in p.parent.iterdir()] == ["r.md"]
    mask = os.umask(0)
    os.umask(mask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~mask)
