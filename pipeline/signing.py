"""The Ed25519 key that signs erasure certificates.

The private key is a PKCS#8 PEM file, ``settings.signing_key_path``
(``$ERASURE_SIGNING_KEY_FILE``, default ``$ERASURE_HOME/signing_key.pem``).
Without one, a key is generated once into that place, mode 0600, the same way
as ``secret.key`` (written to a temporary file, fsynced, then hard-linked to its
name, so two processes racing keep one key). Production keeps the file outside
the data home, on a path only the certifying worker can read, and publishes
the public key (``erasure audit public-key``) where auditors fetch it: a
certificate's embedded public key proves the document is intact, only a key
obtained apart from the document proves who signed it.

``key_id`` = SHA-256 (hex) of the raw 32-byte public key.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from db.settings import Settings, write_private_file_once

ALGORITHM = "Ed25519"


@dataclass(frozen=True)
class SigningKey:
    private_key: Ed25519PrivateKey
    path: Path

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    @property
    def public_key_pem(self) -> str:
        return public_key_pem(self.public_key)

    def sign(self, data: bytes) -> str:
        """The base64 signature of ``data``."""
        return base64.b64encode(self.private_key.sign(data)).decode("ascii")


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM; ``ValueError`` saying what is wrong otherwise."""
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a PEM public key ({exc}); export one with `erasure audit public-key`") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"the public key is {type(key).__name__}, not Ed25519")
    return key


def signature_valid(public_key: Ed25519PublicKey, signature_b64: str, data: bytes) -> bool:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (ValueError, TypeError):
        return False
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def load_or_create_signing_key(settings: Settings) -> SigningKey:
    """The configured signing key; generated into its place on first use."""
    path = settings.signing_key_path
    if not path.exists():
        _create(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an unencrypted PEM private key ({exc}); "
                         "point ERASURE_SIGNING_KEY_FILE at the certificate signing key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}; certificates are signed with Ed25519")
    return SigningKey(key, path)


def _create(path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_private_file_once(path, pem)
