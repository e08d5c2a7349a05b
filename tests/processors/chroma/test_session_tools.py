"""Tool calls and fixed speech in one engine session (tiny model; the thinker's words scripted)."""

import asyncio

from processors.chroma.scripted import Call, ScriptedReasoner
from processors.chroma.tools import CALL_OPEN, tools_system_text
from tests.conftest import user_audio

TOOLS = [
    {
        "name": "lookup_order",
        "description": "Look up an order.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
    }
]


def session_for(tiny, voice, turns, **kwargs):
    reasoner = ScriptedReasoner(tiny.tokenizer, turns)
    session = tiny.new_session(voice=voice, system_prompt="You are a test agent.", thinker_stream=reasoner,
                               max_frames=40, **kwargs)
    return session, reasoner


async def collect(session, audio=None, **kwargs):
    chunks = []
    async for chunk in session.respond(audio, **kwargs):
        chunks.append(chunk)
    return chunks


def history(session) -> str:
    return session.tokenizer.decode(session.history_ids + session.pending_ids)


def test_the_thinker_is_told_its_tools_and_a_call_it_writes_is_handed_over_unspoken(tiny, voice):
    session, _ = session_for(tiny, voice, [["Ok. ", Call("lookup_order", {"order_id": "A17"}), "Never."]])
    session.set_tools(TOOLS)
    seen = []

    async def run():
        loop_thread = asyncio.get_running_loop()
        session.on_tool_call = lambda call: seen.append((call, asyncio.get_running_loop() is loop_thread))
        return await collect(session, user_audio(0.5, 11))

    chunks = asyncio.run(run())
    assert tools_system_text(TOOLS) in history(session)  # read before the user's turn
    assert [(c.name, c.arguments) for c, _ in seen] == [("lookup_order", {"order_id": "A17"})]
    assert all(on_loop for _, on_loop in seen)  # delivered on the event loop, not the device thread
    spoken = chunks[-1].text
    assert spoken == "Ok. " and CALL_OPEN not in spoken
    assert session.paused_at_call
    # the backbone never got a token of the call
    entered = bytes(t for t in session._reply.steps.text_before(10_000) if t < 256).decode()
    assert entered == "Ok. "


def test_the_result_continues_the_turn_and_the_thinker_keeps_call_and_result_in_order(tiny, voice):
    session, reasoner = session_for(
        tiny, voice, [["Ok. ", Call("lookup_order", {"order_id": "A17"}), lambda_say()], ["Bye."]]
    )
    session.set_tools(TOOLS)

    async def run():
        await collect(session, user_audio(0.5, 12))
        session.tool_result({"status": "shipped"})
        answer = await collect(session)  # no audio: the agent's turn goes on
        await collect(session, user_audio(0.5, 13))
        return answer

    answer = asyncio.run(run())
    assert answer[-1].text == "It is shipped."
    text = history(session)
    call_at = text.index('{"name": "lookup_order"')
    result_at = text.index('<tool_response>\n{"status": "shipped"}\n</tool_response>')
    answer_at = text.index("It is shipped.")
    assert call_at < result_at < answer_at
    assert [*session.turns, session.kept_text] == ["Ok. ", "It is shipped.", "Bye."]
    assert reasoner.results == [{"status": "shipped"}]


def lambda_say():
    from processors.chroma.scripted import Say

    return Say(lambda result: f"It is {result['status']}.")


def test_say_speaks_exactly_the_text_in_the_voice_and_the_thinker_remembers_it(tiny, voice):
    session, reasoner = session_for(tiny, voice, [["Hello."]])

    async def run():
        said = await collect(session, say="One moment.")
        reply = await collect(session, user_audio(0.5, 14))
        return said, reply

    said, reply = asyncio.run(run())
    assert said[-1].text == "One moment."
    assert sum(c.audio.size for c in said) > 0
    assert reply[-1].text == "Hello."  # the scripted thinker's turn was not used up by the fixed text
    assert [*session.turns, session.kept_text] == ["One moment.", "Hello."]
    assert len(reasoner.replies) == 1


def test_a_new_user_turn_drops_the_rest_of_a_turn_whose_call_got_no_result(tiny, voice):
    session, _ = session_for(
        tiny, voice, [["Ok. ", Call("lookup_order", {"order_id": "A1"}), "Unsaid."], ["Next."]]
    )
    session.set_tools(TOOLS)

    async def run():
        await collect(session, user_audio(0.5, 15))
        return await collect(session, user_audio(0.5, 16))  # the caller spoke before any result

    reply = asyncio.run(run())
    assert reply[-1].text == "Next."
    assert "Unsaid." not in history(session)
