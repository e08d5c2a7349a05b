"""A session on the engine service (gRPC on 127.0.0.1, the engine on a thread of this process) against
the same session in process: the same codes, audio and text, barge-in, tools, voices, and failures."""

import asyncio
import socket
import time

import numpy as np
import pytest
import torch

from processors.chroma.engine_server import EngineThread
from processors.chroma.generation import Sampling
from processors.chroma.remote import EngineUnavailable, EngineUnreachable, RemoteEngine, RemoteSession
from processors.chroma.scripted import Call, Say, ScriptedReasoner
from processors.chroma.session_protocol import SpeechSession
from tests.conftest import user_audio

PROMPT = "You are a helpful agent."
TOOLS = [
    {
        "name": "lookup_order",
        "description": "Look up an order.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
    }
]
WAIT = 60  # seconds: no test step waits longer than this on the engine


@pytest.fixture(scope="module")
def engine(tiny):
    """The tiny model served on a free loopback port, and a call server's handle on it."""
    served = EngineThread(tiny, max_sessions=8)
    url = served.start()
    remote = RemoteEngine(url)
    yield remote
    remote.close()
    served.stop()


def other_voice():
    t = np.arange(24000) / 24000
    return (0.2 * np.sin(2 * np.pi * 260 * t)).astype(np.float32), "Another voice speaks here."


async def reply(session, audio=None, *, cancel_after=None, **kwargs):
    chunks = []

    async def run():
        async for chunk in session.respond(audio, **kwargs):
            chunks.append(chunk)
            if cancel_after is not None and len(chunks) == cancel_after:
                session.cancel()

    await asyncio.wait_for(run(), WAIT)
    return chunks


def codes(chunks) -> torch.Tensor:
    # in process: a tensor; from the engine: a read-only int32 array over the message
    return torch.cat(
        [
            torch.as_tensor(np.array(c.codes) if isinstance(c.codes, np.ndarray) else c.codes).long()
            for c in chunks
        ]
    )


def assert_same(remote_chunks, local_chunks):
    assert [c.frames for c in remote_chunks] == [c.frames for c in local_chunks]
    assert [c.text for c in remote_chunks] == [c.text for c in local_chunks]
    assert torch.equal(codes(remote_chunks), codes(local_chunks))
    for r, lo in zip(remote_chunks, local_chunks, strict=True):
        assert r.audio.dtype == np.float32 and np.array_equal(r.audio, lo.audio)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_remote_session_keeps_the_speech_session_contract(engine, voice):
    session = engine.new_session(voice, PROMPT)
    assert isinstance(session, SpeechSession)
    assert session.model.source == "tiny" and session.system_prompt == PROMPT


@pytest.mark.parametrize(
    "sampling",
    [Sampling(), Sampling(do_sample=True, temperature=0.9, top_k=20, seed=5)],
    ids=["greedy", "seeded"],
)
async def test_the_same_turns_give_the_same_codes_audio_and_text_as_in_process(engine, tiny, voice, sampling):
    settings = dict(max_frames=12, chunk_frames=2, sampling=sampling)
    local = tiny.new_session(voice, PROMPT, **settings)
    remote = engine.new_session(voice, PROMPT, **settings)
    try:
        for seed in (31, 32):  # the second turn reads the first from the engine's memory of the call
            turn = user_audio(0.8, seed)
            assert_same(await reply(remote, turn), await reply(local, turn))
        assert remote.kept_text == local.kept_text
    finally:
        remote.close()


async def test_cancel_stops_the_reply_and_the_engine_keeps_what_the_caller_heard(engine, tiny, voice):
    local = tiny.new_session(voice, PROMPT, max_frames=30)
    remote = engine.new_session(voice, PROMPT, max_frames=30)
    try:
        cut = [await reply(s, user_audio(0.8, 41), cancel_after=2) for s in (remote, local)]
        assert [len(c) for c in cut] == [2, 2]  # no chunk after cancel()
        for s in (remote, local):
            s.heard(3)
        assert remote.kept_text == local.kept_text
        # The next turn continues from the cut reply as the engine kept it: the same as in process.
        assert_same(await reply(remote, user_audio(0.6, 42)), await reply(local, user_audio(0.6, 42)))
        deadline = time.monotonic() + 10
        while engine.status()["sessions"] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # the engine's batch empties once the cut reply is gone
        assert engine.status()["sessions"] == 0
    finally:
        remote.close()


async def test_a_tool_call_goes_out_and_its_result_comes_back_into_the_turn(tiny, voice):
    turns = [["Ok. ", Call("lookup_order", {"order_id": "A17"}), Say(lambda r: f"It is {r['status']}.")]]
    with EngineThread(tiny, reasoner=lambda: ScriptedReasoner(tiny.tokenizer, turns)) as url:
        remote_engine = RemoteEngine(url)
        session = remote_engine.new_session(voice, PROMPT, max_frames=60)
        calls = []
        loop = asyncio.get_running_loop()
        session.on_tool_call = lambda call: calls.append((call, asyncio.get_running_loop() is loop))
        session.set_tools(TOOLS)
        try:
            first = await reply(session, user_audio(0.5, 51))
            assert first[-1].text == "Ok. "  # the call is never spoken
            assert [(c.name, c.arguments) for c, _ in calls] == [("lookup_order", {"order_id": "A17"})]
            assert all(on_loop for _, on_loop in calls)
            session.tool_result({"status": "shipped"})
            second = await reply(session)
            assert second[-1].text == "It is shipped."
            said = await reply(session, say="Goodbye now.")
            assert said[-1].text == "Goodbye now."
        finally:
            session.close()
            remote_engine.close()


