"""Sphinx configuration of the ellsjax documentation site.

Build (offline, warnings as errors, the quickstart notebook executed):

    pip install '.[docs]' && sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

import ellsjax  # noqa: E402

project = "ellsjax"
author = "the ellsjax authors"
copyright = "the ellsjax authors, Apache-2.0"
release = ellsjax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
    "benchtables",  # docs/_ext/benchtables.py: the benchmarks page's tables from docs/benchmarks/results/*.json
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints", "benchmarks/results"]
root_doc = "index"


# -- MyST and notebooks ---------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "force"          # the quickstart runs at every build: a broken notebook fails the build
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_in_temp = True          # files a notebook writes go to a temporary folder, not docs/
nb_merge_streams = True

# -- API pages (docs/api/*.rst, checked against every public module's __all__ by tests/test_api_docs.py) ------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": True}
autodoc_preserve_defaults = True
python_maximum_signature_line_length = 100  # long signatures: one parameter per line
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True           # "Attributes:" as fields: autodoc documents a record's fields once, as members
napoleon_attr_annotations = False

# -- HTML -------------------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"ellsjax {release}"
def _constant_docs(app, what, name, obj, options, lines):
    """A constant is documented by its ``#:`` comment (found where the package assigns it, private modules
    included), never by the docstring of its type (a dict's or a NamedTuple's)."""
    if what != "data":
        return
    import apipages

    module, _, attr = name.rpartition(".")
    own = apipages.data_doc(module, attr)
    inherited = type(obj).__doc__ is not None and getattr(obj, "__doc__", None) is type(obj).__doc__
    if own or inherited:
        lines[:] = own


def setup(app):
    app.connect("autodoc-process-docstring", _constant_docs)
