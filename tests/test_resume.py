"""Exact resume: a run interrupted before any event (step, Fisher estimate and file,
consolidation, λ change, scheduler step), checkpointed (model, optimizer and scheduler
``state_dict`` with ``torch.save``, the Fisher files with ``save_fisher``) and resumed in a
fresh process ends bit for bit where the uninterrupted run ends: parameters, the whole
optimizer state, penalty, running Fisher and learning rate. On both backends, across two
consolidations (a Fisher file, then the tracked running Fisher), with ``track_fisher``
on (installed again after loading: its per-sample sums are empty between steps) and
one non-finite step skipped.

The program is tests/resume_program.py. The child process (``TRITON_INTERPRET=1``
inherited for the triton backend) resumes from every checkpoint in turn, each into a
fresh model, optimizer, scheduler and tracker; its first resume, with nothing run before
it in that process, is the one between writing a Fisher file and consolidating with it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_same_state
from tests.resume_program import EVENTS, INF_STEP, Program

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _uninterrupted(backend, tmp_path):
    """The whole run in this process, checkpointed before every event (and at the end)."""
    work = tmp_path / "run"
    work.mkdir()
    prog = Program(backend, work)
    ckpts = []
    for i in range(len(EVENTS) + 1):
        ckpts.append(tmp_path / f"ckpt_{i:02d}")
        prog.save(ckpts[-1])
        prog.run(until=i + 1)
    assert prog.opt.skipped_steps == 1  # the inf batch
    return prog.final_state(), ckpts


def _resume_in_child(backend, ckpts, out):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "tests.resume_program", backend, str(out), *map(str, ckpts)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_resume_in_a_fresh_process_is_bit_identical(backend, tmp_path):
    final, ckpts = _uninterrupted(backend, tmp_path)
    assert final["penalty"] > 0 and final["running_fisher"]
    # The child's first resume is the one nothing ran before in that process: make it the
    # checkpoint taken between writing task A's Fisher file and consolidating with it.
    first = EVENTS.index(("consolidate", "A"))
    order = [first] + [i for i in range(len(ckpts)) if i != first]
    results = _resume_in_child(backend, [ckpts[i] for i in order], tmp_path / "resumed.pt")
    assert [r["resumed_at"] for r in results] == order
    for r in results:
        where = f"resumed before event {r['resumed_at']} ({EVENTS[r['resumed_at']] if r['resumed_at'] < len(EVENTS) else 'end'})"
        for name, p in final["params"].items():
            assert torch.equal(r["params"][name], p), f"{where}: {name}"
        assert_same_state(final["opt"], r["opt"], f"{where}: optimizer state_dict")
        assert_same_state(final["sched"], r["sched"], f"{where}: scheduler state_dict")
        assert torch.equal(final["penalty"], r["penalty"]), where
        assert_same_state(final["running_fisher"], r["running_fisher"], f"{where}: running Fisher")
        assert final["lr"] == r["lr"], where


def test_resumed_runs_really_differ_from_a_run_without_the_checkpoint(tmp_path):
    """The comparison above can fail: a resume that drops the EWC state (loading only
    torch.optim.Adam's part), or the running Fisher's step count, ends elsewhere."""
    final, ckpts = _uninterrupted("torch", tmp_path)
    i = EVENTS.index(("step", INF_STEP + 1))  # after the first consolidation, before the second
    for drop in (("ewc_fisher", "ewc_anchor", "ewc_const"), ("fisher_ema_step",)):
        prog = Program("torch", ckpts[i])
        sd = torch.load(ckpts[i] / "ckpt.pt", weights_only=True)
        prog.model.load_state_dict(sd["model"])
        opt_sd = sd["opt"]
        for st in opt_sd["state"].values():
            for k in drop:
                if k == "fisher_ema_step":
                    st[k] = st[k] * 0 + 1
                else:
                    st.pop(k)
        prog.opt.load_state_dict(opt_sd)
        prog.sched.load_state_dict(sd["sched"])
        prog.next = sd["next"]
        prog.run()
        got = prog.final_state()
        assert any(not torch.equal(got["params"][n], p) for n, p in final["params"].items()), drop
