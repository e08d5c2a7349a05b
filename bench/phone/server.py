"""The server under test: `chroma-agent serve`'s app (Twilio routes, SIP/RTP) on the stand-in engine."""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
from pathlib import Path

from ..pipeline.common import REPLY_SECS, StandInModel, agent_file

AUTH_TOKEN = "bench-phone-auth-token"


def phone_agent(folder: Path, *, port: int, sip_port: int, rtp_ports: tuple[int, int], max_calls: int) -> Path:
    """The benchmark agent: the pipeline benchmark's agent file with Twilio and SIP on, WebRTC off."""
    path = agent_file(folder, name="phone", detector="silence", silence_secs=0.5)
    path.write_text(
        path.read_text()
        # max_sessions (all transports together, default 32) as high as the transports' own caps, so the
        # run measures N calls rather than the default capacity refusing the ones beyond it
        + f"""max_sessions: {max_calls}
transports:
  webrtc: {{enabled: false}}
  twilio: {{enabled: true, public_url: "http://127.0.0.1:{port}", auth_token: {AUTH_TOKEN}, max_calls: {max_calls}}}
  sip: {{enabled: true, port: {sip_port}, rtp_ports: [{rtp_ports[0]}, {rtp_ports[1]}], max_calls: {max_calls}}}
"""
    )
    return path


def cmd_server(args) -> int:
    import uvicorn
    from loguru import logger

    from agent.runtime import AgentRuntime
    from agent.server import create_app
    from agent.spec import load_agent

    logger.remove()
    logger.add(sys.stderr, level=args.log_level)
    folder = Path(tempfile.mkdtemp(prefix="bench-phone-server-"))
    rtp = (args.rtp_first, args.rtp_first + 4 * args.max_calls + 1)
    spec = load_agent(phone_agent(folder, port=args.port, sip_port=args.sip_port, rtp_ports=rtp, max_calls=args.max_calls))
    runtime = AgentRuntime(spec, model=StandInModel(reply_secs=args.reply_secs))
    app = create_app(runtime)
    gc.collect()
    gc.freeze()  # as `chroma-agent serve` does
    print(json.dumps({"pid": os.getpid(), "port": args.port, "sip_port": args.sip_port}), flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", ws_ping_interval=None)
    return 0


def add_server_args(p) -> None:
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sip-port", type=int, required=True)
    p.add_argument("--rtp-first", type=int, default=30000)
    p.add_argument("--max-calls", type=int, default=120)
    p.add_argument("--reply-secs", type=float, default=REPLY_SECS)
    p.add_argument("--log-level", default="WARNING")
