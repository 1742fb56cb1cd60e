"""The extension as Slicer's Extensions Manager sees it: the ExtensionsIndex description file is
valid against the catalog schema (a copy of Slicer's Schemas/slicer-extension-catalog-entry-schema-
v1.0.1.json), agrees with the top-level CMakeLists.txt, and every URL that names a file of this
repository (icon, screenshots) names a committed file; the LICENSE matches pyproject.toml."""
import json
import re
from pathlib import Path

import jsonschema

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTION = ROOT / "ExtensionsIndex" / "GEM3DEditor.json"
SCHEMA = ROOT / "Testing" / "data" / "slicer-extension-catalog-entry-schema-v1.0.1.json"


def cmake_metadata() -> dict:
    """The set(NAME "value") of the top-level CMakeLists.txt, with ${NAME} references expanded."""
    values = {}
    for name, value in re.findall(r'^set\((\w+) "([^"]*)"\)', (ROOT / "CMakeLists.txt").read_text(), re.M):
        values[name] = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], value)
    return values


def test_the_description_file_is_valid_against_the_catalog_schema():
    description = json.loads(DESCRIPTION.read_text(encoding="utf-8"))
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert description["$schema"] == schema["$id"]
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(description, schema)
    assert b"\r" not in DESCRIPTION.read_bytes()  # the index's check: LF line endings only
    assert Path(description["scm_url"]).name.startswith("Slicer")  # the index's repository-name check
    bad = dict(description, scm_revison="main")  # a misspelt key is refused: the validation can fail
    assert not jsonschema.Draft7Validator(schema).is_valid(bad)


def test_the_description_file_agrees_with_cmake_and_names_one_repository():
    description, cmake = json.loads(DESCRIPTION.read_text(encoding="utf-8")), cmake_metadata()
    assert description["category"] == cmake["EXTENSION_CATEGORY"]
    assert description["build_dependencies"] == cmake["EXTENSION_DEPENDS"].split(";")
    assert cmake["EXTENSION_HOMEPAGE"] == description["scm_url"]
    raw = description["scm_url"].replace("https://github.com/", "https://raw.githubusercontent.com/") + \
        "/" + description["scm_revision"] + "/"
    assert cmake["GEM3D_RAW_URL"] + "/" == raw
    readme = (ROOT / "GEM3DEditor" / "README.md").read_text(encoding="utf-8")
    assert description["scm_url"] in readme


def test_every_url_named_resource_is_committed():
    cmake = cmake_metadata()
    raw = cmake["GEM3D_RAW_URL"] + "/"
    urls = [cmake["EXTENSION_ICONURL"]] + cmake["EXTENSION_SCREENSHOTURLS"].split()
    assert len(urls) >= 2
    for url in urls:
        assert url.startswith(raw), url
        path = ROOT / url[len(raw):]
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url


def test_the_license_is_the_one_pyproject_names():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^license = \{ text = "Apache-2.0" \}', pyproject, re.M)
    text = (ROOT / "LICENSE.txt").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
