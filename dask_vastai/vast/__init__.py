"""The Vast client: everything that knows Vast's REST API on the wire."""
