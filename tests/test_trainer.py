"""The training core's seams, in this process: the loop and its callbacks, stop reasons and outcomes, the
checkpoint manager's policy. One rank over gloo (a real process group of one), a tiny model, no spawning."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest
import torch
import torch.distributed as dist

from resnet_ddp.config import CheckpointConfig
from resnet_ddp.core import checkpoint
from resnet_ddp.core.callbacks import Callback, Callbacks
from resnet_ddp.core.checkpoint import EPOCH_END, INTERVAL, STOP, CheckpointManager
from resnet_ddp.core.distributed import RankInfo
from resnet_ddp.core.outcome import RunOutcome
from resnet_ddp.core.progress import Progress, TrainState
from resnet_ddp.core.stopping import RunLength, StopAgreement, StopReason
from resnet_ddp.core.trainer import Trainer

CPU = torch.device("cpu")
RANK = RankInfo(0, 1, 0, 1, CPU)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """A process group of this one process, for the collectives the core runs at every step."""
    store = tmp_path_factory.mktemp("store") / "file"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.new_group(backend="gloo")
    dist.destroy_process_group()


@pytest.fixture
def stop_handlers():
    """StopAgreement installs handlers for SIGTERM and SIGINT: give pytest its own back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


class Batches:
    """An epoch of `steps` batches, from a step on, as the real sources give them."""

    data_wait_s = 0.0

    def __init__(self, steps: int):
        self.steps_per_epoch = steps

    def epoch(self, epoch, start_step=0):
        for step in range(start_step, self.steps_per_epoch):
            yield torch.full((1,), float(epoch)), torch.full((1,), float(step))


class Recorder(Callback):
    """Notes every call as (name, method, global step)."""

    def __init__(self, name, calls, stop_at=None):
        self.name, self.calls, self.stop_at = name, calls, stop_at

    def on_start(self, state):
        self.calls.append((self.name, "on_start", state.global_step))

    def on_epoch_start(self, state):
        self.calls.append((self.name, "on_epoch_start", state.global_step))

    def before_step(self, state):
        self.calls.append((self.name, "before_step", state.global_step))

    def after_step(self, state):
        self.calls.append((self.name, "after_step", state.global_step))
        if state.global_step == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as Kubernetes would: the handler only sets a flag

    def between_steps(self, state):
        self.calls.append((self.name, "between_steps", state.global_step))

    def on_epoch_end(self, state, losses):
        self.calls.append((self.name, "on_epoch_end", state.global_step))

    def on_end(self, state, outcome):
        self.calls.append((self.name, "on_end", outcome.exit_reason))


class Saves:
    """The checkpoint manager's part, noted: what the loop asks to save, and when."""

    diverged = None

    def __init__(self, calls):
        self.calls = calls

    def maybe_save(self, state, why):
        self.calls.append(("checkpoints", why, state.global_step))


def _trainer(group, calls, callbacks, epochs=2, steps=2, max_steps=None, progress=None):
    progress = progress or Progress()
    state = TrainState(progress, steps, CPU)
    length = RunLength.of(epochs, max_steps, None, progress.global_step, progress.epoch, progress.step_in_epoch, steps)
    stop = StopAgreement(0, length, group)
    return Trainer(
        lambda images, labels: images.sum(), Batches(steps), state, stop, Saves(calls), Callbacks(callbacks), rank=0
    )


