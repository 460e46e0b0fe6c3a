"""`kiln new NAME [--template classification|multihead|detection] [--dir DIR]`: a project of your own.

The project is a package (`pyproject.toml` with torchkiln entry points for its Dataset and model),
its config, a one-epoch smoke test and a README, copied from the templates shipped in
`torchkiln/templates/` (`common/` plus the template's own files) with the name filled in. A path
part `__name__` becomes the package name and the `.tmpl` suffix is dropped.
"""

from __future__ import annotations

import argparse
import importlib.util
import keyword
import re
from importlib import resources
from pathlib import Path

from torchkiln.errors import ConfigError
from torchkiln.version import __version__

TEMPLATES = {
    "classification": {
        "description": "Classifies images of three patterns", "outputs": "3", "in_channels": "1",
        "outputs_note": "", "own_data": "`root:` (a folder with one sub-folder of images per class)", "extra": "",
    },
    "multihead": {
        "description": "Predicts mask, gender and age from face images", "outputs": "8", "in_channels": "3",
        "outputs_note": " (8: the heads' 3 + 2 + 3 outputs, which the multihead task splits)",
        "own_data": "`root:` (a folder with the images and labels.csv: image, mask, gender, age)", "extra": "",
    },
    "detection": {
        "description": "Finds rectangles, ellipses and triangles in images (boxes, a small Faster R-CNN)",
        "own_data": "`annotations:` (COCO JSON) and `images:` (their folder)",
        "extra": "[detection]",  # pycocotools (COCO annotations) and faster-coco-eval (mAP)
    },
}
NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def camel(name: str) -> str:
    """my_proj -> MyProj: the prefix of the project's registered names."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)


def check_name(name: str) -> None:
    if not NAME.match(name) or keyword.iskeyword(name):
        raise ConfigError(f"kiln new: '{name}' is not a package name; use lower-case letters, digits and _"
                          " (starting with a letter), e.g. my_project")
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.origin is not None:  # a folder of that name is no module
        raise ConfigError(f"kiln new: a module '{name}' is already importable here; choose another name"
                          " (the project's package would shadow it, or be shadowed)")


def render(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def template_files(template: str) -> dict[str, str]:
    """Relative path (with `__name__`, without `.tmpl`) -> text: common files, then the template's."""
    root = resources.files("torchkiln") / "templates"
    files: dict[str, str] = {}
    for part in ("common", template):
        base = Path(str(root / part))
        for path in sorted(base.rglob("*.tmpl")):
            files[path.relative_to(base).as_posix()[: -len(".tmpl")]] = path.read_text()
    return files


def make_project(name: str, template: str = "classification", directory: str | Path | None = None) -> Path:
    """Write the project folder; an existing one is refused before anything is written."""
    dest = Path(directory) if directory is not None else Path(name)
    if dest.exists():
        raise ConfigError(f"kiln new: {dest} already exists; nothing was written (choose another name or --dir)")
    check_name(name)
    if template not in TEMPLATES:
        raise ConfigError(f"kiln new: unknown template '{template}' (templates: {', '.join(TEMPLATES)})")
    values = {"name": name, "Name": camel(name), "template": template,
              "torchkiln_version": __version__, **TEMPLATES[template]}
    for rel, text in template_files(template).items():
        out = dest / rel.replace("__name__", name)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(text, values))
    return dest


def main(args: argparse.Namespace) -> int:
    dest = make_project(args.name, args.template, args.dir)
    print(f"made {dest}/ ({args.template}): pyproject.toml, configs/default.yaml, src/{args.name}/data.py,"
          f" src/{args.name}/models.py, tests/test_smoke.py, README.md")
    print(f"next:\n  cd {dest} && pip install -e . && kiln train -c configs/default.yaml\n  pytest")
    return 0
