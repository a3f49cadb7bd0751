"""Where the files kscan ships beside its code are: the installed `kscan/contrib/`.

The event schema (`events.schema.json`), the SIEM schemas (`siem/`), the example
configuration (`kscan.toml.example`) and the systemd unit (`systemd/kscan.service`) are
package data: they are inside the wheel, so `pipx install .` or `pip install kscan` puts
them beside the code, and in a source checkout they are `kscan/contrib/` itself. Error
hints and `--help` name them through `contrib_path`, so they point at the copy that is
actually there; `kscan --contrib-dir` prints the directory (for `install -m 0644
"$(kscan --contrib-dir)/systemd/kscan.service" /etc/systemd/system/`).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["CONTRIB_FILES", "contrib_dir", "contrib_path"]

#: Every shipped file, relative to the contrib directory (the wheel test checks each).
CONTRIB_FILES = (
    "events.schema.json",
    "kscan.toml.example",
    "systemd/kscan.service",
    "siem/ecs-8.17.required.schema.json",
    "siem/ocsf-1.5.0.required.schema.json",
)


def contrib_dir() -> Path:
    """The directory of the shipped files, as installed (or in the source tree)."""
    # A regular install (wheel, pipx, editable) is a directory on disk, so the
    # Traversable is a real path; kscan is not run from a zip file.
    return Path(str(files("kscan").joinpath("contrib")))


def contrib_path(name: str) -> Path:
    """A shipped file by its name under contrib/ (`"kscan.toml.example"`)."""
    return contrib_dir() / name
