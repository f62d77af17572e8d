"""The benchmark (``ewc-fused bench``): a tiny end-to-end run, and the variants it times
computing the same update (so the bench cannot silently time something different)."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from ewc_fused.bench import step as bstep
from ewc_fused.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# bytes per element of fp32 parameters: θ, g, m, v (7 accesses × 4), + F and θ* reads, + F_run read and write
FLOOR_BYTES_FP32 = {"adam_foreach": 28, "adam_fused": 28, "adam_fused_amsgrad": 36, "ewc_autograd": 36, "ewc_foreach_fused": 36,
                    "fused_ewc[torch,fp32]": 36, "fused_ewc[torch,fp32,ema]": 44,
                    "fused_ewc[torch,bf16]": 32, "fused_ewc[torch,bf16,ema]": 36}


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_bench_tiny_through_cli(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        rc = main(["bench", "all", "--tiny", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out_dir = tmp_path / "cpu" / "tiny"

    step = json.loads((out_dir / "step.json").read_text())
    assert step["benchmark"] == "step" and step["env"]["device_type"] == "cpu"
    for key in ("torch", "cpu", "cpu_cores", "memory_method", "ewc_fused"):
        assert step["env"][key]
    names = step["variants"]
    assert {"adam_foreach", "adam_fused", "ewc_autograd", "ewc_foreach_fused", "fused_ewc[torch,fp32]",
            "fused_ewc[torch,fp32,ema]", "fused_ewc[torch,bf16]"} <= set(names)
    assert [c["kind"] for c in step["configs"]] == ["gpt", "small"]
    for c in step["configs"]:
        assert set(c["results"]) == set(names)
        for name, r in c["results"].items():
            assert "error" not in r, (c["name"], name, r)
            assert len(r["times_ms"]) == 1 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
            assert r["floor_bytes"] == c["params"] * FLOOR_BYTES_FP32[name]
            assert r["peak_extra_bytes"] >= 0 and r["state_bytes"] > 0
        assert c["results"]["adam_fused"]["vs_adam_fused"] == 1.0

    fisher = json.loads((out_dir / "fisher.json").read_text())
    assert [w["name"] for w in fisher["workloads"]] == ["mlp", "seq"]
    for w in fisher["workloads"]:
        res = w["results"]
        assert "skipped" in res["estimate_fisher[triton]"]  # no CUDA here
        for name in ("plain", "estimate_fisher[torch]", "per_sample_loop", "vmap", "train_plain", "train_ema"):
            assert "median_ms" in res[name], (w["name"], name, res[name])
        assert res["plain"]["vs_base"] == 1.0 and res["train_plain"]["vs_base"] == 1.0
        # every Fisher method computed the per-sample loop's Fisher (fp32 rounding only)
        for name, r in res.items():
            if "max_rel_err" in r and r["max_rel_err"] is not None:
                assert r["max_rel_err"] < 1e-4, (w["name"], name, r["max_rel_err"])
        assert res["estimate_fisher[torch]"]["covered"] == res["estimate_fisher[torch]"]["tensors"]

    md = (out_dir / "results.md").read_text()
    assert "## Optimizer step" in md and "## Per-sample Fisher" in md
    assert "| variant | EWC state | ms/step |" in md and "| fused_ewc[torch,fp32] |" in md
    assert "| estimate_fisher[torch] |" in md
    for png in ("step_time.png", "step_bandwidth.png", "fisher.png"):
        w, h = _png_size(out_dir / png)
        assert w > 200 and h > 200
        assert f"]({png})" in md
    assert "## Optimizer step" in capsys.readouterr().out


def _two_steps(name: str, cfg: bstep.Config) -> list[torch.Tensor]:
    """θ after two steps of variant ``name`` on fresh tensors, with new gradients before the second."""
    t = bstep.build(cfg, torch.device("cpu"))
    params = t.params
    v = bstep.make_variant(name, t, torch.device("cpu"))
    v.step()
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
    v.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bench_variants_compute_the_same_update(dtype):
    cfg = bstep.Config("t", [(33, 17), (64,), (5, 7, 3)], dtype, "gpt")
    adam = _two_steps("adam_fused", cfg)
    ewc = _two_steps("ewc_autograd", cfg)
    # the penalty matters: EWC moves θ differently from Adam
    assert max(float((a.float() - e.float()).abs().max()) for a, e in zip(adam, ewc)) > 1e-4
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "fp32" else dict(rtol=1e-2, atol=1e-2)
    for a, b in zip(adam, _two_steps("adam_foreach", cfg)):
        torch.testing.assert_close(b.float(), a.float(), **tol)
    for name in ("ewc_foreach_fused", "fused_ewc[torch,fp32]", "fused_ewc[torch,fp32,ema]"):
        for e, b in zip(ewc, _two_steps(name, cfg)):
            torch.testing.assert_close(b.float(), e.float(), **tol, msg=lambda m: f"{name}: {m}")
    # bf16 EWC state rounds F and θ*: the same update to within that rounding
    for name in ("fused_ewc[torch,bf16]", "fused_ewc[torch,bf16,ema]"):
        for e, b in zip(ewc, _two_steps(name, cfg)):
            torch.testing.assert_close(b.float(), e.float(), rtol=1e-2, atol=3e-4, msg=lambda m: f"{name}: {m}")


def test_bench_amsgrad_control_is_amsgrad():
    """The same-bytes control is AMSGrad: after one large gradient v decays (0.1% a step) while
    AMSGrad keeps its max, so 40 steps tell it apart from Adam."""
    cfg = bstep.Config("t", [(33, 17), (64,), (5, 7, 3)], "fp32", "gpt")
    tol = dict(rtol=1e-5, atol=1e-7)
    t = bstep.build(cfg, torch.device("cpu"))
    ref = [p.detach().clone().requires_grad_() for p in t.params]
    ref_opt = torch.optim.Adam(ref, lr=bstep.LR, amsgrad=True, foreach=True)
    step = bstep.make_variant("adam_fused_amsgrad", t, torch.device("cpu")).step
    adam_opt = torch.optim.Adam(plain := [p.detach().clone().requires_grad_() for p in t.params], lr=bstep.LR)
    for k in range(40):
        for p, r, q in zip(t.params, ref, plain):
            r.grad, q.grad = p.grad.detach().clone(), p.grad.detach().clone()
        step()
        ref_opt.step()
        adam_opt.step()
        if k == 0:
            for p in t.params:
                p.grad.mul_(0.01)
    for a, b in zip(ref, t.params):
        torch.testing.assert_close(b.detach().float(), a.detach().float(), **tol)
    assert max(float((a.float() - b.detach().float()).abs().max()) for a, b in zip(plain, t.params)) > 1e-5


@pytest.mark.slow
def test_bench_compiled_variants_compute_the_same_update():
    cfg = bstep.Config("t", [(33, 17), (64,)], "fp32", "gpt")
    ewc = _two_steps("ewc_autograd", cfg)
    bstep._reset_dynamo()
    for name in ("ewc_compiled_foreach", "ewc_compiled_fused"):
        for e, b in zip(ewc, _two_steps(name, cfg)):
            torch.testing.assert_close(b, e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_probe_tiny(tmp_path, one_thread):
    """The CPU probe behind the README's "what limits the CPU step" (``ewc-fused bench probe``): it
    runs end to end and its byte accounting matches the variants (timings mean nothing at this size)."""
    assert main(["bench", "probe", "--sizes", "2e5", "--repeats", "1", "--no-compile", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "cpu" / "probe.json").read_text())
    res = data["results"]
    assert set(res) == {"adam_fused", "adam_fused_amsgrad", "sub_only", "penalty_only", "fused_ewc_torch"}
    assert res["adam_fused"]["vs_adam_fused"] == 1.0
    for name, acc in (("adam_fused", 7), ("adam_fused_amsgrad", 9), ("penalty_only", 4), ("fused_ewc_torch", 9)):
        r = res[name]
        assert r["accesses"] == acc
        assert r["gb_per_s"] == pytest.approx(acc * 4 * data["params"] / (r["median_ms"] * 1e-3) / 1e9)
    assert (tmp_path / "cpu" / "probe.md").read_text().startswith("## CPU probe")


def test_probe_compiled_update_is_ewc_adam(one_thread):
    """The probe's one-pass update (run eagerly here) is the EWC-Adam step of torch's Adam with
    the penalty gradient added, to fp32 rounding."""
    from ewc_fused.bench import probe

    torch.manual_seed(0)
    p, g, f, c = torch.randn(300), torch.randn(300), torch.rand(300), torch.randn(300)
    m, v = torch.zeros(300), torch.zeros(300)
    ref = p.clone().requires_grad_()
    ref.grad = g + bstep.LAMBDA * f * (p - c)
    torch.optim.Adam([ref], lr=bstep.LR, foreach=False).step()
    h = torch.tensor([bstep.LR, 0.9, 0.999, 1e-8, bstep.LAMBDA, 1 - 0.9, (1 - 0.999) ** 0.5])
    probe._ewc_update(p, g, m, v, f, c, h)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-6, atol=1e-7)
