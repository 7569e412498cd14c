"""The carbonscale package installed by the carbonscale_package role."""


def test_cli_runs_from_the_venv(host):
    out = host.check_output("/opt/carbonscale/venv/bin/carbonscale --version")
    assert out.startswith("carbonscale ")


def test_cli_is_on_path(host):
    link = host.file("/usr/local/bin/carbonscale")
    assert link.linked_to == "/opt/carbonscale/venv/bin/carbonscale"


def test_library_imports_in_the_venv(host):
    cmd = host.run("/opt/carbonscale/venv/bin/python -c 'import carbonscale.flap, numpy'")
    assert cmd.rc == 0, cmd.stderr
