"""Entry points that other launchers run as scripts (see tvc_rs.llamafactory.cli_train)."""
