"""The `medpose` command line and the bundled run configs (launch/configs/*.yaml)."""
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def find_config(name: str) -> Path:
    """A file path, or the name of a bundled config in launch/configs (with or without .yaml); ValueError naming the
    bundled configs otherwise."""
    p = Path(name)
    if p.is_file():
        return p
    bundled = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if bundled.is_file():
        return bundled
    known = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise ValueError(f"'{name}' is neither a file nor a bundled config ({known})")
