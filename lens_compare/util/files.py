"""Reading the user's YAML and JSON files with errors that name the file and the problem."""

import json
from pathlib import Path
from typing import Any

import yaml

from lens_compare.errors import LensCompareError


def read_structured(path: str | Path, what: str, error: type[LensCompareError]) -> Any:
    """Parse ``path`` as JSON (``.json``) or YAML; ``what`` names it in messages ("config file")."""
    path = Path(path)
    is_json = path.suffix == ".json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(f"{what} {str(path)!r} does not exist") from None
    except OSError as exc:
        raise error(f"{what} {str(path)!r} cannot be read: {exc.strerror}") from None
    try:
        return json.loads(text) if is_json else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise error(f"{what} {str(path)!r} is not valid {'JSON' if is_json else 'YAML'}: {exc}") from None
