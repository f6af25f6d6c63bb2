"""Serving side: the client, the codec, the embedded TF-Serving-compatible server, promotion."""
