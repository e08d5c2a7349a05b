"""Each line's glue to the runtime: how a call that arrives on a transport becomes an agent call.

A line (transports.line.Line) is the transport side of one call: its audio in and out at its own
rates, keys both ways, hang-up, transfer, and how much of the agent's audio the far end has played.
The glue is the agent side, one module per transport, each of the same shape:

    admit      the runtime says whether one more call can be taken (busy_reason / reserve); a call
               that cannot is refused the transport's own way (503, <Reject>, 486) and recorded
    build      the line, from what the transport handed over (a peer connection, a media socket,
               an RTP session), and its call: runtime.new_call(line, call_id=..., screen=...)
    run        call.run() in a task the glue owns (Twilio: the media socket's handler), which frees
               the call's session and hangs the line up when it ends
    close      one close() that hangs up (then cancels) the calls still running, for shutdown
               (Twilio's calls end with their media sockets as the server stops)

    webrtc.py  WebRTCCalls: POST /api/offer's SDP offer to a call on a WebRTCLine
    twilio.py  twilio_router: the voice webhook admits, the media socket runs TwilioCallTransport
    sip.py     SipCalls (the SIP server's handler): INVITE admits, ACK runs SipCallTransport;
               sip_outbound places calls

Adding a transport: a line in transports/ that satisfies transports.line.Line (see
tests/agent/test_fake_line.py for the least such line), and its glue here.
"""
