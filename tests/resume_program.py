"""A small continual-learning program for the exact-resume tests (tests/test_resume.py).

Three tasks on a tiny MLP with ``FusedEWCAdam`` (AMSGrad, weight decay, a running Fisher
fed by ``track_fisher``, ``nonfinite="skip"``), a StepLR scheduler, and these events:

* task A: 4 steps; ``estimate_fisher`` → ``save_fisher`` (a file); ``load_fisher`` →
  ``consolidate`` (multi); the scheduler steps;
* task B: 4 steps, one of them with an inf in the batch (skipped); ``consolidate()`` from the
  tracked running Fisher (online, decay 0.5); λ changes; the scheduler steps;
* task C: 3 steps.

A checkpoint can be taken before any event: the model's and the optimizer's
``state_dict()`` and the scheduler's, ``torch.save``d, next to the Fisher files written so
far. Resuming builds everything afresh, loads the checkpoint, installs the tracker again
and runs the remaining events. Batches come from generators seeded by the event, so a
resumed run sees the same data.

Run as a module, it resumes in this fresh process from each checkpoint directory given,
one after the other (fresh model, optimizer, scheduler and tracker each time), and
``torch.save``s the final state of each to OUT::

    python -m tests.resume_program BACKEND OUT CKPT_DIR [CKPT_DIR ...]
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ewc_fused import FusedEWCAdam, estimate_fisher, load_fisher, save_fisher

EVENTS = (
    [("step", k) for k in range(0, 4)] + [("fisher", "A"), ("consolidate", "A"), ("sched",)]
    + [("step", k) for k in range(4, 8)] + [("consolidate_running",), ("lambda", 7.0), ("sched",)]
    + [("step", k) for k in range(8, 11)]
)
INF_STEP = 6  # this batch holds an inf: the step is skipped (nonfinite="skip")


def _batch(k: int):
    g = torch.Generator().manual_seed(1000 + k)
    x = torch.randn(8, 6, generator=g)
    if k == INF_STEP:
        x[3, 2] = float("inf")
    return x, torch.randint(0, 3, (8,), generator=g)


class Program:
    """Model, optimizer, scheduler and tracker of one run, and where its Fisher files go."""

    def __init__(self, backend: str, workdir: Path):
        torch.manual_seed(0)
        self.backend = backend
        self.workdir = Path(workdir)
        self.model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.opt = FusedEWCAdam(self.model.named_parameters(), lr=2e-2, amsgrad=True, weight_decay=1e-3,
                                ewc_lambda=3.0, fisher_ema=0.8, nonfinite="skip", backend=backend)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=0.5)
        self.tracker = self.opt.track_fisher(self.model)
        self.next = 0  # index of the next event

    def run(self, until: int = len(EVENTS)) -> None:
        while self.next < min(until, len(EVENTS)):
            self._event(EVENTS[self.next])
            self.next += 1

    def _event(self, ev) -> None:
        kind = ev[0]
        if kind == "step":
            x, y = _batch(ev[1])
            self.opt.zero_grad()
            F.cross_entropy(self.model(x), y).backward()
            self.opt.step()
        elif kind == "fisher":
            data = [_batch(k) for k in range(4)]
            fisher = estimate_fisher(self.model, data, nn.CrossEntropyLoss(reduction="none"),
                                     backend=self.backend, progress=False)
            save_fisher(self.workdir / f"task_{ev[1]}.fisher.safetensors", fisher, task=ev[1])
        elif kind == "consolidate":
            self.opt.consolidate(load_fisher(self.workdir / f"task_{ev[1]}.fisher.safetensors", self.model))
        elif kind == "consolidate_running":
            self.opt.consolidate(mode="online", decay=0.5)
        elif kind == "lambda":
            self.opt.param_groups[0]["ewc_lambda"] = ev[1]
        elif kind == "sched":
            self.sched.step()
        else:  # pragma: no cover
            raise ValueError(ev)

    # ------------------------------------------------------------------ checkpoints
    def save(self, ckpt: Path) -> None:
        """Write a checkpoint of the run as it is now (between events) to directory ``ckpt``."""
        ckpt = Path(ckpt)
        ckpt.mkdir(parents=True)
        for f in self.workdir.glob("*.fisher.safetensors"):
            shutil.copy2(f, ckpt / f.name)
        tmp = ckpt / ".ckpt.pt.tmp"
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                    "sched": self.sched.state_dict(), "next": self.next}, tmp)
        os.replace(tmp, ckpt / "ckpt.pt")

    @classmethod
    def resume(cls, backend: str, ckpt: Path) -> "Program":
        """A fresh program continued from ``ckpt`` (its Fisher files are read and written there)."""
        prog = cls(backend, ckpt)
        sd = torch.load(Path(ckpt) / "ckpt.pt", weights_only=True)
        prog.model.load_state_dict(sd["model"])
        prog.opt.load_state_dict(sd["opt"])
        prog.sched.load_state_dict(sd["sched"])
        prog.next = sd["next"]
        return prog

    def final_state(self) -> dict:
        self.tracker.remove()
        return {
            "params": {n: p.detach().clone() for n, p in self.model.named_parameters()},
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "penalty": self.opt.ewc_penalty(),
            "running_fisher": self.opt.running_fisher(),
            "lr": [g["lr"] for g in self.opt.param_groups],
        }


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)  # as the test process runs it (tests/test_resume.py)
    backend, out, *dirs = argv
    results = []
    for d in dirs:
        prog = Program.resume(backend, Path(d))
        prog.run()
        results.append({"resumed_at": torch.load(Path(d) / "ckpt.pt", weights_only=True)["next"],
                        **prog.final_state()})
    torch.save(results, out)
    print(f"resumed {len(results)} checkpoints")


if __name__ == "__main__":
    main(sys.argv[1:])
