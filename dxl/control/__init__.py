"""The control plane between engines: authentication (HMAC challenge-response), the wire
format of control frames, the identity peers exchange in the handshake, and one control
connection's channel (requests with acks, heartbeats)."""
