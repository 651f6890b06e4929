"""The child-process error protocol (reap_fast.children): a user error comes back as one line with the child's
exit code, a bug or a crash as "crashed with exit N" and the last lines of the child's stderr; the one request
format (a JSON file); SIGTERM turned into SystemExit."""

import os
import signal
import sys

import pytest

from reap_fast.children import (
    ChildCrashed,
    ErrorRecord,
    STDERR_TAIL_LINES,
    call_child,
    read_request,
    run_child,
    sigterm_raises_system_exit,
    write_request,
)
from reap_fast.errors import ReapFastError


class ParentError(ReapFastError):
    """The caller's own error type."""


def _child(body: str) -> list[str]:
    """A child that runs ``body`` (the function ``work``) under the protocol."""
    script = ("import sys\nfrom reap_fast.children import child_main\nfrom reap_fast.errors import ReapFastError\n"
              f"{body}\nsys.exit(child_main(work, 'test-child'))\n")
    return [sys.executable, "-c", script]


USER_ERROR = """
class Refused(ReapFastError):
    exit_code = 3

def work():
    print("about to refuse", file=sys.stderr)
    raise Refused("the input\\n  is   wrong")
"""

BUG = """
def work():
    print("step one", file=sys.stderr)
    return 1 // 0
"""

CRASH = """
import os
def work():
    for number in range(40):
        print(f"line {number}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(7)
"""


@pytest.mark.parametrize("capture", [True, False], ids=["captured", "passed-through"])
def test_a_user_error_comes_back_as_one_line_with_its_exit_code(capture):
    with pytest.raises(ParentError) as raised:
        call_child(_child(USER_ERROR), ParentError, "the test step", capture_output=capture)
    assert str(raised.value) == "the test step failed: the input is wrong"
    assert raised.value.exit_code == 3
    assert ParentError.exit_code == 2  # the instance carries the child's code, the class keeps its own


@pytest.mark.parametrize("capture", [True, False], ids=["captured", "passed-through"])
def test_a_bug_is_a_crash_with_the_exception_and_the_traceback_tail(capture, capfd):
    with pytest.raises(ChildCrashed) as raised:
        call_child(_child(BUG), ParentError, "the test step", capture_output=capture)
    lines = str(raised.value).splitlines()
    assert lines[0] == "the test step crashed with exit 1: ZeroDivisionError: integer division or modulo by zero"
    assert lines[1] == "last lines of its stderr:"
    assert "  step one" in lines and lines[-1] == "  ZeroDivisionError: integer division or modulo by zero"
    assert any(line.startswith("  Traceback") for line in lines)
    passed_through = capfd.readouterr().err
    assert ("ZeroDivisionError" in passed_through) is not capture  # without capture the terminal saw it as it came


@pytest.mark.parametrize("capture", [True, False], ids=["captured", "passed-through"])
def test_a_crash_without_a_record_shows_its_exit_code_and_last_lines(capture):
    with pytest.raises(ChildCrashed) as raised:
        call_child(_child(CRASH), ParentError, "the test step", capture_output=capture)
    lines = str(raised.value).splitlines()
    assert lines[0] == "the test step crashed with exit 7"
    assert lines[1:] == ["last lines of its stderr:"] + [f"  line {n}" for n in range(40 - STDERR_TAIL_LINES, 40)]


def test_a_child_killed_by_a_signal_is_named_so():
    with pytest.raises(ChildCrashed, match="^the test step crashed with signal 9$"):
        call_child([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], ParentError,
                   "the test step")


def test_success_returns_the_childs_output():
    completed = call_child(_child("def work():\n    print('result')"), ParentError, "the test step", capture_output=True)
    assert completed.returncode == 0 and completed.stdout == "result\n"


def test_a_broken_record_counts_as_none(tmp_path):
    path = tmp_path / "error.json"
    assert ErrorRecord.read(path) is None
    path.write_text('{"kind": "user", "type": "X"')
    assert ErrorRecord.read(path) is None
    ErrorRecord("user", "X", "a line", 4).write(path)
    assert ErrorRecord.read(path) == ErrorRecord("user", "X", "a line", 4)
    assert [p.name for p in tmp_path.iterdir()] == ["error.json"]


def test_a_child_reads_the_request_file_its_parent_wrote(tmp_path):
    request = write_request(tmp_path, {"numbers": [2, 3, 5], "name": "sum"})
    assert request == tmp_path / "request.json" and sorted(p.name for p in tmp_path.iterdir()) == ["request.json"]
    assert read_request([str(request)], "test-child", "a test") == {"numbers": [2, 3, 5], "name": "sum"}
    body = ("from reap_fast.children import read_request\nrequest = read_request(None, 'test-child', 'a test')\n"
            "def work():\n    print(request['name'], sum(request['numbers']))")
    completed = call_child(_child(body) + [str(request)], ParentError, "the test step", capture_output=True)
    assert completed.stdout == "sum 10\n"
    with pytest.raises(SystemExit) as raised:  # a child started without its request file: argparse's usage error
        read_request([], "test-child", "a test")
    assert raised.value.code == 2


def test_sigterm_raises_system_exit_until_restored():
    previous = signal.getsignal(signal.SIGTERM)
    restore = sigterm_raises_system_exit()
    try:
        with pytest.raises(SystemExit) as raised:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 5)  # the handler runs at the next bytecode; this is never reached
        assert raised.value.code == 128 + signal.SIGTERM
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_child_stopped_by_sigterm_runs_its_finally_blocks(tmp_path):
    marker = tmp_path / "cleaned"
    body = (f"import os, signal\ndef work():\n    try:\n        os.kill(os.getpid(), signal.SIGTERM)\n"
            f"        signal.sigtimedwait([], 5)\n    finally:\n        open({str(marker)!r}, 'w').close()")
    completed = run_child(_child(body), capture_output=True)
    assert completed.returncode == 128 + signal.SIGTERM and marker.exists()
