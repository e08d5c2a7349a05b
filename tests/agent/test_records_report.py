"""A conversation-test run names its call's record: the report's runs, progress line and failures
carry the record id, and the record under it is the run's call (the same tool call and nodes)."""

import json

from agent.testing.report import progress_line, write_report
from records.store import open_store
from tests.speech import requires_espeak
from tests.testing.test_runner import run_once, write_case


@requires_espeak
def test_a_scenario_runs_report_names_the_record_of_its_call(tmp_path):
    result = run_once(write_case(tmp_path))
    assert result.error is None, result.error
    record_id = result.record_id
    assert record_id and f"record {record_id}" in progress_line(result)
    paths = write_report(tmp_path / "report", [result])
    (run,) = json.loads(paths["json"].read_text())["runs"]
    assert run["record_id"] == record_id

    store = open_store(str(tmp_path / "calls.db"))  # the agent file's default database, beside it
    try:
        info, events = store.get_call(record_id)
    finally:
        store.close()
    assert info.transport == "inprocess" and info.end_reason == "agent_ended"  # the flow's end_call
    assert [e.data["name"] for e in events if e.kind == "tool_call"] == ["lookup_order", "finished"]
    assert [e.data["name"] for e in events if e.kind == "node"] == ["start", "verify", "bye"]