async def test_a_voice_switch_speaks_the_next_reply_as_in_process(engine, tiny, voice):
    local = tiny.new_session(voice, PROMPT, max_frames=10)
    remote = engine.new_session(voice, PROMPT, max_frames=10)
    try:
        assert_same(await reply(remote, user_audio(0.5, 61)), await reply(local, user_audio(0.5, 61)))
        for s in (remote, local):
            s.set_voice(other_voice())
            await asyncio.wait_for(s.prepare_voice(), WAIT)
        after_remote, after_local = (
            await reply(remote, user_audio(0.5, 62)),
            await reply(local, user_audio(0.5, 62)),
        )
        assert_same(after_remote, after_local)
        # and the switch mattered: the first voice gives other codes for the same turn
        same_voice = tiny.new_session(voice, PROMPT, max_frames=10)
        await reply(same_voice, user_audio(0.5, 61))
        assert not torch.equal(codes(await reply(same_voice, user_audio(0.5, 62))), codes(after_local))
    finally:
        remote.close()


async def test_sessions_past_max_sessions_are_refused_and_closed_ones_free_their_place(tiny, voice):
    with EngineThread(tiny, max_sessions=1) as url:
        remote_engine = RemoteEngine(url)
        first, second = (remote_engine.new_session(voice, PROMPT, max_frames=4) for _ in range(2))
        lost = []
        second.on_lost = lost.append
        try:
            assert len(await reply(first, user_audio(0.3, 71))) > 0
            with pytest.raises(EngineUnavailable, match="engine at capacity: 1 of max_sessions 1"):
                await reply(second, user_audio(0.3, 71))
            assert lost and url in lost[0]
            assert remote_engine.sessions_lost == 1
            first.close()
            third = remote_engine.new_session(voice, PROMPT, max_frames=4)
            deadline = time.monotonic() + 10
            while remote_engine.status()["open_sessions"] and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert len(await reply(third, user_audio(0.3, 72))) > 0
            third.close()
        finally:
            remote_engine.close()


async def test_an_engine_that_stops_mid_reply_fails_the_reply_and_every_later_one_promptly(tiny, voice):
    served = EngineThread(tiny)
    remote_engine = RemoteEngine(served.start())
    session = remote_engine.new_session(voice, PROMPT, max_frames=400)
    lost = []
    session.on_lost = lost.append
    started = None
    try:
        with pytest.raises(EngineUnavailable, match="connection lost"):
            async for _chunk in session.respond(user_audio(0.5, 81)):
                if started is None:
                    started = time.monotonic()
                    await asyncio.to_thread(served.stop, 0)
        assert time.monotonic() - started < 10
        assert len(lost) == 1 and remote_engine.sessions_lost == 1
        with pytest.raises(EngineUnavailable):
            await reply(session, user_audio(0.5, 82))
        deadline = time.monotonic() + 15  # the status poller notices too: no new calls
        while remote_engine.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        with pytest.raises(EngineUnavailable, match=remote_engine.url):
            remote_engine.status()
        assert "chroma_engine_connected" in dict((n, v) for n, _h, v in remote_engine.gauges())
    finally:
        session.close()
        remote_engine.close()


def test_an_engine_nobody_serves_is_named_with_what_was_expected():
    url = f"grpc://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(EngineUnreachable) as err:
        RemoteEngine(url, connect_timeout=1.0)
    assert url in str(err.value) and "chroma-agent engine" in str(err.value)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:7400", "grpc://127.0.0.1", "grpc://127.0.0.1:70000", "grpc://:1"]
)
def test_a_url_that_is_not_grpc_host_port_is_refused(url):
    with pytest.raises(ValueError, match="expected grpc://HOST:PORT"):
        RemoteEngine(url)


async def test_a_session_left_without_close_by_a_vanished_call_server_is_freed(tiny, voice):
    """The stream ends with the call server's process; here its channel closes under the session."""
    with EngineThread(tiny) as url:
        remote_engine = RemoteEngine(url)
        session = remote_engine.new_session(voice, PROMPT, max_frames=4)
        await reply(session, user_audio(0.3, 91))
        assert remote_engine.status()["open_sessions"] in (0, 1)
        await remote_engine.channel().close()
        watcher = RemoteEngine(url, status_every=0.1)
        deadline = time.monotonic() + 10
        while watcher.status()["open_sessions"] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        state = watcher.status()
        assert state["open_sessions"] == 0 and state["sessions_opened"] == 1
        watcher.close()
        remote_engine.close()


def test_remote_session_is_what_the_engine_hands_out(engine, voice):
    with pytest.raises(TypeError, match="thinker_stream cannot be sent to a remote engine"):
        engine.new_session(voice, PROMPT, thinker_stream=object())
    assert isinstance(engine.new_session(voice, PROMPT), RemoteSession)


class _SilentModel:
    """An engine whose sessions never answer (a hung device, say): the one failure the tiny model
    cannot be made to show."""

    source, device = "silent", "cpu"

    def new_session(self, voice, system_prompt="", **settings):
        class Session:
            on_tool_call = None

            async def respond(self, audio=None, *, say=None):
                await asyncio.Event().wait()
                yield

            def cancel(self):
                pass

        return Session()


async def test_a_reply_the_engine_never_answers_fails_after_the_reply_timeout(voice):
    with EngineThread(_SilentModel(), status=dict) as url:
        remote_engine = RemoteEngine(url, reply_timeout=(1.0, 1.0))
        session = remote_engine.new_session(voice, PROMPT)
        started = time.monotonic()
        with pytest.raises(EngineUnavailable, match="no word on reply 1 for 1 s"):
            await reply(session, user_audio(0.3, 95))
        assert time.monotonic() - started < 10
        session.close()
        remote_engine.close()
