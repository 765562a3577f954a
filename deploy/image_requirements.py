"""Print the image's requirements: pyproject.toml's dependencies and those of the extras named, one a line.

The Dockerfile runs this on pyproject.toml alone, before it copies the code, so the layer that installs the
dependencies is built again when they change, not when the code does:

    python image_requirements.py pyproject.toml tensorboard report > requirements.txt
"""

import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python before 3.11 (the torch 2.2 images): the copy that pip carries
    from pip._vendor import tomli as tomllib


def requirements(pyproject, extras):
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        sys.exit(f"{pyproject} has no extra {', '.join(unknown)} (it has {', '.join(optional) or 'none'})")
    return project["dependencies"] + [requirement for extra in extras for requirement in optional[extra]]


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: image_requirements.py PYPROJECT [EXTRA ...]")
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
