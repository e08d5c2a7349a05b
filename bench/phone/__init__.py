"""Phone benchmark: concurrent Twilio Media Streams and SIP/RTP calls against one server."""
