"""Every public name of the package is documented on an API page and has a docstring;
every results file the docs cite exists."""

import inspect
import re
import types
from pathlib import Path

import lbfgs_implicit as li


ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "pages" / "api"
RESULTS = ROOT / "benchmarks" / "results"


def public_names():
    return sorted(
        name
        for name, obj in vars(li).items()
        if not name.startswith("_") and not isinstance(obj, types.ModuleType)
    )


def documented_names():
    names = set()
    for page in API.glob("*.md"):
        text = page.read_text()
        names.update(re.findall(r"^:::\s+lbfgs_implicit\.(\w+)\s*$", text, flags=re.MULTILINE))
    return names


def test_public_names_found():
    assert {"optimize", "LBFGS", "ImplicitAdjoint", "Solution", "RESULTS"} <= set(public_names())


def test_every_public_name_is_on_an_api_page():
    missing = sorted(set(public_names()) - documented_names())
    assert not missing, f"public names without a `::: lbfgs_implicit.<name>` directive: {missing}"


def test_api_pages_name_only_public_objects():
    unknown = sorted(documented_names() - set(public_names()))
    assert not unknown, unknown


def test_every_public_name_has_a_docstring():
    missing = [name for name in public_names() if not inspect.getdoc(getattr(li, name))]
    assert not missing, f"public names without a docstring: {missing}"


def test_api_pages_are_in_the_nav():
    config = (API.parents[1] / "mkdocs.yml").read_text()
    for page in API.glob("*.md"):
        assert f"api/{page.name}" in config, page.name


def test_cited_results_files_exist():
    # Numbers in the docs come from a command in the repository: a docs page, the README
    # or a docstring that names a results file (by path or by its bare name) names one
    # that is committed.
    texts = [ROOT / "README.md", *(ROOT / "docs" / "pages").glob("*.md")]
    texts += (ROOT / "lbfgs_implicit").glob("*.py")
    cited = {}
    for path in texts:
        for name in re.findall(r"([\w.-]+\.json)\b", path.read_text()):
            cited.setdefault(name, path.name)
    assert len(cited) >= 20, sorted(cited)
    missing = {name: where for name, where in cited.items() if not (RESULTS / name).exists()}
    assert not missing, f"cited results files not in benchmarks/results/: {missing}"
