"""tools/uv_index_args.py: uv gets the package sources pip is configured with."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("uv_index_args", Path(__file__).parents[1] / "tools" / "uv_index_args.py")
uv_index_args = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(uv_index_args)

LISTING = """:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/pip/constraints.txt'
global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'
global.find-links='/opt/wheels\\n/srv/wheels'
"""


def test_shared_keys_become_uv_options_and_the_last_setting_wins():
    options = uv_index_args.uv_options(uv_index_args.parse_pip_config(LISTING))
    assert options == [
        "--extra-index-url=file:///opt/a/simple",
        "--extra-index-url=file:///opt/b/simple",
        "--find-links=/opt/wheels",
        "--find-links=/srv/wheels",  # the global setting: listed after the environment's
        "--constraint=/etc/pip/constraints.txt",
        "--index-strategy=unsafe-best-match",
    ]


def test_nothing_configured_means_no_options():
    assert uv_index_args.uv_options(uv_index_args.parse_pip_config(":env:.default-timeout='180'\n")) == []