def test_every_callback_is_called_in_list_order_at_its_point_of_the_loop(group, stop_handlers):
    calls = []
    outcome = _trainer(group, calls, [Recorder("a", calls), Recorder("b", calls)]).train()
    assert outcome == RunOutcome("finished", 0)
    a = [(method, step) for name, method, step in calls if name == "a"]
    assert a == [
        ("on_start", 0),
        ("on_epoch_start", 0),
        ("before_step", 0),
        ("after_step", 1),
        ("between_steps", 1),
        ("before_step", 1),
        ("after_step", 2),
        ("between_steps", 2),
        ("on_epoch_end", 2),
        ("on_epoch_start", 2),
        ("before_step", 2),
        ("after_step", 3),
        ("between_steps", 3),
        ("before_step", 3),
        ("after_step", 4),
        ("on_epoch_end", 4),  # the run's last step: nothing between
        ("on_end", "finished"),
    ]
    # each call reaches a, then b, before the loop goes on
    assert [name for name, _, _ in calls if name in "ab"] == ["a", "b"] * len(a)
    # the checkpoint manager is asked after every step (the interval rule is its own) and at every epoch end
    saves = [(why, step) for name, why, step in calls if name == "checkpoints"]
    assert saves == [(INTERVAL, 1), (INTERVAL, 2), (EPOCH_END, 2), (INTERVAL, 3), (EPOCH_END, 4)]


def test_max_steps_inside_an_epoch_ends_it_there_with_its_line(group, stop_handlers):
    calls = []
    outcome = _trainer(group, calls, [Recorder("a", calls)], epochs=5, steps=4, max_steps=6).train()
    assert outcome.exit_reason == "finished" and outcome.exit_code == 0
    assert [step for _, method, step in calls if method == "on_epoch_end"] == [4, 6]
    assert calls[-2:] == [("checkpoints", EPOCH_END, 6), ("a", "on_end", "finished")]


def test_a_resumed_run_with_nothing_left_to_do_ends_at_once_as_finished(group, stop_handlers):
    calls = []
    done = Progress(epoch=3, step_in_epoch=0, global_step=4)  # after the last epoch of 2
    outcome = _trainer(group, calls, [Recorder("a", calls)], progress=done).train()
    assert outcome.exit_reason == "finished"
    assert calls == [("a", "on_start", 4), ("a", "on_end", "finished")]


def test_a_signal_stops_the_loop_after_the_agreed_step_with_a_checkpoint(group, stop_handlers):
    """The signal comes during step 3; the ranks agree on it with the poll after step 4 (the all-reduce is read a
    step late, so that the device never waits for it), and the loop saves at that step."""
    calls = []
    outcome = _trainer(group, calls, [Recorder("a", calls, stop_at=3)], epochs=2, steps=10).train()
    assert outcome == RunOutcome("stopped by signal", 143, signum=signal.SIGTERM)
    assert [step for _, method, step in calls if method == "after_step"] == [1, 2, 3, 4]
    assert ("checkpoints", STOP, 4) in calls and not [c for c in calls if c[1] == "on_epoch_end"]


@pytest.mark.parametrize(
    "reason,diverged,exit_reason,code,exports",
    [
        (StopReason(StopReason.FINISHED), None, "finished", 0, True),
        (StopReason(StopReason.MAX_STEPS), None, "finished", 0, True),
        (StopReason(StopReason.TIME_UP), None, "duration reached", 0, True),
        (StopReason(StopReason.SIGNAL, signum=signal.SIGTERM), None, "stopped by signal", 143, False),
        (StopReason(StopReason.SIGNAL, signum=signal.SIGINT), None, "stopped by signal", 130, False),
        (StopReason(StopReason.NONFINITE, step=7, rank=1), None, "loss not finite", 1, False),
        (StopReason(StopReason.FINISHED), (5, 0), "loss not finite", 1, False),  # found at the last checkpoint
    ],
)
def test_one_outcome_gives_the_exit_code_the_exit_reason_and_the_error_line(
    reason, diverged, exit_reason, code, exports
):
    outcome = RunOutcome.of(reason, diverged)
    assert (outcome.exit_reason, outcome.exit_code, outcome.exports_model) == (exit_reason, code, exports)
    fields = outcome.summary_fields()
    assert (fields["exit_reason"], fields["exit_code"]) == (exit_reason, code)
    if exit_reason == "loss not finite":
        step, rank = diverged or (reason.step, reason.rank)
        assert fields["first_nonfinite_loss"] == {"step": step, "rank": rank}
        assert f"not finite at step {step} on rank {rank}" in outcome.error_line()
    else:
        assert fields["first_nonfinite_loss"] is None and outcome.error_line() is None
    if reason.kind == StopReason.SIGNAL:
        assert fields["signal"] == signal.Signals(reason.signum).name
    failed = RunOutcome.failed("InjectedFault: boom", 1, "node-b").summary_fields()
    assert (failed["exit_reason"], failed["exit_code"]) == ("failed", 1)
    assert failed["first_failure"] == {"rank": 1, "host": "node-b", "error": "InjectedFault: boom"}


