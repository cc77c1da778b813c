"""What the benchmarks share: a study's results file, continued only by a run of the same protocol.

A results file (`--json`) holds the rows measured so far and the protocol they were measured under; rerunning the
same command continues it, and any other protocol is refused before any work (it would replace those results).
"""

from pathlib import Path
from typing import Optional

from ddpm_fashion.guards.files import check_output_path, read_json_object


def _short_repr(value, limit: int = 60) -> str:
    """Get repr(value), cut to `limit` characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_same_protocol(path: Path, saved: dict, protocol: dict) -> None:
    """Raise a one-line ValueError naming what differs unless `saved` (read from path) was made under `protocol`.

    A results file is continued only by a run of its own protocol (saved["protocol"]): anything else would replace
    its results.
    """
    if not isinstance(saved.get("protocol"), dict):
        raise ValueError(f"{path} holds results this command did not write; give another --json")
    if saved["protocol"] == protocol:
        return
    differing = sorted(key for key in set(saved["protocol"]) | set(protocol)
                       if saved["protocol"].get(key) != protocol.get(key))
    changes = "; ".join(f"{key}: {_short_repr(saved['protocol'].get(key))} -> {_short_repr(protocol.get(key))}"
                        for key in differing)
    raise ValueError(f"{path} holds results made under another protocol ({changes}); continuing it would replace "
                     "them, so give another --json or the same options")


def continue_study(path: Optional[str], protocol: dict) -> dict:
    """Get the results saved at path to continue ({} if none); a one-line ValueError if another protocol made them
    or path cannot be written (checked before any work)."""
    if not path:
        return {}
    check_output_path(path, (".json",))
    if not Path(path).is_file():
        return {}
    saved = read_json_object(Path(path))
    check_same_protocol(path, saved, protocol)
    return saved
