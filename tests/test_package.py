import tvc_rs


def test_version_is_the_crate_version():
    import tomllib
    from pathlib import Path

    cargo = tomllib.loads((Path(__file__).parent.parent / "Cargo.toml").read_text())
    assert tvc_rs.__version__ == cargo["package"]["version"]