def test_the_run_length_follows_whichever_of_epochs_max_steps_and_duration_ends_the_run(monkeypatch):
    length = RunLength.of(
        epochs=10, max_steps=None, duration_s=None, global_step=0, epoch=1, step_in_epoch=0, steps_per_epoch=100
    )
    assert length.last_step == 1000 and length.reached(999) is None
    assert length.reached(1000) == StopReason(StopReason.FINISHED)
    assert length.eta_s(500, 0.1) == pytest.approx(50) and length.fraction_done(500) == 0.5
    capped = RunLength.of(10, 300, None, 0, 1, 0, 100)
    assert capped.reached(300) == StopReason(StopReason.MAX_STEPS) and capped.fraction_done(150) == 0.5
    resumed = RunLength.of(10, None, None, global_step=250, epoch=3, step_in_epoch=50, steps_per_epoch=100)
    assert resumed.last_step == 1000  # 50 steps left of epoch 3, then 7 more epochs
    timed = RunLength.of(1000, None, 40.0, 0, 1, 0, 100)
    now = [100.0]
    monkeypatch.setattr("resnet_ddp.core.stopping.time.perf_counter", lambda: now[0])
    timed.start_clock()
    now[0] += 30  # 30 s into a 40 s run, 300 steps done at 0.1 s a step
    assert timed.eta_s(300, 0.1) == pytest.approx(10) and timed.fraction_done(300) == pytest.approx(0.75)
    now[0] += 10
    assert timed.time_is_up() and timed.fraction_done(400) == 1.0 and timed.eta_s(400, 0.1) == 0.0


# The checkpoint manager, on a tiny model


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)


def _manager(save_dir, every=0, keep=2, layout=None, lr=0.1, resume="auto", stop_on_nonfinite=True, records=None):
    model = _Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    layout = layout or {"batch_size": 8}
    fingerprint = {"arch": "tiny"}
    config = CheckpointConfig(every=every, keep=keep, resume=resume)
    resumed = checkpoint.resume(config, str(save_dir), RANK, fingerprint, layout, model, optimizer, None)
    bad = torch.zeros((), dtype=torch.int64)
    manager = CheckpointManager(
        config,
        str(save_dir),
        RANK,
        resumed,
        fingerprint,
        layout,
        model,
        optimizer,
        None,
        model.state_dict,
        bad,
        stop_on_nonfinite,
        records.append if records is not None else lambda record: None,
    )
    return manager, resumed, bad, optimizer


def _run_steps(manager, state, steps, stop_at=None):
    for _ in range(steps):
        state.step_done(torch.tensor(1.0))
        manager.maybe_save(state, INTERVAL)
        if state.epoch_complete:
            manager.maybe_save(state, EPOCH_END)
            state.next_epoch()
    manager.wait_for_writes()


def _saved(save_dir):
    return sorted(int(p.name[11:20]) for p in save_dir.glob("checkpoint-*.pt"))


