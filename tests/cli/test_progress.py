"""Training progress: a live bar on a terminal; plain lines (no carriage returns) at a modest
interval when stderr is a file or a pipe (logs, CI, Slurm); console lines that outlive a pipe
whose reader has gone."""
import io
import os

from dino_fast.cli.progress import Progress, say, track


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run_epoch(stream, total=40, initial=0, interval=3600.0, enabled=True):
    progress = Progress(total, "epoch 3/10", initial=initial, enabled=enabled, stream=stream,
                        interval=interval)
    for step in range(initial, total):
        progress.update(loss=f"{10 - step / 10:.4f}")
    progress.close()
    return stream.getvalue()


def test_plain_lines_every_tenth_of_the_epoch_and_at_its_end():
    lines = run_epoch(io.StringIO(), total=45).splitlines()
    assert "\r" not in "".join(lines)
    steps = [int(line.split("step ")[1].split("/")[0]) for line in lines]
    assert steps == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 45]  # every 4 (45 // 10), the end
    assert lines[-1].startswith("epoch 3/10: step 45/45 (100%), loss 5.6000, ")


def test_plain_lines_every_interval_in_long_epochs():
    lines = run_epoch(io.StringIO(), total=1000, initial=990, interval=0.0).splitlines()
    assert len(lines) == 10  # interval 0: every step; a resumed epoch starts at its step
    assert lines[0].startswith("epoch 3/10: step 991/1000 (99%)")


def test_a_terminal_gets_a_live_bar_and_other_ranks_nothing():
    assert "\r" in run_epoch(Terminal())
    assert run_epoch(io.StringIO(), enabled=False) == ""
    assert run_epoch(Terminal(), enabled=False) == ""


def test_track_yields_everything_with_plain_lines(capsys):
    assert list(track(range(20), "features")) == list(range(20))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "features: step 2/20 (10%), 0m00s" and len(lines) == 10


def test_a_pipe_without_reader_is_dropped_not_raised():
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `| tee log` after Ctrl-C ended tee
    with open(write_end, "w") as stream:
        say("first line", stream)  # BrokenPipeError inside: the stream now goes to /dev/null
        say("second line", stream)
        progress = Progress(3, "epoch 1/1", stream=stream, interval=0.0)  # its lines too
        for _ in range(3):
            progress.update()
        progress.close()
