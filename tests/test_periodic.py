"""The periodic actions of a run (trainer/loop/periodic.py): each is due exactly at its configured steps and at the end, the
ranks sync only where something is due, a stop saves a checkpoint before anything else, and a resumed run never
repeats what was already done at the step it resumes from."""

import json
import signal
from types import SimpleNamespace

import pytest

import trainer.loop.periodic as periodic
from conftest import tiny_config
from trainer.errors import RunStopped
from trainer.loop.periodic import (CheckpointSave, CheckpointUpload, PeriodicActions, Schedule, ScheduledAction, StepClock,
                              StopAtSignal, Tick)
from trainer.loop.train import train
from trainer.rundir import RunDir


class Recorded(ScheduledAction):
    """An eval-like action that only records when it ran (stands in for the slow eval / validation renders)."""

    redo_at_resumed_end, restarts_clock = True, True

    def __init__(self, name: str, schedule: Schedule, ran: list):
        super().__init__(schedule)
        self.name, self.ran = name, ran

    def run(self, tick: Tick) -> None:
        self.ran.append((self.name, tick.step))


def _actions(tmp_path, monkeypatch, max_steps: int, start_step: int = 0, single_process: bool = True,
             agreed: int | None = None):
    """The real checkpoint, upload and stop actions (save_checkpoint records instead of writing) around an eval."""
    ran, syncs = [], []
    monkeypatch.setattr(periodic, "save_checkpoint",
                        lambda accelerator, run, step, *rest: ran.append(("checkpoint", step)) or run.root / f"step-{step}")
    run = RunDir(tmp_path / "run")
    run.create()
    accelerator = SimpleNamespace(is_main_process=True)
    checkpoint = CheckpointSave(Schedule(3, at_end=True), accelerator, run, None, None, {}, "", None)
    publisher = SimpleNamespace(push_checkpoint=lambda folder, step: ran.append(("upload", step)))

    def agree(signum: int) -> int:
        syncs.append(signum)
        return signum if agreed is None else agreed

    actions = [checkpoint, CheckpointUpload(checkpoint, publisher), StopAtSignal(accelerator, run),
               Recorded("eval", Schedule(4, at_end=True), ran)]
    runner = PeriodicActions(actions, max_steps, start_step, StepClock(start_step), agree, single_process)
    return runner, ran, syncs, run


def test_each_action_is_due_at_its_steps_and_the_end_and_syncs_only_then(tmp_path, monkeypatch):
    runner, ran, syncs, _ = _actions(tmp_path, monkeypatch, max_steps=10)
    for step in range(1, 11):
        runner.after_step(step, signum=0)
    assert ran == [("checkpoint", 3), ("upload", 3), ("eval", 4), ("checkpoint", 6), ("upload", 6), ("eval", 8),
                   ("checkpoint", 9), ("upload", 9), ("checkpoint", 10), ("upload", 10), ("eval", 10)]
    assert len(syncs) == len({3, 4, 6, 8, 9, 10})  # one sync per step with something due, none between
    runner.end_of_run()  # the run reached its end in this process: nothing is owed
    assert ran[-1] == ("eval", 10) and len(ran) == 11

    every_0 = Schedule(0, at_end=True)  # validation.every_n_steps = 0: only at the end
    assert [s for s in range(1, 11) if every_0.due(Tick(s, s == 10))] == [10]
    no_end = Schedule(5, at_end=False)  # validation.at_end = false: not at the last step, even where 5 divides it
    assert [s for s in range(1, 11) if no_end.due(Tick(s, s == 10))] == [5]


def test_a_stop_saves_and_uploads_then_skips_the_rest(tmp_path, monkeypatch):
    runner, ran, syncs, run = _actions(tmp_path, monkeypatch, max_steps=10)
    runner.after_step(1, signum=0)
    with pytest.raises(RunStopped, match="SIGTERM: stopped after step 4"):
        runner.after_step(4, signum=signal.SIGTERM)  # eval is due at 4, but a stop ends the run after its checkpoint
    assert ran == [("checkpoint", 4), ("upload", 4)]
    assert syncs == [signal.SIGTERM]
    status = json.loads(run.run_json.read_text())
    assert status["status"] == "stopped" and status["step"] == 4


def test_several_processes_learn_of_a_stop_at_the_next_sync(tmp_path, monkeypatch):
    runner, ran, syncs, _ = _actions(tmp_path, monkeypatch, max_steps=10, single_process=False,
                                     agreed=signal.SIGINT)
    runner.after_step(1, signum=signal.SIGINT)  # nothing due: no collective, the step goes on
    runner.after_step(2, signum=signal.SIGINT)
    assert syncs == [] and ran == []
    with pytest.raises(RunStopped):
        runner.after_step(3, signum=signal.SIGINT)
    assert syncs == [signal.SIGINT] and ran == [("checkpoint", 3), ("upload", 3)]


def test_a_run_resumed_at_its_end_redoes_only_what_resuming_dropped(tmp_path, monkeypatch):
    runner, ran, syncs, _ = _actions(tmp_path, monkeypatch, max_steps=8, start_step=8)
    runner.end_of_run()
    assert ran == [("eval", 8)] and syncs == []  # the checkpoint at 8 is the one it resumed from


def test_an_extended_run_resumed_at_step_n_does_not_repeat_step_n(clips, tmp_path):
    """A real run: checkpoint every 3, eval every 2, validation every 3 and at the end; then extended from step 4."""
    run = tmp_path / "run"
    sections = dict(train={"max_train_steps": 4, "log_every_n_steps": 3, "gradient_accumulation_steps": 1},
                    optim={"lr_warmup_steps": 0}, checkpoint={"every_n_steps": 3, "total_limit": None},
                    validation={"every_n_steps": 3, "at_end": True, "num_inference_steps": 2,
                                "eval_every_n_steps": 2, "eval_samples": 1})
    train(tiny_config(clips, run, **sections), show_progress=False)

    def rows(key: str) -> list[int]:
        return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]

    def checkpoints() -> list[str]:
        return sorted(p.name for p in (run / "checkpoints").iterdir())

    assert rows("loss") == [3, 4] and rows("eval_loss") == [2, 4] and rows("validation_videos") == [3, 4]
    assert checkpoints() == ["step-3", "step-4"]
    done_at_4 = {p: p.stat().st_mtime_ns for p in [*(run / "checkpoints" / "step-4").iterdir(),
                                                  *(run / "validation" / "step-4").iterdir()]}

    extended = {**sections, "train": {**sections["train"], "max_train_steps": 6}}
    result = train(tiny_config(clips, run, **extended), resume="latest", show_progress=False)
    assert rows("loss") == [3, 4, 6] and rows("eval_loss") == [2, 4, 6] and rows("validation_videos") == [3, 4, 6]
    assert checkpoints() == ["step-3", "step-4", "step-6"]
    assert {p: p.stat().st_mtime_ns for p in done_at_4} == done_at_4  # nothing of step 4 written again
    assert [p.parent.name for p in result.videos] == ["step-6"] * len(result.videos)
