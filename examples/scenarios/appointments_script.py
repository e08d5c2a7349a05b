"""What the thinker says in the appointment scenarios when the agent runs the `tiny` preset (random
weights cannot follow a flow). With real weights this script is not used: the model answers itself.

Each inner list is one agent turn: text it speaks, and the tool calls it makes (in the thinker's own
tool-call format, so the tool-call filter, pipecat's function calls and the flow run for real)."""

from processors.chroma.scripted import Call, Say

book_by_keypad = [
    ["Welcome to Riverside Dental. Press one to book."],          # the menu node speaks first
    ["Which day suits you, and morning or afternoon?"],           # after the key press: ask_date
    [Call("check_availability", {"date": "2026-12-07", "time_of_day": "morning"}),
     Say(lambda r: f"I have {r['first_slot']} free, or later that morning. Which would you like, and may I have your full name?")],
    [Call("book_appointment", {"slot": "2026-12-07 09:00", "name": "Ann Lee"}),
     "All set."],
    ["Sure, what else?"],                                         # after the barge-in during the filler
    [Call("finished", {}), "Thank you for calling. Goodbye."],
]

front_desk = [
    ["Welcome to Riverside Dental. Press one to book."],
    [Call("speak_to_front_desk", {})],
]
