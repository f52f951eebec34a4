"""Which published trainer image runs a job: names and tags come from images.toml beside this file.

`image_for("nvidia")` -> "ghcr.io/wanforge/wanforge-trainer:0.1.0-cu128". No torch needed: the launcher's own
environment (SkyPilot) uses this. `python -m launcher.images matrix` prints what CI builds (the images workflow).
"""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from trainer.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

IMAGES_FILE = Path(__file__).with_name("images.toml")
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

# Names people use for the two GPU vendors -> the vendor key in images.toml.
VENDOR_ALIASES = {"nvidia": "nvidia", "cuda": "nvidia", "amd": "amd", "rocm": "amd"}


def load_images(path: Path = IMAGES_FILE) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the package was built without its data file (package-data)")
    return tomllib.loads(path.read_text(encoding="utf-8"))


def package_version() -> str:
    """The installed wanforge version; in a source tree without an install, pyproject.toml's."""
    try:
        return metadata.version("wanforge")
    except metadata.PackageNotFoundError:
        pass
    if PYPROJECT.is_file():
        return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["version"]
    raise RuntimeError("wanforge is not installed and no pyproject.toml is beside its source: no version for the tag")


def tag_version(version: str) -> str:
    """A package version as a Docker tag part: "+" (PEP 440 local version) and all else a tag can't hold -> "-"."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", version)


def variant_for(accelerator_vendor: str, cuda: str | None = None, images: dict[str, Any] | None = None) -> str:
    """The images.toml variant for a vendor ("nvidia"/"cuda" or "amd"/"rocm"); `cuda` picks among NVIDIA ones."""
    images = images or load_images()
    variants: dict[str, Any] = images["variants"]
    vendor = VENDOR_ALIASES.get(accelerator_vendor.strip().lower())
    if vendor is None:
        choices = ", ".join(sorted(VENDOR_ALIASES))
        raise UserError(f'no trainer image for accelerator vendor "{accelerator_vendor}": use one of {choices}')
    names = [name for name, v in variants.items() if v["vendor"] == vendor]
    if vendor == "amd":
        return names[0]
    wanted = (cuda or images["default_cuda"]).strip().lower()
    if wanted not in names:
        raise UserError(f'no NVIDIA trainer image for "{cuda}": choose one of {", ".join(names)}')
    return wanted


def image_for(accelerator_vendor: str, cuda: str = "cu128", version: str | None = None) -> str:
    """The full image reference for a vendor, e.g. ghcr.io/wanforge/wanforge-trainer:0.1.0-cu130.

    `cuda` only matters for NVIDIA (cu128 needs a host driver >= 570, cu130 >= 580); AMD has one ROCm image.
    `version` defaults to the installed wanforge version, so a launcher runs the trainer of its own release.
    """
    images = load_images()
    variant = variant_for(accelerator_vendor, cuda, images)
    return f"{images['repository']}:{tag_version(version or package_version())}-{variant}"


def build_matrix(version: str | None = None) -> list[dict[str, str]]:
    """One entry per image for CI: what to build (Dockerfile, build args) and the tag to push."""
    images = load_images()
    version = tag_version(version or package_version())
    matrix = []
    for name, v in images["variants"].items():
        args = {"TORCH_VERSION": images["torch"], **v.get("build_args", {})}
        matrix.append(
            {
                "variant": name,
                "dockerfile": v["dockerfile"],
                "image": f"{images['repository']}:{version}-{name}",
                "build_args": "\n".join(f"{k}={val}" for k, val in args.items()),
            }
        )
    return matrix


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["matrix"]:
        print(json.dumps({"include": build_matrix(args[1] if len(args) > 1 else None)}))
    elif args[:1] == ["version"]:
        print(tag_version(package_version()))
    elif args[:1] == ["image"] and len(args) >= 2:
        print(image_for(args[1], *args[2:3]))
    else:
        print("usage: python -m launcher.images matrix [VERSION] | version | image VENDOR [CUDA]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
