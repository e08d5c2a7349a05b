"""SIP (RFC 3261) user agent pieces: one protocol piece per module."""
