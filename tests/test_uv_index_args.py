"""tools/uv_index_args.py: uv gets the package sources pip is configured with."""

import importlib.util
from pathlib import Path

_SCRIPT = Path(__file__).parents[1] / "tools" / "uv_index_args.py"
_spec = importlib.util.spec_from_file_location("uv_index_args", _SCRIPT)
uv_index_args = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(uv_index_args)

# As `pip config list` prints it: sorted by name, so ":env:" (the PIP_* variables, pip's strongest) comes first.
LISTING = """:env:.default-timeout='180'
:env:.index-url='https://mirror.example/simple'
download.find-links='/srv/downloads'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/pip/constraints.txt'
global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'
global.find-links='/opt/wheels\\n/srv/wheels'
global.index-url='https://pypi.org/simple'
install.constraint='/etc/pip/install-constraints.txt'
"""


def test_shared_keys_become_uv_options_from_the_section_pip_install_would_use():
    options = uv_index_args.uv_options(uv_index_args.parse_pip_config(LISTING))
    assert options == [
        "--index-url=https://mirror.example/simple",  # PIP_INDEX_URL beats [global]
        "--extra-index-url=file:///opt/a/simple",
        "--extra-index-url=file:///opt/b/simple",
        "--find-links=/opt/wheels",  # [global]'s newline-separated list; [download] is another command's
        "--find-links=/srv/wheels",
        "--constraint=/etc/pip/install-constraints.txt",  # [install] beats [global]
        "--index-strategy=unsafe-best-match",
    ]


def test_nothing_configured_means_no_options():
    assert uv_index_args.uv_options(uv_index_args.parse_pip_config(":env:.default-timeout='180'\n")) == []
