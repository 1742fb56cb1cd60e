"""The job state and its event reducer (GEM3DEditorLib/job.py): pure Python, one for a generation
and a batch run."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "GEM3DEditor"))

from GEM3DEditorLib.job import EventKind, JobKind, JobState, reduce  # noqa: E402


def run(state, events):
    for event in events:
        state = reduce(state, event)
    return state


def test_a_generation_goes_from_started_through_windows_to_finished():
    events = [{"event": "started", "job_id": "a", "plan": [[0, 8], [7, 15], [14, 16]]},
              {"event": "window", "job_id": "a", "start": 0, "stop": 8, "direction": "first", "progress": 0.4},
              {"event": "heartbeat", "job_id": "a"},
              {"event": "window", "job_id": "b", "start": 0, "stop": 8, "progress": 0.9},  # another job
              {"event": "window", "job_id": "a", "start": 7, "stop": 15, "direction": "up", "progress": 0.8}]
    state = run(JobState("a"), events)
    assert (state.planned_windows, state.windows, state.progress, state.done) == (3, 2, 0.8, False)
    assert state.status == "Window 7-15 (up)"
    state = reduce(state, {"event": "finished", "job_id": "a", "outputs": {"image": "x.nii.gz"},
                           "timings": {"total": 12.34}})
    assert state.done and state.progress == 1.0 and state.outputs == {"image": "x.nii.gz"}
    assert state.status == "Done in 12.3 s." and state.error is None
    assert reduce(state, {"event": "error", "job_id": "a", "message": "late"}) is state  # nothing after the end


def test_errors_keep_the_message_and_the_engine_output():
    state = reduce(JobState("a"), {"event": "error", "job_id": None, "message": "The GEM-3D engine stopped.",
                                   "stderr": "Traceback..."})
    assert state.done and state.error == "The GEM-3D engine stopped." and state.error_details == "Traceback..."
    assert reduce(JobState("a"), {"event": "cancelled", "job_id": "a"}).status == "Cancelled."
    assert reduce(JobState("a"), {"event": "no such event", "job_id": "a"}) == JobState("a")


def test_a_batch_run_reports_progress_lines():
    state = run(JobState("batch", JobKind.BATCH), [{"event": "log", "line": "loading"},
                                                   {"event": "progress", "done": 3, "total": 12, "line": "[3/12]"}])
    assert state.progress == 0.25 and state.status == "[3/12]" and not state.done
    assert run(state, [{"event": "finished"}]).done
    assert EventKind.ERROR.terminal and not EventKind.WINDOW.terminal


def test_a_remote_engine_says_what_it_uploads_and_where_the_job_waits():
    state = reduce(JobState("a"), {"event": "upload", "job_id": "a", "file": "reference", "done": 2**20,
                                   "total": 4 * 2**20})
    assert state.status == "Uploading the reference: 1.0 of 4.0 MB" and not state.done
    state = reduce(state, {"event": "queued", "job_id": "a", "device": "cuda:0", "position": 2})
    assert state.status == "Queued on the server (2 jobs ahead)" and not state.done


def _members(tree, class_name):
    """Names a class of `tree` defines: methods, properties, class-level annotations, self.X = ... in __init__."""
    import ast

    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name)
    names = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    names |= {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    for node in ast.walk(cls):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Attribute) and getattr(target.value, "id", "") == "self":
                    names.add(target.attr)
    return names - {"__init__"}


def test_the_widget_uses_only_the_module_logic_interface_and_editor_logic_implements_it():
    """The Widget (GEM3DEditor.py) reaches its logic only through GEM3DEditorLib.module_logic.ModuleLogic,
    so a stand-in can replace it; EditorLogic has every member of it."""
    import ast
    import re

    from GEM3DEditorLib.module_logic import ModuleLogic

    interface = {n for n in dir(ModuleLogic) if not n.startswith("_")} | set(ModuleLogic.__annotations__)
    widget = (ROOT / "GEM3DEditor" / "GEM3DEditor.py").read_text(encoding="utf-8")
    used = set(re.findall(r"\bself\.logic\.(\w+)", widget)) | set(re.findall(r"(?<![.\w])logic\.(\w+)", widget))
    assert used and used <= interface, sorted(used - interface)
    tree = ast.parse((ROOT / "GEM3DEditor" / "GEM3DEditorLib" / "logic.py").read_text(encoding="utf-8"))
    assert interface <= _members(tree, "EditorLogic"), sorted(interface - _members(tree, "EditorLogic"))
    assert "logic: \"ModuleLogic | None\" = None" in widget and "self.logic or newEditorLogic()" in widget


class StandInLogic:
    """What a widget test (SlicerNNUnet's WidgetTestCase) puts behind the Widget: no MRML, no engine."""

    def __init__(self):
        from GEM3DEditorLib.mask_history import MaskHistory

        self.job = self.batch = None
        self.history = MaskHistory()
        self.calls = []
        self.busy = self.batch_busy = False

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append(name)


def test_a_stand_in_logic_satisfies_the_interface_and_an_incomplete_one_does_not():
    from GEM3DEditorLib.module_logic import ModuleLogic

    assert isinstance(StandInLogic(), ModuleLogic)
    assert not isinstance(object(), ModuleLogic)
