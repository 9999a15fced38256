"""The iSCSI protocol (RFC 7143), sans-I/O: codec, negotiation, login, sessions."""
