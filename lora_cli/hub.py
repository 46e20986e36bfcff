"""What looks like a Hugging Face Hub id: the only names `lora` ever sends to the network."""

from __future__ import annotations

import re

# owner/name, as every dataset and most models are named
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# models also have legacy ids without an owner ("gpt2")
LEGACY_ID = re.compile(r"^[A-Za-z0-9][\w.-]*$")


def looks_like_hub_id(name: str, *, owner_optional: bool = False) -> bool:
    """owner/name; with `owner_optional` (model ids) a bare name too."""
    return bool(REPO_ID.match(name) or (owner_optional and LEGACY_ID.match(name)))
