"""Runs that end (issue #26), in process: a second signal exits with 128 + signal, and main's
exit code and one-line error for each way a run ends."""
import os
import signal

import pytest

from pipelines import atomic
from trex_fast import train
from trex_fast.loop import NonFiniteLossError, SecondSignal, StopSignal


def test_a_second_signal_raises_second_signal_with_its_number():
    with pytest.raises(SecondSignal) as caught, StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM  # the first one only asks to stop
        os.kill(os.getpid(), signal.SIGTERM)
    assert caught.value.signum == signal.SIGTERM


@pytest.mark.parametrize("raised, code, words", [
    (SecondSignal(signal.SIGINT), 128 + signal.SIGINT, "second signal"),
    (NonFiniteLossError("the training loss became non-finite"), 1, "non-finite"),
    (atomic.NoSpaceError(28, "no space left on device while writing x"), 1, "no space left"),
])
def test_main_exits_with_the_code_that_says_how_the_run_ended(monkeypatch, capsys, raised,
                                                              code, words):
    def failing_run(cfg):
        raise raised

    monkeypatch.setattr(train, "run", failing_run)
    with pytest.raises(SystemExit) as caught:
        train.main(device="cpu")
    assert caught.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
