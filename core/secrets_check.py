"""Start-up refusal of API keys that anyone can know.

Deployment files show example values (``change-me`` and the like) that an operator may apply
unchanged; a service that accepts such a key is open to everyone who has read the example.
Only the SHA-256 of each key is configured (``ApiSettings.keys``), so the known placeholders
are hashed here and compared with the configured digests. The API and the worker call
``refuse_placeholder_api_keys`` before they do anything else; the API also refuses to require
keys while none is configured (every request would be 401).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from core.settings import ApiSettings

# Values seen in examples, tutorials and first attempts; the empty string is the digest of a
# key variable left empty.
PLACEHOLDER_KEYS: tuple[str, ...] = (
    "",
    "change-me",
    "changeme",
    "change_me",
    "change-it",
    "changeit",
    "replace-me",
    "replaceme",
    "secret",
    "password",
    "passw0rd",
    "example",
    "test",
    "testing",
    "admin",
    "default",
    "placeholder",
    "api-key",
    "apikey",
    "your-api-key",
    "key",
    "token",
    "todo",
    "xxx",
    "123456",
    "spasemsr",
    "spasemsr-secret",
)

GENERATE_HINT = "generate one with `python3 deploy/make_env.py key` (see deploy/README.md)"


class RefusedToStart(SystemExit):
    """Configuration that must not serve: the interpreter prints the message and exits 1,
    the code the service uses for "could not start"; no handler for ``Exception`` swallows it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"refusing to start: {message}")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _spellings(word: str) -> Iterable[str]:
    """The ways a placeholder gets typed: as is, capitalised, in capitals, and with the
    newline that ``echo word | sha256sum`` hashes along with it."""
    for spelling in {word, word.capitalize(), word.upper()}:
        yield spelling
        yield spelling + "\n"


def _placeholder_digests(words: Iterable[str]) -> dict[str, str]:
    return {_sha256(spelling): spelling for word in words for spelling in _spellings(word)}


PLACEHOLDER_DIGESTS: dict[str, str] = _placeholder_digests(PLACEHOLDER_KEYS)
"""SHA-256 hex digest -> the placeholder it is the digest of."""


def placeholder_api_keys(api: ApiSettings) -> dict[str, str]:
    """Name -> placeholder of every configured key whose digest is that of a placeholder."""
    return {
        key.name: PLACEHOLDER_DIGESTS[key.sha256]
        for key in api.keys
        if key.sha256 in PLACEHOLDER_DIGESTS
    }


def refuse_placeholder_api_keys(api: ApiSettings) -> None:
    """Raise ``RefusedToStart`` when any configured key is a known placeholder."""
    found = placeholder_api_keys(api)
    if found:
        named = ", ".join(f"{name!r} is the SHA-256 of {text!r}" for name, text in found.items())
        raise RefusedToStart(
            f"SPASEMSR_API__KEYS holds a placeholder key ({named}); anyone who has read the "
            f"example could use it. Replace it with a key of your own: {GENERATE_HINT}."
        )


def refuse_unusable_api_keys(api: ApiSettings) -> None:
    """The API's check: no placeholder key, and keys configured when they are required."""
    refuse_placeholder_api_keys(api)
    if api.auth_required and not api.keys:
        raise RefusedToStart(
            "SPASEMSR_API__AUTH_REQUIRED is true but SPASEMSR_API__KEYS is empty, so every "
            f"request would be refused with 401. Configure at least one key: {GENERATE_HINT}."
        )
