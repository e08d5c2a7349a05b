"""What the thinker says in the customer-service scenarios when the agent runs the `tiny` preset
(random weights cannot follow a flow). With real weights this script is not used: the model answers
itself.

Each inner list is one agent turn: text it speaks, and the tool calls it makes (in the thinker's own
tool-call format, so the tool-call filter, pipecat's function calls and the flow run for real)."""

from processors.chroma.scripted import Call, Say

GREETING = ("Hello, this is Ava at Northwind Shop. May I have your account number? "
            "You can also type it on your keypad, followed by the pound key.")


def _hello(result: dict) -> str:
    return f"Thanks, {result['first_name']}. Which order are you calling about?"


spoken_account_then_a_person = [
    [GREETING],
    [Call("find_customer", {"account_number": "10042"}), Say(_hello)],
    [Call("transfer_to_human", {})],                  # the transfer node speaks for itself
]

keyed_accounts = [
    [GREETING],
    [Call("find_customer", {"account_number": "99999"}),   # keyed_account, after "99999#"
     "I couldn't find that account. Would you like to try another number, or talk to a colleague?"],
    [Call("try_again", {}), "Of course. Please say or type your account number."],
    [Call("find_customer", {"account_number": "20817"}), Say(_hello)],
]
