"""The paper's training recipes (``configs/*.yaml``), found by name.

``densenet train --config cifar10plus_densenet_bc100_k12`` needs no path: a name is looked up in
the recipes shipped with the package (``densenet/configs`` in a wheel, mapped from ``configs/`` by
pyproject.toml) and in a source checkout's ``configs/``. A path to a YAML file works as ever.
"""

from __future__ import annotations

from pathlib import Path

from densenet.messages import did_you_mean

SUFFIX = ".yaml"


def recipe_dirs() -> list[Path]:
    """Folders holding recipes: the installed package's, then a source checkout's ``configs/``."""
    package = Path(__file__).resolve().parent
    candidates = (package / "configs", package.parents[1] / "configs")
    return [folder for folder in candidates if folder.is_dir()]


def list_recipes() -> list[str]:
    """Sorted names of the available recipes (``cifar10plus_densenet_bc100_k12``, ...)."""
    return sorted({p.stem for d in recipe_dirs() for p in d.glob(f"*{SUFFIX}")})


def find_recipe(name_or_path: str | Path) -> Path:
    """The YAML file ``name_or_path`` names: an existing path, or a recipe name (``.yaml``
    optional). ``FileNotFoundError`` naming the closest recipes otherwise."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.parent == Path(".") and path.suffix in ("", SUFFIX):
        for folder in recipe_dirs():
            candidate = folder / f"{path.stem}{SUFFIX}"
            if candidate.is_file():
                return candidate
    hint = did_you_mean(path.stem, list_recipes(), cutoff=0.5)
    raise FileNotFoundError(
        f"{str(name_or_path)!r} is neither a file nor a recipe name{hint} "
        "(recipes: the names of configs/*.yaml, e.g. cifar10plus_densenet_bc100_k12)"
    )
