"""Packaging: the top-level folders map into the one ``crfiqa`` namespace, and every subpackage under them is
found, not listed by hand (a new ``service/backends/__init__.py`` is in the wheel without touching this file)."""

from setuptools import find_packages, setup

#: import name -> folder. The only hand-written part: the design's top-level folders.
ROOTS = {
    "crfiqa": "crfiqa",
    "crfiqa.service": "service",
    "crfiqa.training": "training",
    "crfiqa.evaluation": "evaluation",
    "crfiqa.models": "models",
    "crfiqa.curation": "curation",
}


def packages() -> list[str]:
    """Every package under each root folder, named in the ``crfiqa`` namespace."""
    found = []
    for name, folder in ROOTS.items():
        found.append(name)
        found.extend(f"{name}.{sub}" for sub in find_packages(folder))
    return found


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import ROOTS and packages()
    setup(packages=packages(), package_dir=ROOTS)
