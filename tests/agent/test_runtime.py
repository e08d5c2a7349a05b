"""The runtime's process-level pieces: which model an agent gets, the metrics page, `chroma-agent call`."""

import re
from pathlib import Path

import numpy as np

import agent.runtime as runtime_module
from agent.cli import main
from agent.metrics import ServerMetrics
from processors.audio_io import read_audio_channels, to_pcm16, write_wav
from tests.speech import requires_espeak, silence, speech_bounds, synthesize

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples/agents/demo/agent.yaml"


def test_hub_model_falls_back_to_the_tiny_stand_in_only_without_gpu_and_weights(monkeypatch, tmp_path):
    cached = {}
    monkeypatch.setattr(runtime_module, "try_to_load_from_cache", lambda repo, name: cached.get(repo))
    monkeypatch.setattr(runtime_module.torch.cuda, "is_available", lambda: False)
    assert runtime_module.model_source("FlashLabs/Chroma-4B") == "tiny"
    assert runtime_module.model_source("tiny") == "tiny"
    assert runtime_module.model_source(str(tmp_path)) == str(tmp_path)  # a folder is always used
    cached["FlashLabs/Chroma-4B"] = "/cache/config.json"  # downloaded: used even without a GPU
    assert runtime_module.model_source("FlashLabs/Chroma-4B") == "FlashLabs/Chroma-4B"
    cached.clear()
    monkeypatch.setattr(runtime_module.torch.cuda, "is_available", lambda: True)  # a GPU: download it
    assert runtime_module.model_source("FlashLabs/Chroma-4B") == "FlashLabs/Chroma-4B"


def test_metrics_render_counts_and_a_cumulative_ttfa_histogram():
    m = ServerMetrics()
    m.call_started("webrtc")
    m.call_started("webrtc")
    m.call_ended()
    m.turn()
    m.barge_in()
    m.dropped("bad_payload", 3)
    for seconds in (0.04, 0.12, 0.12, 7.0):
        m.first_audio(seconds)
    text = m.render()
    values = dict(re.findall(r"^(\S+) (\S+)$", text, re.M))
    assert values["chroma_agents_calls_active"] == "1"
    assert values['chroma_agents_calls_total{transport="webrtc"}'] == "2"
    assert values["chroma_agents_turns_total"] == "1" and values["chroma_agents_barge_ins_total"] == "1"
    assert values['chroma_agents_dropped_input_total{reason="bad_payload"}'] == "3"
    assert values['chroma_agents_time_to_first_audio_seconds_bucket{le="0.05"}'] == "1"
    assert values['chroma_agents_time_to_first_audio_seconds_bucket{le="0.15"}'] == "3"
    assert values['chroma_agents_time_to_first_audio_seconds_bucket{le="5.0"}'] == "3"
    assert values['chroma_agents_time_to_first_audio_seconds_bucket{le="+Inf"}'] == "4"
    assert float(values["chroma_agents_time_to_first_audio_seconds_sum"]) == 7.28
    assert "# TYPE chroma_agents_time_to_first_audio_seconds histogram" in text


@requires_espeak
def test_call_command_writes_the_agents_side_of_the_call_on_its_timeline(tmp_path, capsys):
    speech = synthesize("Hello, is anybody there?", 16000)
    caller = np.concatenate([silence(0.3, 16000), speech, silence(0.2, 16000)])
    caller_wav = tmp_path / "caller.wav"
    write_wav(caller_wav, caller, 16000)
    out = tmp_path / "call.wav"
    argv = [
        "call",
        str(DEMO),
        "--model",
        "tiny",
        "--input",
        str(caller_wav),
        "--output",
        str(out),
        "--rate",
        "8000",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"ended: [\d.]+ s, 1 turns, 0 barge-ins", printed)
    samples, rate = read_audio_channels(out)
    assert (rate, samples.shape[1]) == (8000, 1)
    audio = to_pcm16(samples[:, 0])
    # Silence while the caller speaks (and for the VAD's 0.2 s stop window after), then the reply.
    quiet_until = 0.3 + speech_bounds(speech, 16000)[1] + 0.2
    assert np.abs(audio[: int(quiet_until * 8000)]).max() == 0
    assert np.abs(audio[int(quiet_until * 8000) :]).max() > 100


def test_call_command_reports_a_bad_agent_file(tmp_path, capsys):
    bad = tmp_path / "agent.yaml"
    bad.write_text("name: x\nmodel: tiny\nvoice: ./nowhere\n")
    caller_wav = tmp_path / "caller.wav"
    write_wav(caller_wav, np.zeros(800, np.int16), 8000)
    assert main(["call", str(bad), "--input", str(caller_wav), "--output", str(tmp_path / "o.wav")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: voice: './nowhere' is not a folder" in err


@requires_espeak
async def test_failed_replies_play_the_rendered_lines_count_in_metrics_and_end_the_call(tmp_path, tiny_model, monkeypatch):
    from agent.runtime import AgentRuntime
    from agent.simulate import simulate_call
    from agent.spec import load_agent

    path = tmp_path / "agent.yaml"
    path.write_text(
        f"""
name: failing agent
model: tiny
voice: {ROOT / "examples/voices/demo"}
turn:
  detector: silence
  silence_secs: 0.5
response:
  on_model_error:
    say: Sorry, say that again?
    hang_up_after: 2
    goodbye: Sorry, goodbye.
"""
    )
    runtime = AgentRuntime(load_agent(path), model=tiny_model)
    await runtime.prepare()
    lines = runtime.model_error_audio
    assert lines.apology and lines.goodbye and lines.apology != lines.goodbye and lines.hang_up_after == 2

    def broken_session():
        session = real_session()

        async def respond(user_audio=None, *, say=None):
            raise RuntimeError("CUDA error: out of memory")
            yield  # an async generator that fails as its first chunk is asked for

        session.respond = respond
        return session

    real_session = runtime.new_session
    monkeypatch.setattr(runtime, "new_session", broken_session)
    speech = synthesize("Hello, where is my order?", 16000)
    audio = np.concatenate([silence(0.3, 16000), speech, silence(5.0, 16000), speech, silence(5.0, 16000)])
    call, _recording, transport = await simulate_call(runtime, audio, 16000, out_rate=24000, settle_secs=0.5)

    assert call.stats.failed_turns == 2 and runtime.metrics.turns_failed == 2
    assert "chroma_agents_turns_failed_total 2" in runtime.metrics.render()
    # The caller heard the apology for the first failure, then the goodbye, and the agent hung up.
    heard = b"".join(samples.tobytes() for _t, _rate, samples in transport.agent_chunks)
    first = heard.find(lines.apology)
    assert first >= 0 and heard.find(lines.goodbye, first + len(lines.apology)) > first
    assert call.ended_by_agent
    assert [kind for _t, kind, _d in call.timeline if kind in ("turn_failed", "agent_hung_up")] == [
        "turn_failed", "turn_failed", "agent_hung_up"
    ]
