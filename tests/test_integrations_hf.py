"""Hugging Face Trainer + EWCCallback (+ PEFT LoRA), offline, on tiny randomly initialised models.

Task A and task B share their inputs (token sequences) and disagree on the labels, so
training on B drags the weights away from task A unless EWC holds them.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments)

from ewc_fused import FusedEWCAdamW, estimate_fisher  # noqa: E402
from ewc_fused.integrations.transformers import (  # noqa: E402
    EWCCallback, _pairs, ewc_optimizer, per_sample_loss, unwrap_optimizer)

VOCAB, T, N = 40, 8, 64
CONSOLIDATED = ("ewc_fisher", "ewc_anchor", "ewc_const")


def _bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=16, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


class _Task(torch.utils.data.Dataset):
    """Random token sequences; task "a": is the first token even; task "b": is it below VOCAB / 2."""

    def __init__(self, task: str) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, VOCAB, (N, T), generator=g)
        first = self.ids[:, 0]
        self.labels = (first % 2 == 0).long() if task == "a" else (first < VOCAB // 2).long()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        # position_ids given per sample: estimate_fisher needs every module's input sample-first, and BERT
        # would otherwise call its position embedding with one (1, T) row shared by the batch
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(T, dtype=torch.long),
                "position_ids": torch.arange(T), "labels": self.labels[i]}


def _trainer(tmp_path, model, task: str, cb: EWCCallback, opt=None, steps: int = 20, **kw) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=steps, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_strategy="no", save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    optimizers = (opt, None) if opt is not None else (None, None)
    return Trainer(model=model, args=args, train_dataset=_Task(task), optimizers=optimizers, callbacks=[cb], **kw)


def _fisher_data():
    return torch.utils.data.DataLoader(_Task("a"), batch_size=16)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in _trainable(model).items()}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is ~20x faster than two on a busy 2-core machine (no spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="module")
def full_runs(tmp_dir):
    """Full fine-tuning, task A then task B, with λ = 300 and with λ = 0 (no EWC)."""
    out = {}
    for lam in (0.0, 300.0):
        model = _bert()
        opt = ewc_optimizer(model, lr=3e-3, ewc_lambda=lam)
        cb = EWCCallback(data=_fisher_data())
        _trainer(tmp_dir, model, "a", cb, opt).train()
        run = dict(theta_a=_snapshot(model), consolidations_a=cb.consolidations,
                   state_a={n: {k: opt.state[p][k].clone() for k in CONSOLIDATED}
                            for n, p in _trainable(model).items() if "ewc_fisher" in opt.state[p]})
        run["fisher_a"] = estimate_fisher(model.eval(), _pairs(_fisher_data(), "labels", torch.device("cpu")),
                                          per_sample_loss, progress=False)
        model.train()
        _trainer(tmp_dir, model, "b", cb, opt).train()
        run.update(theta_b=_snapshot(model), consolidations=cb.consolidations, penalty=float(opt.ewc_penalty()))
        out[lam] = run
    return out


def test_per_sample_loss_matches_the_models_own_loss():
    model = _bert()
    batch = next(iter(_fisher_data()))
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    torch.testing.assert_close(per_sample_loss(out, batch["labels"]).mean(), model(**batch).loss,
                               rtol=1e-6, atol=1e-7)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                    bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, VOCAB, (4, T))
    labels = ids.clone()
    labels[0, 5:] = -100  # padding
    per = per_sample_loss(lm(input_ids=ids), labels, shift=True)
    assert per.shape == (4,)
    n_tokens = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(per.sum() / n_tokens, lm(input_ids=ids, labels=labels).loss, rtol=1e-6, atol=1e-7)


def test_callback_consolidates_at_the_end_of_each_task(full_runs):
    run = full_runs[300.0]
    assert run["consolidations_a"] == 1 and run["consolidations"] == 2
    assert set(run["state_a"]) == set(run["theta_a"])  # every trainable parameter
    for n, st in run["state_a"].items():
        assert torch.equal(st["ewc_anchor"], run["theta_a"][n]), n  # θ* = the weights at the end of task A
        torch.testing.assert_close(st["ewc_fisher"], run["fisher_a"][n], rtol=1e-6, atol=0)  # estimate_fisher's
        assert float(st["ewc_const"]) == 0.0
    assert run["penalty"] > 0


def test_ewc_holds_the_task_a_weights(full_runs):
    ewc, plain = full_runs[300.0], full_runs[0.0]
    for n in ewc["theta_a"]:  # the same task-A training: λ acts only after the first consolidation
        assert torch.equal(ewc["theta_a"][n], plain["theta_a"][n]), n

    def pull(run):  # Σ F_A (θ_B − θ_A)²: how far task B moved the weights that mattered for A
        return sum(float((run["fisher_a"][n].double() * (run["theta_b"][n] - run["theta_a"][n]).double() ** 2).sum())
                   for n in run["fisher_a"])

    assert pull(ewc) < 0.1 * pull(plain), (pull(ewc), pull(plain))
    assert pull(plain) > 0


def test_running_fisher_callback(tmp_dir):
    model = _bert()
    opt = ewc_optimizer(model, lr=3e-3, ewc_lambda=10.0, fisher_ema=0.9)
    cb = EWCCallback(fisher="running")
    _trainer(tmp_dir, model, "a", cb, opt, steps=8).train()
    running = opt.running_fisher()
    assert cb.consolidations == 1 and set(running) == set(_trainable(model))
    by_name = _trainable(model)
    for n, f in running.items():
        torch.testing.assert_close(opt.state[by_name[n]]["ewc_fisher"], f, rtol=1e-6, atol=0)


def test_callback_refuses_what_cannot_work(tmp_dir):
    with pytest.raises(ValueError, match="Invalid fisher"):
        EWCCallback(fisher="diagonal")
    model = _bert()
    before = _snapshot(model)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(TypeError, match="FusedEWCAdam"):
        _trainer(tmp_dir, model, "a", EWCCallback(), plain).train()
    with pytest.raises(ValueError, match="fisher_ema"):
        _trainer(tmp_dir, model, "a", EWCCallback(fisher="running"), ewc_optimizer(model)).train()
    for n, p in _trainable(model).items():  # refused before the first step
        assert torch.equal(p, before[n]), n


def test_peft_lora_only_adapters_carry_ewc_state(tmp_dir):
    peft = pytest.importorskip("peft")
    base = _bert()
    frozen_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                     target_modules=["query", "value"]))
    trainable = _trainable(model)
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    opt = ewc_optimizer(model, lr=3e-3, ewc_lambda=300.0)
    cb = EWCCallback()  # the Fisher over the Trainer's own train dataloader
    _trainer(tmp_dir, model, "a", cb, opt).train()
    with_state = {n for n, p in model.named_parameters() if "ewc_fisher" in opt.state.get(p, {})}
    assert with_state == set(trainable)
    assert all(float(opt.state[p]["ewc_fisher"].sum()) > 0 for p in trainable.values())
    # task B with an optimizer the Trainer builds itself: the callback carries task A into it
    kwargs = dict(lr=3e-3, ewc_lambda=300.0)
    trainer = _trainer(tmp_dir, model, "b", cb, optimizer_cls_and_kwargs=(FusedEWCAdamW, kwargs))
    trainer.train()
    new = unwrap_optimizer(trainer.optimizer)
    assert new is not opt
    for n, p in model.named_parameters():
        if n in trainable:
            assert "ewc_fisher" in new.state[p], n
        else:
            assert p not in new.state or "ewc_fisher" not in new.state[p], n
            assert not p.requires_grad
    assert float(new.ewc_penalty()) > 0
    assert cb.consolidations == 2
    for n, p in model.get_base_model().named_parameters():  # LoRA leaves the base weights alone
        key = n.replace(".base_layer", "")
        if key in frozen_before and "lora_" not in n and "modules_to_save" not in n and not p.requires_grad:
            assert torch.equal(p, frozen_before[key]), n