def test_checkpoints_follow_the_interval_the_epoch_ends_and_are_not_written_twice(group, tmp_path):
    records = []
    manager, _, _, _ = _manager(tmp_path, every=3, keep=10, records=records)
    state = TrainState(Progress(), 4, CPU)
    _run_steps(manager, state, 8)
    assert _saved(tmp_path) == [3, 4, 6, 8]  # the interval inside epochs; an epoch's last step as its end
    manager.maybe_save(state, EPOCH_END)  # the same step again (--max-steps on a checkpoint step): written once
    manager.maybe_save(state, STOP)
    manager.wait_for_writes()
    assert [r["global_step"] for r in records] == [3, 4, 6, 8]
    assert all(r["kind"] == "checkpoint" and r["bytes"] > 0 for r in records)
    saved = torch.load(tmp_path / "checkpoint-000000006.pt", weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"], saved["epoch_loss_sums"]) == (2, 2, 6, [2.0])


def test_nothing_is_saved_after_a_non_finite_loss_under_nan_policy_stop(group, tmp_path):
    manager, _, bad, _ = _manager(tmp_path, every=1, keep=10)
    state = TrainState(Progress(), 4, CPU)
    _run_steps(manager, state, 2)
    bad.fill_(3)  # the step noted a non-finite loss at step 3
    _run_steps(manager, state, 2)
    manager.maybe_save(state, STOP)
    manager.wait_for_writes()
    assert _saved(tmp_path) == [1, 2] and manager.diverged == (3, 0)
    (tmp_path / "skip").mkdir()
    other, _, bad, _ = _manager(tmp_path / "skip", every=1, keep=10, stop_on_nonfinite=False)
    bad.fill_(1)
    _run_steps(other, TrainState(Progress(), 4, CPU), 2)
    assert _saved(tmp_path / "skip") == [1, 2] and other.diverged is None  # skip and ignore train and save on


def test_pruning_and_resuming_follow_the_lineage_across_a_layout_change(group, tmp_path):
    """A run with batch 8 is cut after step 7; its restart with batch 4 redoes the epoch (steps 5, 6 again, of
    other samples) and must keep what it writes, and its own restart must resume from that, not from step 7."""
    first, _, _, _ = _manager(tmp_path, every=1, keep=2, layout={"batch_size": 8})
    state = TrainState(Progress(), 4, CPU)
    _run_steps(first, state, 7)
    assert _saved(tmp_path) == [6, 7]

    second, resumed, _, _ = _manager(tmp_path, every=1, keep=2, layout={"batch_size": 4})
    assert resumed.progress == Progress(2, 0, 4, 0.0)  # step 7 was epoch 2's third: the epoch starts again
    state = TrainState(resumed.progress, 8, CPU)
    _run_steps(second, state, 1)  # step 5 of the new layout
    assert _saved(tmp_path) == [5, 7]  # step 6 of the old layout goes, the one just written stays
    assert json.loads((tmp_path / "checkpoints.json").read_text()) == {
        "newest_first": ["checkpoint-000000005.pt", "checkpoint-000000007.pt"],
        "fingerprint": {"arch": "tiny"},  # what a restarted job's launcher checks without loading a checkpoint
    }

    third, resumed, _, _ = _manager(tmp_path, every=1, keep=2, layout={"batch_size": 4})
    assert resumed.progress.global_step == 5 and resumed.progress.step_in_epoch == 1  # the new lineage's newest
    _run_steps(third, TrainState(resumed.progress, 8, CPU), 1)
    assert _saved(tmp_path) == [5, 6]


def test_a_resume_from_an_older_checkpoint_keeps_the_newer_ones_of_the_abandoned_line(group, tmp_path):
    first, _, _, _ = _manager(tmp_path, every=1, keep=5)
    _run_steps(first, TrainState(Progress(), 4, CPU), 4)
    older = tmp_path / "checkpoint-000000002.pt"
    second, resumed, _, _ = _manager(tmp_path, every=1, keep=2, resume=str(older))
    assert resumed.progress.global_step == 2
    _run_steps(second, TrainState(resumed.progress, 4, CPU), 1)
    # kept: the new checkpoint (3, over the old line's 3) and the one it continues; 1 is pruned along the
    # lineage, and 4, of the line it left, stays
    assert _saved(tmp_path) == [2, 3, 4]
    assert json.loads((tmp_path / "checkpoints.json").read_text())["newest_first"] == [
        "checkpoint-000000003.pt",
        "checkpoint-000000002.pt",
    ]


def test_a_resume_applies_this_runs_optimizer_options_and_says_which_changed(group, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("resnet_ddp"), "propagate", True)  # a launcher set up in-process stops it
    first, _, _, _ = _manager(tmp_path, every=1, lr=0.1)
    _run_steps(first, TrainState(Progress(), 4, CPU), 2)
    with caplog.at_level(logging.INFO, logger="resnet_ddp"):
        second, resumed, _, optimizer = _manager(tmp_path, every=1, lr=0.05)
    assert resumed.progress.global_step == 2
    assert [g["lr"] for g in optimizer.param_groups] == [0.05]
    assert "resuming with --lr 0.05 (the checkpoint trained with 0.1): this run's options apply" in caplog.text
    _run_steps(second, TrainState(resumed.progress, 4, CPU), 1)  # its checkpoint records the new rate
    assert torch.load(tmp_path / "checkpoint-000000003.pt")["optimizer"]["param_groups"][0]["lr"] == 0.05
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="resnet_ddp"):
        _manager(tmp_path, every=1, lr=0.05)
    assert "resuming with" not in caplog.text  # nothing changed since: nothing to say


