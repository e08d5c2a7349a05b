"""Flows: what an agent must get done on a call, written in YAML on pipecat's flow format.

- `flows.file`: the flow file, checked in full at load (`load_flow`, `FlowFileError`);
- `flows.handlers`: the handlers module a pipecat flow file names its functions and actions in;
- `flows.tools`: Python and HTTP tools, run with a timeout and a spoken fallback;
- `flows.actions`: telephony actions and `CallControl`, what the call side implements;
- `flows.dtmf`: keypad collection and routing;
- `flows.runtime`: `CallFlow`, one call's nodes and handlers for pipecat's `FlowManager`.
"""
