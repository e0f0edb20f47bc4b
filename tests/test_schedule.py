"""The CCA schedule that lives in the patch: driven by optimizer steps, kept in buffers, and right under the ways
a training loop is written (gradient accumulation, activation checkpointing, EMA, resume, torch.compile)."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import timm_scheme
from timm_scheme import SchemeConfig, cca_weights, scheme_mixers, scheme_patch
from timm_scheme.schedule import FULL, CcaSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                              num_classes=10, drop_path_rate=0.0)
    return scheme_patch(model, groups=4, expansion=4, **{"cca": True, **options})


def data(steps: int, batch: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 16, 16, generator=generator), torch.randint(0, 10, (batch,), generator=generator))
            for _ in range(steps)]


def train(model, batches, optimizer, scheduler=None, accumulate: int = 1, first_update: int = 0):
    model.train()
    for i, (x, y) in enumerate(batches):
        loss = F.cross_entropy(model(x), y) / accumulate
        loss.backward()
        if (i + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step_update(num_updates=first_update + (i + 1) // accumulate)


def clock(model):
    """(steps, cap in millionths) of every mixer, read from the buffers."""
    return {n: (int(m.cca_step), int(m.cca_fade)) for n, m in scheme_mixers(model).items()}


# --- the schedules themselves -------------------------------------------------------------------------------

def test_step_schedule_is_the_cosine_of_its_definition():
    schedule = CcaSchedule(mode="steps", steps=10, start=0.4)
    for step in range(12):
        t = min(max((step / 10 - 0.4) / 0.6, 0.0), 1.0)
        want = 0.0 if t >= 1 else 0.5 * (1 + math.cos(math.pi * t))
        assert schedule.cap(step, None, 0.0) == pytest.approx(want, abs=1e-12)
    assert schedule.cap(10, None, 0.0) == 0.0


def test_lr_schedule_follows_the_learning_rate_down_to_its_floor():
    schedule = CcaSchedule(mode="lr", lr_floor=0.1)
    assert schedule.cap(1, 1e-3, 1e-3) == 1.0           # at the peak
    assert schedule.cap(2, 0.55e-3, 1e-3) == pytest.approx(0.5)
    assert schedule.cap(3, 0.1e-3, 1e-3) == 0.0          # at the floor and below
    assert schedule.cap(4, 0.0, 1e-3) == 0.0
    assert CcaSchedule(mode="off").cap(5, 0.0, 1e-3) == 1.0


@pytest.mark.parametrize("options, message", [
    (dict(cca_anneal="steps"), "needs cca_anneal_steps >= 1"),
    (dict(cca_anneal_steps=0), "needs cca_anneal_steps >= 1"),
    (dict(cca_anneal_steps=1.5), "whole number of optimizer steps"),
    (dict(cca_anneal="lr", cca_anneal_steps=10), "used by cca_anneal='steps' only"),
    (dict(cca_anneal="cosine"), "expected one of"),
    (dict(cca_anneal_start=1.0), r"cca_anneal_start=1.0: expected a fraction in \[0, 1\)"),
    (dict(cca_lr_floor=0.0), r"cca_lr_floor=0.0: expected a fraction in \(0, 1\)"),
])
def test_bad_schedule_options_say_what_would_work(options, message):
    with pytest.raises(ValueError, match=message):
        SchemeConfig(**options)


def test_config_records_the_schedule_in_effect():
    assert SchemeConfig().cca is False and SchemeConfig().cca_anneal == "lr"
    assert not any(m.has_cca for m in scheme_mixers(scheme_patch(timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2))).values())
    assert SchemeConfig(cca_anneal_steps=100).cca_anneal == "steps"
    assert SchemeConfig.from_dict(SchemeConfig(cca_anneal_steps=100).to_dict()) == SchemeConfig(cca_anneal_steps=100)


# --- the clock: optimizer steps -------------------------------------------------------------------------------

def test_cca_anneals_out_under_a_timm_cosine_schedule_with_no_change_to_the_loop():
    """The one-line patch with CCA (default schedule "lr") and timm's own optimizer and scheduler factories:
    nothing else in the loop, and CCA is gone by the end, so the eval / fused function is the one the last steps
    trained."""
    model = tiny()
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3)
    scheduler, _ = create_scheduler_v2(optimizer, "cosine", num_epochs=4, warmup_epochs=1, min_lr=0,
                                       step_on_epochs=False, updates_per_epoch=5)
    batches = data(20)
    caps = []
    for epoch in range(4):
        train(model, batches[epoch * 5:(epoch + 1) * 5], optimizer, scheduler, first_update=epoch * 5)
        caps.append(next(iter(clock(model).values()))[1] / FULL)
    assert caps[0] == 1.0 and caps[1] < 1.0 and caps[-1] == 0.0 and caps == sorted(caps, reverse=True)
    assert all(w == 0.0 for w in cca_weights(model).values())
    x = batches[0][0]
    model.eval()
    with torch.no_grad(), timm_scheme.cca_in_eval(model):
        trained = model(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained, rtol=0, atol=0)


def test_counts_optimizer_steps_under_gradient_accumulation():
    model = tiny(cca_anneal_steps=6, cca_anneal_start=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    train(model, data(12), optimizer, accumulate=3)  # 12 micro-batches, 4 optimizer steps
    # the documented "steps" rule: a cosine from 1 at step 0 to 0 at step 6, so 0.5 (1 + cos(4/6 pi)) = 1/4 at 4
    assert set(clock(model).values()) == {(4, FULL // 4)}


def test_recomputed_forwards_of_activation_checkpointing_are_not_steps():
    a, b = tiny(cca_anneal_steps=8, cca_anneal_start=0.0), tiny(cca_anneal_steps=8, cca_anneal_start=0.0)
    b.set_grad_checkpointing(True)
    batches = data(3)
    for model in (a, b):
        train(model, batches, torch.optim.SGD(model.parameters(), lr=0.05))
    assert set(clock(b).values()) == {(3, clock(a)["blocks.0.mlp"][1])}
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_an_optimizer_that_does_not_hold_the_mixing_logits_does_not_advance_it():
    model = tiny(cca_anneal_steps=4)
    others = [p for n, p in model.named_parameters() if not n.endswith("mix_logits")]
    train(model, data(2), torch.optim.SGD(others, lr=0.01))
    assert set(clock(model).values()) == {(0, FULL)}


def test_ema_copies_the_clock_and_computes_the_model_s_cap():
    model = tiny(cca_anneal_steps=5, cca_anneal_start=0.0)
    ema = ModelEmaV3(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for batch in data(3):
        train(model, [batch], optimizer)
        ema.update(model)
    assert clock(ema.module) == clock(model)
    for (name, mixer), twin in zip(scheme_mixers(model).items(), scheme_mixers(ema.module).values()):
        torch.testing.assert_close(twin._anneal_factor(), mixer._anneal_factor(), msg=name)


def test_resume_from_a_state_dict_repeats_the_uninterrupted_run():
    batches = data(6)
    straight = tiny(cca_anneal_steps=6, cca_anneal_start=0.2)
    optimizer = torch.optim.AdamW(straight.parameters(), lr=1e-3)
    train(straight, batches, optimizer)

    first = tiny(cca_anneal_steps=6, cca_anneal_start=0.2)
    optimizer = torch.optim.AdamW(first.parameters(), lr=1e-3)
    train(first, batches[:3], optimizer)
    saved = copy.deepcopy((first.state_dict(), optimizer.state_dict()))
    resumed = tiny(cca_anneal_steps=6, cca_anneal_start=0.2)
    resumed.load_state_dict(saved[0])
    optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    optimizer.load_state_dict(saved[1])
    assert clock(resumed) == clock(first)
    train(resumed, batches[3:], optimizer)
    assert clock(resumed) == clock(straight) == {n: (6, 0) for n in clock(straight)}
    for key, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], tensor, rtol=1e-5, atol=1e-7, msg=key)
    assert all(m._cca_skipped for m in scheme_mixers(resumed).values())  # annealed out: CCA no longer computed


def test_compiled_model_follows_the_cap_as_it_moves():
    model = tiny(cca_anneal_steps=4, cca_anneal_start=0.0)
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = data(1)[0][0]
    for batch in data(5):
        model.train()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
        train(model, [batch], optimizer)
    assert set(clock(model).values()) == {(5, 0)}


def test_checkpoints_written_before_the_schedule_load_with_a_fresh_clock():
    """Format 1: unfused mixers without cca_step / cca_fade / cca_lr_peak; they load as not yet annealed."""
    model = tiny()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(("cca_step", "cca_fade", "cca_lr_peak"))}
    fresh = tiny()
    for mixer in scheme_mixers(fresh).values():
        mixer.advance_cca_schedule(1e-3)
        mixer.advance_cca_schedule(1e-5)
    fresh.load_state_dict(state)
    assert set(clock(fresh).values()) == {(0, FULL)}
