"""The command line on every kind of audio input, good and bad, and its exit codes and messages.

Each command runs under a timeout (a thread joined with one, or a subprocess given one), so a command
that hangs fails its test instead of hanging the run."""

import socket
import subprocess
import sys
import threading
import wave
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import soundfile

from agent.cli import main
from processors.audio_io import to_float, write_wav
from tests.speech import requires_espeak, synthesize

ROOT = Path(__file__).resolve().parents[2]
DEMO_VOICE = ROOT / "examples" / "voices" / "demo"
TIMEOUT = 120  # far beyond any of these commands on the tiny model: reaching it means a hang
BAD_INPUTS = ["missing", "empty", "header_only", "truncated", "not_audio"]


def run(argv: list[str], capsys, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    """main(argv) in a thread, joined with a timeout -> (exit code, stdout, stderr)."""
    outcome: dict = {}

    def target():
        try:
            outcome["code"] = main(argv)
        except BaseException as exc:  # reported below, in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"chroma-agent {' '.join(argv)} still running after {timeout} s: it hangs"
    captured = capsys.readouterr()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["code"], captured.out, captured.err


def run_process(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def bad_audio(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A file that cannot be used as audio -> (its path, what the message must say about it)."""
    path = tmp_path / f"{kind}.wav"
    if kind == "missing":
        return path, "no such file"
    if kind == "empty":
        path.write_bytes(b"")
        return path, "empty file (0 bytes)"
    if kind == "header_only":
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        return path, "no audio"
    if kind == "truncated":
        whole = tmp_path / "whole.wav"
        write_wav(whole, np.zeros(16000, np.int16), 16000)  # 32000 bytes of audio
        path.write_bytes(whole.read_bytes()[:1044])
        return path, "truncated: header says 32000 bytes of audio, file has 1000"
    path.write_bytes(b"Meeting notes: call the supplier back on Tuesday.\n" * 20)
    return path, "not audio that libsndfile can read"


def tone(rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def agent_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"""
name: input test agent
model: tiny
voice: {DEMO_VOICE}
turn:
  detector: silence
  silence_secs: 0.3
response:
  max_seconds: 1
{extra}"""
    )
    return path


# -- call ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_call_names_the_file_and_what_is_wrong_with_it(tmp_path, capsys, kind):
    path, problem = bad_audio(tmp_path, kind)
    out = tmp_path / "out.wav"
    code, _, err = run(["call", str(agent_file(tmp_path)), "--input", str(path), "--output", str(out)], capsys)
    assert code == 2, err
    assert f"chroma-agent call: error: --input {path}: " in err and problem in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize(
    "rate,subtype,suffix",
    [(44100, "PCM_24", ".wav"), (22050, "FLOAT", ".wav"), (11025, "PCM_16", ".flac")],
)
def test_call_takes_any_rate_and_sample_format(tmp_path, capsys, rate, subtype, suffix):
    caller = tmp_path / f"caller{suffix}"
    soundfile.write(str(caller), np.stack([tone(rate, 0.6)] * 2, axis=1), rate, subtype=subtype)
    out = tmp_path / "out.wav"
    argv = ["call", str(agent_file(tmp_path)), "--input", str(caller), "--output", str(out), "--rate", "8000"]
    code, printed, err = run(argv, capsys)
    assert code == 0, err
    assert f"with {caller} (0.6 s, real time)" in printed
    with wave.open(str(out), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        assert w.getnframes() >= 0.6 * 8000  # the call lasted at least as long as the caller spoke


def test_a_failing_task_ends_the_call_with_exit_1(tmp_path, capsys, monkeypatch):
    import transports.file

    class BrokenResampler:
        def __init__(self, in_rate, out_rate):
            pass

        def process(self, pcm):
            raise ValueError("the line went dead")

    monkeypatch.setattr(transports.file, "StreamResampler", BrokenResampler)
    caller = tmp_path / "caller.wav"
    write_wav(caller, tone(16000, 0.5), 16000)
    out = tmp_path / "out.wav"
    code, _, err = run(["call", str(agent_file(tmp_path)), "--input", str(caller), "--output", str(out)], capsys)
    assert code == 1
    assert "chroma-agent call: error: " in err and "file-caller: ValueError: the line went dead" in err
    assert f"the call with {caller} failed" in err and not out.exists()


# -- speak -----------------------------------------------------------------------------------


def speak_argv(tmp_path, *, voice=None, user=None, consent=("--consent-by", "Test Speaker")) -> list[str]:
    if voice is None:
        voice = tmp_path / "voice.wav"
        write_wav(voice, tone(24000, 2.0), 24000)
    if user is None:
        user = tmp_path / "user.wav"
        write_wav(user, tone(16000, 0.5), 16000)
    return [
        "speak", "--model", "tiny", "--voice-audio", str(voice), "--voice-text", "Hello, this is my voice.",
        *consent, "--input", str(user), "--output", str(tmp_path / "reply.wav"), "--max-frames", "4",
    ]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_speak_names_the_file_and_what_is_wrong_with_it(tmp_path, capsys, kind):
    path, problem = bad_audio(tmp_path, kind)
    code, _, err = run(speak_argv(tmp_path, user=path), capsys)
    assert code == 2 and f"chroma-agent speak: error: --input {path}: " in err and problem in err
    code, _, err = run(speak_argv(tmp_path, voice=path), capsys)
    assert code == 2 and f"chroma-agent speak: error: --voice-audio {path}: " in err and problem in err
    assert not (tmp_path / "reply.wav").exists()


def test_speak_takes_24_bit_float_and_flac_at_any_rate(tmp_path, capsys):
    voice = tmp_path / "voice.flac"
    soundfile.write(str(voice), tone(44100, 2.0), 44100, subtype="PCM_24")
    user = tmp_path / "user.wav"
    soundfile.write(str(user), np.stack([tone(22050, 0.5)] * 2, axis=1), 22050, subtype="FLOAT")
    code, printed, err = run(speak_argv(tmp_path, voice=voice, user=user), capsys)
    assert code == 0, err
    assert "cloned with the consent of Test Speaker" in printed
    assert soundfile.info(str(tmp_path / "reply.wav")).samplerate == 24000

    user24 = tmp_path / "user24.wav"
    soundfile.write(str(user24), tone(11025, 0.5), 11025, subtype="PCM_24")
    assert run(speak_argv(tmp_path, voice=voice, user=user24), capsys)[0] == 0


def test_speak_with_a_voice_recording_needs_consent(tmp_path, capsys):
    code, _, err = run(speak_argv(tmp_path, consent=()), capsys)
    assert code == 2
    assert err.startswith("usage: chroma-agent speak ")
    assert "chroma-agent speak: error: the following arguments are required: --consent-by" in err
    code, _, err = run(speak_argv(tmp_path, consent=("--consent-by", "  ")), capsys)
    assert code == 2 and "--consent-by is '  ', expected the name of who consented" in err
    assert not (tmp_path / "reply.wav").exists()


# -- voice add -------------------------------------------------------------------------------


def voice_add(tmp_path, audio: Path) -> list[str]:
    return [
        "voice", "add", "ava", "--audio", str(audio), "--library", str(tmp_path / "library"),
        "--transcript", "Hello, thanks for calling the support line. How can I help you with your order today?",
        "--consent-by", "Ava Example",
    ]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_voice_add_names_the_file_and_what_is_wrong_with_it(tmp_path, capsys, kind):
    path, problem = bad_audio(tmp_path, kind)
    code, _, err = run(voice_add(tmp_path, path), capsys)
    assert code == 2
    assert "voice 'ava' not added:" in err and f"{path}: {problem}" in err
    assert not (tmp_path / "library" / "ava").exists()


@requires_espeak
@pytest.mark.parametrize("rate,subtype", [(44100, "PCM_24"), (22050, "FLOAT")])
def test_voice_add_takes_any_rate_and_sample_format(tmp_path, capsys, rate, subtype):
    sentence = "Hello, thanks for calling the support line. How can I help you with your order today?"
    audio = tmp_path / "ava.wav"
    soundfile.write(str(audio), to_float(synthesize(sentence, rate)), rate, subtype=subtype)
    code, printed, err = run(voice_add(tmp_path, audio), capsys)
    assert code == 0, err
    assert "added voice 'ava'" in printed


# -- flow check ------------------------------------------------------------------------------


def flow_playing(tmp_path: Path, wav: Path) -> Path:
    path = tmp_path / "flow.yaml"
    path.write_text(
        f"""initial_node: a
nodes:
  a:
    task_messages: [{{role: developer, content: hi}}]
    pre_actions:
      - {{type: play, wav: "{wav}"}}
"""
    )
    return path


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_flow_check_lists_an_unusable_recording_as_a_problem(tmp_path, capsys, kind):
    path, problem = bad_audio(tmp_path, kind)
    flow = flow_playing(tmp_path, path)
    code, _, err = run(["flow", "check", str(flow)], capsys)
    assert code == 1
    assert f"{flow}:6: nodes.a.pre_actions[0].wav: " in err and str(path) in err
    assert ("an existing audio file" if kind == "missing" else problem) in err


def test_flow_check_takes_a_recording_at_any_rate(tmp_path, capsys):
    wav = tmp_path / "hold.wav"
    soundfile.write(str(wav), tone(44100, 0.5), 44100, subtype="PCM_24")
    code, printed, err = run(["flow", "check", str(flow_playing(tmp_path, wav))], capsys)
    assert code == 0, err
    assert "ok: 1 nodes" in printed


def test_flow_check_exit_codes_missing_file_2_problems_1(tmp_path, capsys):
    code, _, err = run(["flow", "check", str(tmp_path / "nowhere.yaml")], capsys)
    assert code == 2 and f"chroma-agent flow check: error: {tmp_path / 'nowhere.yaml'}: no such flow file" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("initial_node: nowhere\nnodes:\n  a:\n    task_messages: [{role: developer, content: hi}]\n")
    code, _, err = run(["flow", "check", str(bad)], capsys)
    assert code == 1 and f"{bad}: 1 problem" in err


# -- the command line itself ---------------------------------------------------------------


def test_version_prints_the_package_version(capsys):
    code, printed, _ = run(["--version"], capsys)
    assert code == 0 and printed.strip() == f"chroma-agent {version('chroma-agents')}"


@pytest.mark.parametrize(
    "argv,usage",
    [
        (["call", "agent.yaml", "--input", "a.wav", "--output", "b.wav", "--bogus"], "chroma-agent call"),
        (["speak", "--voice-audio", "a", "--voice-text", "t", "--consent-by", "A", "--input", "b", "--output", "c",
          "--bogus"], "chroma-agent speak"),
        (["flow", "check", "flow.yaml", "--bogus"], "chroma-agent flow check"),
        (["voice", "list", "--bogus"], "chroma-agent voice list"),
        (["serve", "agent.yaml", "--prot", "80"], "chroma-agent serve"),
    ],
)
def test_a_mistyped_flag_is_reported_under_its_subcommand(capsys, argv, usage):
    code, _, err = run(argv, capsys)
    bogus = argv[-1] if argv[-1] == "--bogus" else "--prot 80"
    assert code == 2
    assert err.startswith(f"usage: {usage} ")
    assert f"{usage}: error: unrecognized arguments: {bogus}" in err


def test_an_unknown_command_is_reported_at_the_top(capsys):
    code, _, err = run(["speek"], capsys)
    assert code == 2 and err.startswith("usage: chroma-agent [-h]") and "invalid choice: 'speek'" in err


@pytest.fixture
def busy_tcp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_serve_on_a_busy_port_fails_before_loading_the_model(tmp_path, busy_tcp_port):
    result = run_process(["serve", str(agent_file(tmp_path)), "--port", str(busy_tcp_port)])
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert f"--port {busy_tcp_port} (HTTP): cannot listen on 127.0.0.1:{busy_tcp_port}" in result.stderr
    assert "loading model" not in output and "Traceback" not in output


def test_serve_with_sip_on_a_busy_udp_port_fails_before_loading_the_model(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sip_sock, socket.socket() as http_sock:
        sip_sock.bind(("127.0.0.1", 0))
        http_sock.bind(("127.0.0.1", 0))
        sip_port, http_port = sip_sock.getsockname()[1], http_sock.getsockname()[1]
        http_sock.close()  # free: only the SIP port is taken
        agent = agent_file(tmp_path, f"transports:\n  sip:\n    enabled: true\n    port: {sip_port}\n")
        result = run_process(["serve", str(agent), "--port", str(http_port)])
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert f"transports.sip.port {sip_port} (SIP, UDP) in {agent}: cannot listen" in result.stderr
    assert "loading model" not in output


def test_library_banners_and_debug_lines_are_quiet_by_default():
    script = (
        "import sys; from agent.cli import configure_logging; configure_logging(verbose=int(sys.argv[1])); "
        "import pipecat.transports.smallwebrtc.connection"
    )
    quiet = subprocess.run([sys.executable, "-c", script, "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    loud = subprocess.run([sys.executable, "-c", script, "1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert "[SCTP]" in loud.stderr and "Pipecat" in loud.stderr  # what -v shows...
    assert "[SCTP]" not in quiet.stderr and "Pipecat" not in quiet.stderr  # ...the default does not
