"""Sign a version's manifest at export, verify it at promotion.

The signature covers ``assets.extra/MANIFEST.sha256``, which lists the SHA-256 of every other
file, so one signature vouches for the whole version. Keys are PEM files: Ed25519 or ECDSA
(signed with SHA-256). The signature is stored base64-encoded in ``MANIFEST.sha256.sig``.
"""

from __future__ import annotations

import base64
from pathlib import Path

from pipeline.artifacts import MANIFEST, SIGNATURE, PipelineError


def generate_keys(private_path: Path) -> Path:
    """A new Ed25519 key pair: ``private_path`` (mode 0600, never overwritten) for
    ``export.signing_key`` and ``private_path.pub`` for ``promote.public_key``. Returns the
    public key's path."""
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise PipelineError(f"{path}: exists; keys are never overwritten (move it away)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return public_path


def sign_manifest(version_dir: Path, private_key_pem: str | Path) -> Path:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    try:
        key = serialization.load_pem_private_key(Path(private_key_pem).read_bytes(), None)
    except (OSError, ValueError, TypeError) as e:
        raise PipelineError(f"export.signing_key: cannot load {private_key_pem}: {e}") from e
    data = (version_dir / MANIFEST).read_bytes()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(data)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
    else:
        raise PipelineError("export.signing_key: expected an Ed25519 or ECDSA private key")
    out = version_dir / SIGNATURE
    out.write_text(base64.b64encode(signature).decode() + "\n")
    return out


def verify_signature(version_dir: Path, public_key_pem: str | Path) -> str | None:
    """None when the manifest's signature verifies; otherwise what is wrong."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    sig_path = version_dir / SIGNATURE
    if not sig_path.exists():
        return f"{SIGNATURE}: missing (the version was not signed)"
    try:
        key = serialization.load_pem_public_key(Path(public_key_pem).read_bytes())
    except (OSError, ValueError) as e:
        return f"public key {public_key_pem}: cannot load: {e}"
    try:
        signature = base64.b64decode(sig_path.read_text().strip(), validate=True)
        data = (version_dir / MANIFEST).read_bytes()
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            return "public key: expected Ed25519 or ECDSA"
    except InvalidSignature:
        return "signature does not match the manifest (or was made with another key)"
    except (OSError, ValueError) as e:
        return f"{SIGNATURE}: unreadable: {e}"
    return None