def test_a_checkpoint_that_cannot_be_written_says_whether_an_earlier_one_is_intact(group, tmp_path):
    from resnet_ddp.errors import CheckpointWriteError

    manager, _, _, _ = _manager(tmp_path, every=1)
    (tmp_path / "checkpoint-000000001.pt").mkdir()  # in the way of the first write
    state = TrainState(Progress(), 4, CPU)
    state.step_done(torch.tensor(1.0))
    manager.maybe_save(state, INTERVAL)
    with pytest.raises(CheckpointWriteError, match="no checkpoint was written before it"):
        manager.wait_for_writes()
    state.step_done(torch.tensor(1.0))
    manager.maybe_save(state, INTERVAL)
    manager.wait_for_writes()
    (tmp_path / "checkpoint-000000003.pt").mkdir()
    state.step_done(torch.tensor(1.0))
    manager.maybe_save(state, INTERVAL)
    with pytest.raises(CheckpointWriteError, match="the previous checkpoints are intact"):
        manager.wait_for_writes()


def test_an_idle_phase_runs_no_step_and_still_answers_the_end_of_the_duration(group, stop_handlers):
    from resnet_ddp.config import LoadPhase, ScenarioConfig
    from resnet_ddp.scenarios.load import LoadPacer

    records = []
    length = RunLength.of(
        epochs=10, max_steps=None, duration_s=0.5, global_step=0, epoch=1, step_in_epoch=0, steps_per_epoch=10
    )
    stop = StopAgreement(0, length, group)
    pacer = LoadPacer(
        ScenarioConfig(load_profile=(LoadPhase(0.001, 1.0), LoadPhase(float("inf"), 0.0))),
        RANK,
        stop,
        records.append,
        None,
        10.0,
        first_steady_step=2,
        data_wait_s=lambda: 0.0,
    )
    state = TrainState(Progress(), 10, CPU)
    length.start_clock()
    pacer.on_start(state)
    reason = None
    while reason is None:  # full load until the agreement says the first phase (a millisecond) is over
        state.step_done(torch.tensor(1.0))
        pacer.after_step(state)
        reason = stop.poll(state.global_step) or pacer.between_steps(state)
    # the idle phase held the loop until --duration ran out, and said so as an agreed stop after the last step
    assert reason == StopReason(StopReason.TIME_UP) and length.time_is_up()
    assert pacer.phase.duty_cycle == 0.0
    switched = [r for r in records if r["kind"] == "load_phase"]
    assert [(r["phase"], r["global_step"]) for r in switched] == [(2, state.global_step)]
